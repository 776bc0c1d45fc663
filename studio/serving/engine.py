"""Batched generation for many requests on one base model, each request with its own adapter.

Requests wait in a queue; the engine thread takes the first one, waits ``max_wait_s`` for more
(up to ``max_batch``), and decodes them together: one forward per token serves every row, each
row through its own LoRA adapter or none (PEFT's mixed-batch ``adapter_names``: the base layer
runs once for the whole batch, each adapter's low-rank update only on its own rows). Rows are
left-padded with explicit position ids, so a row's logits are those it gets alone (tests
compare each row with the same request run by itself).

Rows that need a different base load (a QLoRA run's 4-bit base, another precision) form their
own sub-batch: a mixed batch shares one base. The playground's lock is held for a whole batch,
so the Chat tab and the endpoint never see each other's half-loaded state.

Per row: its own sampling settings and seeded generator, its own stop strings (text is held back
while it could still be the start of one), its own max tokens; a cancelled row (the client went
away) stops at the next step. A row that asks for log-probabilities gets each generated token
scored, and with ``echo`` every prompt token too, from the prefill that every row runs anyway
(studio/serving/logprobs.py); only then does the prefill keep logits for all positions.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch

from studio.inference.playground import BASE_ADAPTER, BaseLoad, Playground, SamplingSettings, sampling_processors
from studio.planning import precision
from studio.serving.logprobs import Scored, score
from studio.serving.routing import can_route, routed

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
    batch_id: str | None = None  # "7", or "7.2" for the second base load of gathered batch 7
    batch_refs: list[str] = field(default_factory=list)  # every row decoded in that batch
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


_CLOSE = object()  # queued by Engine.close: the decoding thread ends when it reaches it


class Engine:
    """The background decoder. ``submit`` never blocks; the caller reads ``request.events``."""

    def __init__(self, playground: Playground, resolve, max_batch: int = 8, max_wait_s: float = 0.01):
        """``resolve(ref) -> (BaseLoad, prepare)``: the base a ref needs, and ``prepare(playground)``
        that loads its adapter inside ``Playground.serving`` and returns the adapter's name
        (raises LookupError or ValueError with a sentence for a ref that cannot be served)."""
        self.playground = playground
        self.resolve = resolve
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self._queue: queue.Queue[Request] = queue.Queue()
        self._batch_ids = itertools.count(1)
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()

    def submit(self, request: Request) -> Request:
        with self._start_lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="serving-engine", daemon=True)
                self._thread.start()
        self._queue.put(request)
        return request

    def close(self, timeout: float = 30.0) -> None:
        """End the decoding thread once the requests already queued are done, and wait for it (an
        engine made for one job, such as an evaluation, leaves no thread behind: a process that
        exits while a thread that ran torch is still alive aborts, "terminate called without an
        active exception", exit code 134). A later submit starts a new thread."""
        with self._start_lock:
            thread = self._thread
            if thread is None or not thread.is_alive():
                return
            self._queue.put(_CLOSE)
        thread.join(timeout)

    def _loop(self) -> None:
        while True:
            try:
                if self._next_batch() is _CLOSE:
                    return
            except Exception:  # noqa: BLE001 - the engine outlives any one batch
                log.exception("the serving engine's batch loop failed; it goes on")

    def _next_batch(self):
        """Wait for a request, gather what arrives within ``max_wait_s`` (up to ``max_batch``), decode;
        ``_CLOSE`` once the close marker is reached."""
        first = self._queue.get()
        if first is _CLOSE:
            return _CLOSE
        batch = [first]
        deadline = time.monotonic() + self.max_wait_s
        closing = False
        while len(batch) < self.max_batch:
            try:
                nxt = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if nxt is _CLOSE:
                closing = True
                break
            batch.append(nxt)
        batch = [r for r in batch if not r.cancelled.is_set()]
        if batch:
            self._run(batch)
        return _CLOSE if closing else None

    def _run(self, batch: list[Request]) -> None:
        batch_id = next(self._batch_ids)
        groups: dict[BaseLoad, list[tuple[Request, Any]]] = {}
        for r in batch:
            try:
                load, prepare = self.resolve(r.ref)
            except Exception as exc:  # noqa: BLE001 - a sentence for this row, the others go on
                self._fail(r, str(exc))
                continue
            groups.setdefault(load, []).append((r, prepare))
        for n, (load, rows) in enumerate(groups.items(), 1):
            refs = [r.ref or BASE_ADAPTER for r, _ in rows]
            name = str(batch_id) if len(groups) == 1 else f"{batch_id}.{n}"  # one decode per base load
            for r, _ in rows:
                r.batch_id, r.batch_refs, r.started_at = name, refs, time.monotonic()
            try:
                with self.playground.serving(load) as pg:
                    names = [prepare(pg) for _, prepare in rows]
                    for (r, _), name in zip(rows, names):  # the log names the bytes that answer, not the disk's
                        r.weights_sha256 = pg.weights_sha256(name)
                    _decode(pg, [r for r, _ in rows], names, load.precision)
            except Exception as exc:  # noqa: BLE001 - a failed batch answers every row, the engine goes on
                log.exception("batch %s failed", batch_id)
                for r, _ in rows:
                    if r.finished_at is None:
                        self._fail(r, f"Generation failed: {type(exc).__name__}: {exc}")

    @staticmethod
    def _fail(r: Request, message: str) -> None:
        r.finished_at = time.monotonic()
        r.events.put(("error", message))


@torch.no_grad()
def _decode(pg: Playground, rows: list[Request], names: list[str], run_precision: str) -> None:
    """Decode ``rows`` together, one token per row per step, until every row is done."""
    device = pg.device
    pad = pg.tokenizer.pad_token_id if pg.tokenizer.pad_token_id is not None else 0
    width = max(len(r.prompt_ids) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):  # left padding: every row's next token lands in the last column
        ids[i, width - len(r.prompt_ids) :] = torch.tensor(r.prompt_ids)
        mask[i, width - len(r.prompt_ids) :] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    states = [_Row(r, pg, device) for r in rows]
    peft = hasattr(pg.model, "peft_config")
    # Rows with adapters are routed to their own in every LoRA layer (routing.py: two matmuls a
    # layer, faster than PEFT's own forward even for one adapter); where routing cannot, one
    # adapter runs PEFT's plain forward and several its mixed batch. Only the base: adapters off.
    mixed, context = {}, nullcontext()
    if peft and set(names) == {BASE_ADAPTER}:
        context = pg.one_adapter(BASE_ADAPTER)
    elif peft and can_route(pg.model, names):
        context = routed(pg.model, names)
    elif peft and len(set(names)) == 1:
        context = pg.one_adapter(names[0])
    elif peft:
        mixed = {"adapter_names": names}
    try:
        with context:
            _steps(pg, states, ids, mask, positions, mixed, run_precision)
    finally:
        # PEFT's mixed-batch hooks are removed by a context manager without try/finally: a
        # forward that raised would leave them on every LoRA layer, steering later requests.
        if mixed:
            _drop_adapter_name_hooks(pg.model)
    for s in states:
        s.finish("length")


def _steps(pg, states: list[_Row], ids, mask, positions, mixed: dict, run_precision: str) -> None:
    device, rows = pg.device, len(states)
    eos = pg.eos_ids()
    cache, step_input = None, ids
    # The prefill keeps the logits of every position only for rows that score their prompt: on
    # the default model that is 49k floats per prompt token, which generation never reads.
    keep = 0 if any(s.r.wants_prompt_scores for s in states) else 1
    for step in range(max(1, max(s.r.settings.max_new_tokens for s in states))):
        if all(s.done for s in states):
            break
        with precision.autocast(device, run_precision):
            out = pg.model(
                input_ids=step_input,
                attention_mask=mask,
                position_ids=positions,
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=keep if step == 0 else 1,
                **mixed,
            )
        cache = out.past_key_values
        if step == 0 and keep == 0:
            _score_prompts(states, out.logits)
        logits = out.logits[:, -1, :].float()
        tokens = [s.advance(logits[i : i + 1], eos) for i, s in enumerate(states)]
        step_input = torch.tensor(tokens, device=device).unsqueeze(-1)
        mask = torch.cat([mask, torch.ones((rows, 1), dtype=mask.dtype, device=device)], dim=-1)
        positions = positions[:, -1:] + 1


def _score_prompts(states: list[_Row], logits: torch.Tensor) -> None:
    """Each echo row's prompt tokens 2..n, scored from the prefill: rows are left-padded, so a
    prompt of n tokens fills the last n columns, and column j predicts column j + 1."""
    width = logits.shape[1]
    for i, s in enumerate(states):
        ids = s.r.prompt_ids
        if s.r.wants_prompt_scores and len(ids) > 1:
            s.r.prompt_scores = score(logits[i, width - len(ids) : width - 1], ids[1:], s.r.logprobs)


def _drop_adapter_name_hooks(model) -> None:
    for module in model.modules():
        for key, hook in list(module._forward_pre_hooks.items()):
            if getattr(getattr(hook, "func", None), "__name__", "") == "_adapter_names_pre_forward_hook":
                del module._forward_pre_hooks[key]
                module._forward_pre_hooks_with_kwargs.pop(key, None)


class _Row:
    """One row's sampling state and its streamed text."""

    def __init__(self, request: Request, pg: Playground, device: str):
        self.r = request
        self.tokenizer = request.tokenizer or pg.tokenizer
        self.ids = torch.tensor([request.prompt_ids], device=device)
        self.generated: list[int] = []
        self.sent = 0  # characters of text already sent
        self.done = False
        self.processors = sampling_processors(request.settings)
        self.generator = torch.Generator(device=device).manual_seed(request.settings.seed)

    def advance(self, logits: torch.Tensor, eos: set[int]) -> int:
        """Pick this row's next token; returns the token to feed (a finished row feeds its last)."""
        if self.done:
            return self.generated[-1] if self.generated else self.r.prompt_ids[-1]
        if self.r.cancelled.is_set():
            self.finish("stop")
            return self.r.prompt_ids[-1]
        if self.r.settings.max_new_tokens == 0:  # echo only: the prompt was scored, nothing to add
            self.finish("length")
            return self.r.prompt_ids[-1]
        scores = self.processors(self.ids, logits)
        if self.r.settings.temperature > 0:
            token = torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=self.generator)
        else:
            token = scores.argmax(dim=-1, keepdim=True)
        tid = int(token)
        self.r.output_ids.append(tid)  # evaluation teacher-forces these exact tokens (regression.py)
        if self.r.logprobs is not None:  # from the raw logits, before any sampling setting
            self.r.scores += score(logits, [tid], self.r.logprobs)
        if self.r.first_token_at is None:
            self.r.first_token_at = time.monotonic()
        if tid in eos and not self.r.ignore_eos:
            self.finish("stop")
            return tid
        self.generated.append(tid)
        self.ids = torch.cat([self.ids, token.view(1, 1)], dim=-1)
        self._emit()
        if not self.done and len(self.generated) >= self.r.settings.max_new_tokens:
            self.finish("length")
        return tid

    def _emit(self) -> None:
        text = self.tokenizer.decode(self.generated, skip_special_tokens=True)
        for stop in self.r.stop:
            at = text.find(stop)
            if at != -1:
                self._send(text[:at])
                self.finish("stop")
                return
        # Hold back what could still become a stop string, and a half-decoded character.
        safe = len(text) - max((_overlap(text, s) for s in self.r.stop), default=0)
        if text.endswith("\ufffd"):
            safe = min(safe, len(text) - 1)
        self._send(text[:safe])

    def _send(self, text: str) -> None:
        if len(text) > self.sent:
            self.r.events.put(("text", text[self.sent :]))
            self.sent, self.r.text = len(text), text

    def finish(self, reason: str) -> None:
        if self.done:
            return
        if not self.r.cancelled.is_set():  # the text held back for stop strings goes out now
            text = self.tokenizer.decode(self.generated, skip_special_tokens=True)
            cut = min((text.find(s) for s in self.r.stop if s in text), default=len(text))
            self._send(text[:cut])
        self.done = True
        self.r.completion_tokens = len(self.generated)
        self.r.finish_reason = reason
        self.r.finished_at = time.monotonic()
        self.r.events.put(("done", None))


def _overlap(text: str, stop: str) -> int:
    """Length of the longest end of ``text`` that is a start of ``stop``."""
    for n in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0
