"""Generation for many requests on one base model, each request with its own adapter, batched
continuously.

Requests wait in a bounded queue; the engine thread keeps one running batch (studio/serving/batch.py)
and, before every decode step, lets waiting requests join it (prefilling only the newcomers) up to
``max_batch`` rows; a row leaves the step it ends. So nobody waits for another request's batch to
finish, and a finished row costs nothing. One forward per step serves every row, each row through
its own LoRA adapter or none (studio/serving/routing.py).

- **One base at a time.** Rows that need another base load (a QLoRA run's 4-bit base, another
  precision, a full fine-tune) wait until the running batch drains, then form the next one; the
  head of the queue is never passed over for newer requests of the running base.
- **Fair.** Waiting requests are taken round robin across clients (the API names each by its
  address), so a client with many requests in the queue delays another's one by at most a turn.
- **Bounded.** Past ``max_queue`` waiting requests ``submit`` refuses with ``Overloaded`` (the API
  answers 503 with Retry-After), and past ``max_queue_per_client`` for one client (429).
- **Shares the playground.** The playground's lock is held while a batch runs, so the Chat tab and
  the engine never see each other's half-loaded state; between two steps the engine lends it to
  anyone waiting for it (the Chat tab, an evaluation on another engine) and takes it back after.
- **Shared prompt starts** are prefilled once (studio/serving/prefix_cache.py).

A cancelled row (the client went away) leaves at the next step.
"""

from __future__ import annotations

import itertools
import logging
import math
import queue
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

from studio.inference.playground import BASE_ADAPTER, BaseLoad, Playground, SamplingSettings
from studio.serving.batch import Batch
from studio.serving.logprobs import Scored
from studio.serving.prefix_cache import PrefixCache

log = logging.getLogger(__name__)


@dataclass
class Request:
    """One completion request as the engine sees it. The engine writes the outcome fields and
    puts events on ``events``: ("text", str) deltas, then ("done", None) or ("error", message)."""

    id: str
    ref: str | None  # adapter ref (run id or id@step-N); None for the base
    prompt_ids: list[int]
    settings: SamplingSettings
    stop: list[str] = field(default_factory=list)
    tokenizer: Any = None  # the run's tokenizer (decoding); the base's when None
    ignore_eos: bool = False  # decode to max tokens even past an end of turn (vLLM's extension; benchmarks)
    logprobs: int | None = None  # alternatives per token to report (0-20); None: no log-probabilities
    echo: bool = False  # with logprobs: score the prompt's tokens too; max_new_tokens may then be 0
    client: str = ""  # who sent it (fair turns and per-client limits); "" for the studio's own jobs
    events: queue.Queue = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    # filled in by the engine
    submitted_at: float = field(default_factory=time.monotonic)
    started_at: float | None = None
    first_token_at: float | None = None
    finished_at: float | None = None
    completion_tokens: int = 0
    finish_reason: str | None = None  # "stop" (end of turn or a stop string) or "length"
    text: str = ""
    output_ids: list[int] = field(default_factory=list)  # every token chosen, an end of turn included
    batch_id: str | None = None  # the running batch it joined ("7": the engine's 7th)
    batch_refs: list[str] = field(default_factory=list)  # every row that shared a step with it
    weights_sha256: str | None = None  # the hash of the adapter weights that decoded it (None: the base)
    prompt_scores: list[Scored] = field(default_factory=list)  # prompt tokens 2..n (echo with logprobs)
    scores: list[Scored] = field(default_factory=list)  # each generated token, an ending end-of-turn too

    @property
    def wants_prompt_scores(self) -> bool:
        return self.echo and self.logprobs is not None

    @property
    def queue_s(self) -> float:
        return (self.started_at or time.monotonic()) - self.submitted_at

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_at is None else self.first_token_at - self.submitted_at


class Overloaded(Exception):
    """``submit`` refused a request: the queue is full (``status`` 503) or its client already has
    its share of it waiting (429). ``retry_after_s``: about when a place frees up."""

    def __init__(self, status: int, message: str, retry_after_s: int):
        super().__init__(message)
        self.status, self.retry_after_s = status, retry_after_s


class _Waiting:
    """The queue: one line per client, taken round robin (the client served last goes to the back)."""

    def __init__(self):
        self._lines: OrderedDict[str, deque[Request]] = OrderedDict()
        self._count = 0
        self.closing = False
        self.changed = threading.Condition()

    def __len__(self) -> int:
        return self._count

    def of(self, client: str) -> int:
        return len(self._lines.get(client, ()))

    def put(self, r: Request) -> None:  # under ``changed``
        self._lines.setdefault(r.client, deque()).append(r)
        self._count += 1
        self.changed.notify_all()

    def head(self) -> Request | None:  # under ``changed``
        return next(iter(self._lines.values()))[0] if self._lines else None

    def pop(self) -> Request:  # under ``changed``: the head, and its client's turn passes
        client, line = next(iter(self._lines.items()))
        r = line.popleft()
        del self._lines[client]
        if line:
            self._lines[client] = line  # to the back
        self._count -= 1
        return r


@dataclass
class _Counters:
    rejected_full: int = 0
    rejected_client: int = 0
    steps: int = 0
    rows_stepped: int = 0  # summed over steps: divided by steps, the mean batch size
    lends: int = 0  # times the playground was lent to a waiting thread between two steps


class Engine:
    """The background decoder. ``submit`` never blocks; the caller reads ``request.events``."""

    def __init__(
        self,
        playground: Playground,
        resolve,
        max_batch: int = 8,
        max_wait_s: float = 0.01,
        max_queue: int | None = None,
        max_queue_per_client: int | None = None,
        prefix_cache: PrefixCache | None = None,
        idle_exit_s: float = 5.0,
    ):
        """``resolve(ref) -> (BaseLoad, prepare)``: the base a ref needs, and ``prepare(playground)``
        that loads its adapter inside ``Playground.serving`` and returns the adapter's name
        (raises LookupError or ValueError with a sentence for a ref that cannot be served).
        ``max_wait_s``: how long a new batch waits for requests sent at the same moment, so they
        prefill together. ``max_queue`` / ``max_queue_per_client``: waiting requests beyond which
        ``submit`` raises Overloaded (None: unbounded, for the studio's own jobs). ``idle_exit_s``:
        the decoding thread ends after this long without requests (the next submit starts one)."""
        self.playground = playground
        self.resolve = resolve
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.max_queue_per_client = max_queue_per_client
        self.prefix_cache = prefix_cache
        self.idle_exit_s = idle_exit_s
        self.counters = _Counters()
        self.running = 0  # rows in the running batch
        self._waiting = _Waiting()
        self._batch_ids = itertools.count(1)
        self._thread: threading.Thread | None = None  # set and cleared under self._waiting.changed
        self._request_s = 5.0  # a running mean of request durations, for Retry-After

    def submit(self, request: Request) -> Request:
        """Queue ``request``; raises Overloaded (nothing queued) when the queue or the client's
        share of it is full."""
        with self._waiting.changed:  # the thread decides to end under this lock too
            self._refuse_if_full(request.client)
            if self._thread is None or not self._thread.is_alive():
                self._waiting.closing = False
                self._thread = threading.Thread(target=self._loop, name="serving-engine", daemon=True)
                self._thread.start()
            self._waiting.put(request)
        return request

    def _refuse_if_full(self, client: str) -> None:
        waiting = len(self._waiting)
        retry = max(1, min(120, math.ceil(self._request_s * (waiting + 1) / self.max_batch)))
        if self.max_queue is not None and waiting >= self.max_queue:
            self.counters.rejected_full += 1
            raise Overloaded(
                503,
                f"The server is at capacity: {waiting} requests are waiting. Retry after {retry} s, or raise "
                "`serve --max-queue`.",
                retry,
            )
        mine = self._waiting.of(client)
        if self.max_queue_per_client is not None and mine >= self.max_queue_per_client:
            self.counters.rejected_client += 1
            raise Overloaded(
                429,
                f"You already have {mine} requests waiting, this client's share of the queue. Wait for an "
                f"answer before sending more (retry after {retry} s).",
                retry,
            )

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def close(self, timeout: float = 30.0) -> None:
        """End the decoding thread once the requests already queued are done, and wait for it (an
        engine made for one job, such as an evaluation, leaves no thread behind: a process that
        exits while a thread that ran torch is still alive aborts, "terminate called without an
        active exception", exit code 134). A later submit starts a new thread."""
        with self._waiting.changed:
            thread = self._thread
            if thread is None or not thread.is_alive():
                return
            self._waiting.closing = True
            self._waiting.changed.notify_all()
        thread.join(timeout)

    # ---- the decoding thread -------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._waiting.changed:
                while not len(self._waiting):
                    if self._waiting.closing:
                        return
                    if not self._waiting.changed.wait(self.idle_exit_s) and not len(self._waiting):
                        # Idle: end the thread (submit starts another). With GNU OpenMP every
                        # thread that ran torch keeps its own team of workers, and while two
                        # such threads live, every parallel region in the process runs ~1.5x
                        # slower on CPU: an idle engine would slow the next training run.
                        self._thread = None
                        return
            try:
                self._session()
            except Exception:  # noqa: BLE001 - the engine outlives any one batch
                log.exception("the serving engine's batch loop failed; it goes on")

    def _session(self) -> None:
        """Serve one base load: take the queue's head's, and step a batch on it while requests for
        it keep coming; return once the batch is empty."""
        load = self._head_load()
        if load is None:
            return
        if len(self._waiting) < self.max_batch and self.max_wait_s:
            time.sleep(self.max_wait_s)  # requests sent at the same moment prefill together
        batch_id = str(next(self._batch_ids))
        with self.playground.serving(load) as pg:
            batch = Batch(pg, load.precision, self.prefix_cache)
            try:
                while True:
                    self._admit(batch, load, pg, batch_id)
                    if not batch.rows:
                        return
                    self.counters.steps += 1
                    self.counters.rows_stepped += len(batch.rows)
                    for row in batch.step():
                        self._timed(row.r)
                    self.running = len(batch.rows)
                    if batch.rows and pg.others_waiting():
                        self._lend(batch, load, pg)
            except Exception as exc:  # noqa: BLE001 - every row of a failed batch gets an answer
                log.exception("batch %s failed", batch_id)
                for row in batch.rows:
                    self._fail(row.r, f"Generation failed: {type(exc).__name__}: {exc}")
                batch.rows = []
            finally:
                self.running = 0
                batch.close_route()

    def _head_load(self) -> BaseLoad | None:
        """The base load the queue's head needs (a head that cannot be resolved is answered and
        dropped); None once the queue is empty."""
        while True:
            with self._waiting.changed:
                r = self._waiting.head()
                if r is None:
                    return None
            try:
                return self._resolved(r)[0]
            except Exception as exc:  # noqa: BLE001 - a sentence for this request, the others go on
                with self._waiting.changed:
                    self._waiting.pop()
                self._fail(r, str(exc))

    def _resolved(self, r: Request):
        if not hasattr(r, "_resolved"):
            r._resolved = self.resolve(r.ref)
        return r._resolved

    def _admit(self, batch: Batch, load: BaseLoad, pg: Playground, batch_id: str) -> None:
        """Let waiting requests for ``load`` join ``batch`` while it has room, in queue order."""
        joiners, names, keys = [], [], []
        while len(batch.rows) + len(joiners) < self.max_batch and batch.open_to_newcomers():
            with self._waiting.changed:
                r = self._waiting.head()
                if r is None:
                    break
                if r.cancelled.is_set():  # the client went away while it waited
                    self._waiting.pop()
                    continue
                try:
                    r_load, prepare = self._resolved(r)
                except Exception as exc:  # noqa: BLE001
                    self._waiting.pop()
                    self._fail(r, str(exc))
                    continue
                if r_load != load:  # its base's turn comes when this batch drains
                    break
                self._waiting.pop()
            try:
                name = prepare(pg)
            except Exception as exc:  # noqa: BLE001 - a sentence for this request, the others go on
                self._fail(r, str(exc))
                continue
            # the log names the bytes that answer, not the disk's
            r.weights_sha256 = pg.weights_sha256(name)
            r.batch_id, r.started_at = batch_id, time.monotonic()
            joiners.append(r)
            names.append(name)
            keys.append((pg.base_ref, pg.base_load, pg.base_loads, r.weights_sha256 or name))
        if not joiners:
            return
        try:
            batch.join(joiners, names, keys)
        except Exception as exc:  # noqa: BLE001 - the newcomers' prefill failed; the batch goes on
            log.exception("a prefill in batch %s failed", batch_id)
            for r in joiners:
                if r.finished_at is None:
                    self._fail(r, f"Generation failed: {type(exc).__name__}: {exc}")
            return
        refs = {row.r.ref or BASE_ADAPTER for row in batch.rows} | {r.ref or BASE_ADAPTER for r in joiners}
        for row in batch.rows:
            row.r.batch_refs = sorted(set(row.r.batch_refs) | refs)
        for r in joiners:  # those that ended at their prefill (one token, an end of turn, echo only)
            if not r.batch_refs:
                r.batch_refs = sorted(refs)
        for r in joiners:
            self._timed(r)

    def _lend(self, batch: Batch, load: BaseLoad, pg: Playground) -> None:
        """Let whoever waits for the playground have it between two steps, then go on with the
        rows' adapters loaded again (they may have been evicted meanwhile)."""
        batch.close_route()
        pg.lend(load)
        self.counters.lends += 1
        names = []
        for row in batch.rows:
            try:
                names.append(self._resolved(row.r)[1](pg))
            except Exception as exc:  # noqa: BLE001 - e.g. the run was deleted meanwhile
                self._fail(row.r, str(exc))
                row.done = True
                names.append(BASE_ADAPTER)
        batch.reprepare(names)
        batch.drop_finished()

    def _timed(self, r: Request) -> None:
        """Keep a running mean of how long a request takes (Retry-After is estimated from it)."""
        if r.finished_at is not None:
            self._request_s = 0.8 * self._request_s + 0.2 * (r.finished_at - r.submitted_at)

    @staticmethod
    def _fail(r: Request, message: str) -> None:
        r.finished_at = time.monotonic()
        r.events.put(("error", message))

    def prometheus(self) -> str:
        """The engine's gauges and counters in Prometheus' text format."""
        c = self.counters
        series = [
            ("queue_waiting", "gauge", "Requests waiting to join the batch.", {"": len(self._waiting)}),
            ("batch_rows", "gauge", "Rows in the running batch.", {"": self.running}),
            (
                "rejected_total",
                "counter",
                "Requests refused (503: the queue was full; 429: the client had its share waiting).",
                {'{reason="queue_full"}': c.rejected_full, '{reason="client_share"}': c.rejected_client},
            ),
            ("decode_steps_total", "counter", "Decode steps run.", {"": c.steps}),
            ("decode_rows_total", "counter", "Rows decoded, summed over steps.", {"": c.rows_stepped}),
            ("playground_lends_total", "counter", "Times the batch paused for the Chat tab.", {"": c.lends}),
        ]
        if self.prefix_cache is not None:
            p = self.prefix_cache.snapshot()
            series += [
                ("prefix_cache_lookups_total", "counter", "Prompts looked up.", {"": p.lookups}),
                ("prefix_cache_hits_total", "counter", "Prompts that reused a cached start.", {"": p.hits}),
                ("prefix_cache_hit_rate", "gauge", "Hits per lookup.", {"": round(p.hits / max(1, p.lookups), 4)}),
                ("prefix_cache_reused_tokens_total", "counter", "Prompt tokens reused.", {"": p.tokens_reused}),
                ("prefix_cache_computed_tokens_total", "counter", "Prompt tokens prefilled.", {"": p.tokens_computed}),
                ("prefix_cache_bytes", "gauge", "Bytes the prefix cache holds.", {"": self.prefix_cache.bytes}),
            ]
        lines = []
        for name, kind, help_text, values in series:
            name = f"finetune_studio_{name}"
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
            lines += [f"{name}{labels} {value}" for labels, value in values.items()]
        return "\n".join(lines) + "\n"
