"""One base model in memory, many adapters by name; base and adapted replies streamed together.

The base side is the *same* loaded model with its LoRA layers switched off (see _base_context), so
the comparison is honest and switching adapters never reloads the base. Both replies are
decoded in one loop, a token for each side per step, each with its own KV cache and its own
random generator seeded identically, so both panes stream at once under the same settings.

Adapters stay loaded after use (switching back is a pointer change, not a disk read), bounded
by ``max_adapters`` and ``max_adapter_bytes``: the least recently used is dropped first. A loaded
adapter is keyed by its files as well as its ref: when a run re-saves (new files under the same
ref), the next request loads the new weights and drops the old (see ``_current``). Before
an adapter is loaded, the base fingerprint it was trained on is compared with the loaded base
(studio/runs/fingerprint.py): another base is refused, a different tokenizer or template warned about.
The OpenAI-compatible API (studio/serving) decodes its batches on this same base and adapters.
"""

from __future__ import annotations

import re
import threading
import time
from collections import OrderedDict
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, NamedTuple

import torch

from studio import models
from studio.data.render import labeled_tokens
from studio.planning import hardware, precision
from studio.runs import files, fingerprint
from studio.runs.registry import Run

CHECKPOINT_SEP = "@"  # "run-id@step-40" names a run's checkpoint, "run-id@v2" one of its versions
BASE_ADAPTER = "__base__"  # PEFT's name for "no adapter" in a mixed batch's adapter_names
ADAPTER_FILES = ("*.safetensors", "adapter_config.json")  # what an adapter is on disk: a change reloads it


def split_ref(ref: str) -> tuple[str, str | None]:
    """ "run@step-40" -> ("run", "step-40"); "run@v2" -> ("run", "v2"); "run" -> ("run", None)."""
    run_id, _, ckpt = ref.partition(CHECKPOINT_SEP)
    return run_id, ckpt or None


@dataclass
class SamplingSettings:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int = 0

    def problems(self) -> list[str]:
        p = []
        if not 1 <= self.max_new_tokens <= 4096:
            p.append(f"Max new tokens must be between 1 and 4096 (got {self.max_new_tokens}).")
        if not 0 <= self.temperature <= 5:
            p.append(f"Temperature must be between 0 (greedy) and 5 (got {self.temperature}).")
        if not 0 < self.top_p <= 1:
            p.append(f"Top-p must be above 0 and at most 1 (got {self.top_p}).")
        if not 1 <= self.repetition_penalty <= 5:
            p.append(f"Repetition penalty must be between 1 (off) and 5 (got {self.repetition_penalty}).")
        return p


class BaseLoad(NamedTuple):
    """How a base model is loaded: adapters that share one can share a batch."""

    model: str  # the model reference (default, a hub id, a folder)
    method: str  # "lora" (dense weights) or "qlora" (4-bit NF4)
    precision: str  # "bf16" | "fp32"
    trust_remote_code: bool = False


@dataclass
class LoadedAdapter:
    name: str  # the PEFT adapter name (a sanitised ref, plus "_rN" after the Nth reload)
    bytes: int  # its weights on disk, for the memory bound
    precision: str = "fp32"  # the run's precision: its scores and replies are computed in it
    run: Run | None = None  # where it came from, to notice a re-save (see Playground._current)
    checkpoint: str | None = None
    weights: Path | None = None  # the folder it was loaded from
    stamp: tuple = ()  # files.stamp of that folder when loaded
    sha256: str | None = None  # its weights' hash (the request log prints it)
    reloads: int = 0


def _ref(run_id: str, checkpoint: str | None) -> str:
    return run_id if checkpoint is None else f"{run_id}{CHECKPOINT_SEP}{checkpoint}"


def _adapter_name(ref: str) -> str:
    # PEFT keeps adapters in ModuleDicts: names must not contain dots.
    return re.sub(r"[^A-Za-z0-9_-]", "_", ref)


def _weights_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


class Playground:
    """One base model in memory and many adapters on it, chosen per request.

    ``activate`` loads a run's adapter (or checkpoint) onto the base after checking its
    fingerprint; up to ``max_adapters`` stay loaded (least recently used goes first).
    ``stream_pair`` streams the base (adapter disabled) and an adapter answering the same
    prompt. A full fine-tuning run is a whole model and is loaded on its own.
    """

    def __init__(self, device: str = "cpu", max_adapters: int = 8, max_adapter_bytes: int = 2 * 2**30):
        self.device = device
        self.max_adapters = max_adapters
        self.max_adapter_bytes = max_adapter_bytes
        self.base_ref: str | None = None
        self.base_load: tuple[str, str] | None = None  # (method, precision) the base was loaded for
        self.base_fingerprint: dict | None = None
        self.tokenizer = None
        self.model = None  # a PeftModel once an adapter is loaded, else the plain base
        self.adapters: OrderedDict[str, LoadedAdapter] = OrderedDict()  # by ref, least recent first
        self.active: str | None = None  # the ref on the adapted pane
        self.full_models: dict[str, tuple[torch.nn.Module, str]] = {}  # ref -> (model, precision); one kept
        self.base_loads = 0  # how many times a base was loaded (tests assert swaps don't reload)
        self.last_load_s = 0.0  # how long the last activate() took (the Chat tab shows it)
        self._adapter_layers: list = []  # PEFT layers the base pane switches off (see _base_context)
        self._pinned: set[str] = set()  # adapters a serving batch uses: never evicted during it
        self._lock = _CountingLock()

    # ---- loading ---------------------------------------------------------------------------
    def _ensure_base(self, ref: str, load: tuple[str, str], trust_remote_code: bool = False) -> None:
        """Load the base model ``ref`` for ``load`` = (method, precision) unless it is loaded.
        The base is loaded the way the run's trainer loaded it (4-bit for QLoRA, the weights'
        dtype from studio/planning/precision.py), so base and adapter scores here are the training log's
        numbers. A run trained another way on the same base reloads it; with ``auto`` precision
        every LoRA run on a machine shares one."""
        if self.base_ref == ref and self.base_load == load and self.model is not None and not self._base_replaced():
            return
        self.model, self._adapter_layers = None, []  # let the old base go before the new one arrives
        self.full_models, self.adapters, self.active = {}, OrderedDict(), None
        self.tokenizer = models.load_tokenizer(ref, trust_remote_code)
        self.model = models.load_model(ref, load[0], self.device, load[1], trust_remote_code)
        self.model.eval()
        self.base_fingerprint = fingerprint.fingerprint(self.model.config, self.tokenizer, ref)
        self.base_ref, self.base_load = ref, load
        self.base_loads += 1

    def _base_replaced(self) -> bool:
        """The loaded base's files on disk now hold other weights (updated or replaced under the
        same name): it is loaded again, so nobody is answered by weights no longer there. A few
        stat calls per batch (the digest is kept per version of the files)."""
        loaded = (self.base_fingerprint or {}).get("weights")
        now = fingerprint.current_digest(self.base_ref) if loaded else None
        return now is not None and now != loaded

    @staticmethod
    def weights_for(run: Run, checkpoint: str | None = None) -> Path:
        """The weights folder for a run's latest version, one of its versions (``vN``) or one of
        its checkpoints (``step-N``). Raises ValueError naming what the run has."""
        return run.weights_at(checkpoint)

    def activate(self, run: Run, checkpoint: str | None = None) -> list[str]:
        """Make a trained run (or one of its checkpoints) the adapted side, loading its base only
        if it differs from the loaded one. Returns warnings (tokenizer or template differences).

        Raises:
            ValueError: no weights, or the adapter was trained on another base (names both).
            ModelError: the base cannot be loaded.
        """
        started = time.perf_counter()
        with self._lock:
            cfg = run.config()
            ref = _ref(run.id, checkpoint)
            weights = self.weights_for(run, checkpoint)
            run_precision = precision.of_status(run.status())
            self._ensure_base(cfg.model, base_load_for(cfg.method, run_precision, self.device), cfg.trust_remote_code)
            warnings = self._check(run, weights)
            if cfg.method == "full":
                if ref not in self.full_models:
                    model = models.load_model(str(weights), "full", self.device).eval()
                    self.full_models = {ref: (model, run_precision)}
            elif not self._current(ref):
                self._load_adapter(ref, weights, run_precision, run, checkpoint)
            self.active = ref
            if ref in self.adapters:
                self.adapters.move_to_end(ref)  # most recently used
                self.model.set_adapter(self.adapters[ref].name)
        self.last_load_s = time.perf_counter() - started
        return warnings

    def _check(self, run: Run, weights: Path, accept_changed_base: bool = False) -> list[str]:
        """The fingerprint check before a load: raises ValueError (another base), else warnings.
        ``accept_changed_base``: the same base with other weights only warns (an evaluation on it)."""
        trained_on = fingerprint.read(weights) or run.fingerprint()  # a version keeps the base it trained on
        errors, warnings = (
            fingerprint.compare(trained_on, self.base_fingerprint, run.path, accept_changed_base)
            if trained_on
            else ([], [])
        )
        if errors:
            raise ValueError(errors[0])
        return warnings

    def _current(self, ref: str) -> bool:
        """Whether ``ref`` is loaded and still the files on disk. A run that re-saved (same ref, new
        files) is not: the caller loads it again. Checked per request at the cost of a few stat
        calls; an adapter pinned by the running batch counts as current, so rows already decoding
        (and rows of the same batch) keep the weights the batch started with."""
        loaded = self.adapters.get(ref)
        if loaded is None:
            return False
        if ref in self._pinned or loaded.run is None:
            return True
        try:
            weights = self.weights_for(loaded.run, loaded.checkpoint)
            return weights == loaded.weights and files.stamp(weights, ADAPTER_FILES) == loaded.stamp
        except (ValueError, OSError):  # the files are gone mid-save: keep serving what is loaded
            return True

    def _load_adapter(self, ref: str, weights: Path, run_precision: str, run: Run, checkpoint: str | None) -> None:
        """Load ``weights`` as ``ref`` (again, when its files changed) and make it the model's set
        adapter. Refs that name the same files (a run's id and ``RUN@vN`` of its latest version,
        asked by the Chat tab and the API) share one loaded copy. A reload loads the new weights
        under a new PEFT name first and then drops the old (PEFT cannot delete a model's last
        adapter), so memory holds one copy per set of files."""
        from peft import PeftModel

        old = self.adapters.get(ref)
        stamp = files.stamp(weights, ADAPTER_FILES)
        twin = next(
            (a for r, a in self.adapters.items() if r != ref and (a.weights, a.stamp) == (weights, stamp)), None
        )
        reloads = old.reloads + 1 if old is not None else 0
        if twin is not None:  # the same files are loaded under another ref: share them
            name = twin.name
        else:
            name = _adapter_name(ref) + (f"_r{reloads}" if reloads else "")
            if not self.adapters and not isinstance(self.model, PeftModel):
                self.model = PeftModel.from_pretrained(self.model, str(weights), adapter_name=name)
            else:
                self.model.load_adapter(str(weights), adapter_name=name)
            self.model.eval()
        self.model.set_adapter(name)  # PEFT warns when the set adapter is deleted
        if old is not None:  # the new copy is in the model already, so the old one may go
            self.adapters.pop(ref)
            if old.name != name and all(a.name != old.name for a in self.adapters.values()):
                self.model.delete_adapter(old.name)
        sha = files.weights_sha256(weights)
        self.adapters[ref] = LoadedAdapter(
            name, _weights_bytes(weights), run_precision, run, checkpoint, weights, stamp, sha, reloads
        )
        self._evict(keep=ref)
        self._adapter_layers = _peft_layers(self.model)

    def _drop(self, ref: str) -> None:
        """Forget ``ref``; its PEFT adapter goes too unless another ref shares it (the last
        adapter of the model stays: PEFT cannot delete it; unload() takes the layers out)."""
        name = self.adapters.pop(ref).name
        if self.adapters and all(a.name != name for a in self.adapters.values()):
            self.model.delete_adapter(name)

    def copies(self) -> int:
        """Adapter copies in memory (refs that share files count once)."""
        return len({a.name for a in self.adapters.values()})

    def weights_sha256(self, name: str) -> str | None:
        """The weights hash of the loaded adapter whose PEFT name is ``name`` (what the request log
        prints: the bytes that actually answered), None for the base."""
        return next((a.sha256 for a in self.adapters.values() if a.name == name), None)

    def _evict(self, keep: str) -> None:
        """Drop least recently used adapters beyond the count or byte budget (never ``keep``)."""

        def over() -> bool:
            total = sum({a.name: a.bytes for a in self.adapters.values()}.values())  # shared copies once
            return self.copies() > self.max_adapters or total > self.max_adapter_bytes

        while over():
            spare = [r for r in self.adapters if r != keep and r not in self._pinned]
            if not spare:  # everything left is in use by this batch: over budget until it ends
                return
            self._drop(spare[0])

    def unload(self, run_id: str) -> None:
        """Forget a run's adapters and checkpoints (the run was deleted)."""
        with self._lock:
            for ref in [r for r in self.adapters if split_ref(r)[0] == run_id]:
                if len(self.adapters) > 1:
                    self._drop(ref)
                else:  # PEFT cannot delete its last adapter: take the LoRA layers out instead
                    self.adapters.pop(ref)
                    self.model = self.model.unload()
            self._adapter_layers = _peft_layers(self.model)
            self.full_models = {r: m for r, m in self.full_models.items() if split_ref(r)[0] != run_id}
            if self.active and split_ref(self.active)[0] == run_id:
                self.active = None

    def loaded(self) -> list[str]:
        """Loaded adapter refs, most recently used last."""
        return list(self.adapters)

    # ---- serving (studio/serving/engine.py) --------------------------------------------------
    @contextmanager
    def serving(self, load: BaseLoad):
        """Hold the playground for one batch of requests on the base ``load``: the lock for the
        whole batch, the base loaded, and no adapter this batch loads evicted until it ends."""
        with self._lock:
            self._ensure_base(load.model, (load.method, load.precision), load.trust_remote_code)
            self._pinned = set()
            try:
                yield self
            finally:
                self._pinned = set()

    def others_waiting(self) -> bool:
        """Inside ``serving``: another thread (the Chat tab, an evaluation) waits for the playground."""
        return self._lock.waiting > 0

    def lend(self, load: BaseLoad, patience_s: float = 0.5) -> None:
        """Inside ``serving``: let the threads waiting for the playground have it, then take it back
        (and ``load`` loaded again if they changed the base). The adapters pinned for the batch may
        be evicted meanwhile: the caller prepares them again."""
        self._lock.release()
        deadline = time.monotonic() + patience_s
        while self._lock.waiting and time.monotonic() < deadline:  # until one of them has it
            time.sleep(0.001)
        self._lock.acquire()
        self._pinned = set()
        self._ensure_base(load.model, (load.method, load.precision), load.trust_remote_code)

    def serve_adapter(self, run: Run, checkpoint: str | None = None, accept_changed_base: bool = False) -> str:
        """Inside ``serving``: load a run's adapter (fingerprint checked) without changing what
        the Chat tab has active; returns its PEFT adapter name. ``accept_changed_base``: see _check
        (the caller unloads it afterwards, so nobody else gets it unchecked)."""
        ref = _ref(run.id, checkpoint)
        if not self._current(ref):  # not loaded, or the run re-saved since
            weights = self.weights_for(run, checkpoint)
            self._check(run, weights, accept_changed_base)
            self._load_adapter(ref, weights, precision.of_status(run.status()), run, checkpoint)
            if self.active in self.adapters:  # the Chat tab's choice stays what it was
                self.model.set_adapter(self.adapters[self.active].name)
        else:
            self.adapters.move_to_end(ref)
        self._pinned.add(ref)
        return self.adapters[ref].name

    @contextmanager
    def one_adapter(self, name: str):
        """Inside ``serving``: every row through adapter ``name`` (BASE_ADAPTER: none) on the plain
        forward. PEFT's per-row routing (``adapter_names``) indexes each LoRA layer's rows
        apart, which made a lone adapter request decode at half the base's speed on CPU."""
        if name == BASE_ADAPTER:
            with self._base_context():
                yield
            return
        self.model.set_adapter(name)
        try:
            yield
        finally:
            if self.active in self.adapters:  # the Chat tab's choice stays what it was
                self.model.set_adapter(self.adapters[self.active].name)

    def eos_ids(self) -> set[int]:
        """Token ids that end a reply: the tokenizer's and generation config's end tokens."""
        return _eos_ids(self.tokenizer, self.model)

    # ---- generation ------------------------------------------------------------------------
    def _base_context(self):
        """Adapters off for the base pane. PEFT's own ``disable_adapter()`` costs ~58 ms per
        call on the default model (it walks every module twice and builds a status report), and
        the base pane enters it once per generated token, which made the base pane 2x slower
        than the adapted one; toggling the PEFT layers found once per adapter change costs
        about 1 ms. Keyed on the model, not our adapter list: a PeftModel always has an adapter
        in its layers, and the base pane must never run one (Unsloth Studio's issue #4503)."""
        if not hasattr(self.model, "peft_config"):
            return nullcontext()
        return _adapters_off(self._adapter_layers)

    def _use(self, ref: str | None) -> tuple[torch.nn.Module, str]:
        """The adapted side's model for ``ref`` (default: the active one), its adapter set now,
        and the run's precision (both panes compute in it), under the lock. Each request names
        its adapter, so a second browser session switching adapters cannot change what a reply
        that is already streaming is generated with."""
        ref = ref or self.active
        if self.model is None or ref is None:
            raise ValueError("Pick a trained run first.")
        if ref in self.full_models:
            return self.full_models[ref]
        if ref not in self.adapters:
            raise ValueError(f"{ref} is no longer loaded (another session loaded others since); pick it again.")
        if not self._current(ref):  # the run re-saved since it was picked: chat with the new weights
            loaded = self.adapters[ref]
            weights = self.weights_for(loaded.run, loaded.checkpoint)
            self._check(loaded.run, weights)
            self._load_adapter(ref, weights, precision.of_status(loaded.run.status()), loaded.run, loaded.checkpoint)
        self.model.set_adapter(self.adapters[ref].name)
        return self.model, self.adapters[ref].precision

    def encode(self, messages: list[dict[str, str]]) -> torch.Tensor:
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        enc = self.tokenizer(ids, add_special_tokens=False, return_tensors="pt")
        return enc["input_ids"].to(self.device)

    def stream_pair(
        self, base_messages, adapted_messages, settings: SamplingSettings, ref: str | None = None
    ) -> Iterator[tuple[str, str]]:
        """Yield (base_text, adapted_text) so far, one token more per side each step. ``ref``
        names the adapter (a run id or ``id@step-N``; default: the last activated)."""
        if self.model is None or (ref or self.active) is None:
            raise ValueError("Pick a trained run first.")
        yield from self.stream_ids(self.encode(base_messages), self.encode(adapted_messages), settings, ref)

    def stream_ids(
        self, base_ids: torch.Tensor, adapted_ids: torch.Tensor, settings: SamplingSettings, ref: str | None = None
    ) -> Iterator[tuple[str, str]]:
        """Like stream_pair, from already-templated prompt ids (held-out rows use these)."""
        problems = settings.problems()
        if problems:
            raise ValueError(" ".join(problems))
        with self._lock:
            adapted_model, run_precision = self._use(ref)
            sides = [
                _Side(self.model, self._base_context, base_ids.to(self.device), settings, run_precision),
                _Side(adapted_model, nullcontext, adapted_ids.to(self.device), settings, run_precision),
            ]
            eos = _eos_ids(self.tokenizer, self.model)
            for _ in range(settings.max_new_tokens):
                if all(s.done for s in sides):
                    break
                for s in sides:
                    s.advance(eos)
                yield tuple(self.tokenizer.decode(s.generated, skip_special_tokens=True) for s in sides)

    @torch.no_grad()
    def loss(self, batches, adapted: bool, ref: str | None = None) -> tuple[float, int]:
        """(summed token loss, token count) of the base (``adapted=False``) or the adapter
        ``ref`` (default: the active one) over batches of {"input_ids", "attention_mask", "labels"}:
        the trainer's own loss, so the numbers compare with the eval losses recorded in training."""
        from studio.training.loss import LabeledTokenLoss

        with self._lock:
            adapted_model, run_precision = self._use(ref)
            loss_fn = LabeledTokenLoss(adapted_model if adapted else self.model)
            context = nullcontext if adapted else self._base_context
            total, count = 0.0, 0
            for batch in batches:
                batch = {k: v.to(self.device) for k, v in batch.items()}
                n = labeled_tokens(batch)
                with context(), precision.autocast(self.device, run_precision):
                    total += float(loss_fn(**batch)) * n
                count += n
            return total, count


class _CountingLock:
    """A lock that knows whether anyone waits for it: the serving engine holds the playground
    while its batch runs and lends it between two steps when someone does."""

    def __init__(self):
        self._lock = threading.Lock()
        self._guard = threading.Lock()
        self.waiting = 0

    def acquire(self) -> None:
        with self._guard:
            self.waiting += 1
        try:
            self._lock.acquire()
        finally:
            with self._guard:
                self.waiting -= 1

    def release(self) -> None:
        self._lock.release()

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def base_load_for(method: str, run_precision: str, device: str) -> tuple[str, str]:
    """How the playground loads the base for a run, as its trainer did: (load method, precision).
    A full fine-tune's base was scored in training as fp32 weights (under the run's autocast),
    which is what a LoRA load at fp32 gives; a LoRA base loads in the run's compute dtype; a
    QLoRA base in 4-bit NF4 where bitsandbytes can run here (an adapter imported onto a machine
    without it chats on the full-precision base instead, close to but not exactly as trained)."""
    if method == "full":
        return "lora", "fp32"
    if method == "qlora" and hardware.bnb_4bit_support(device == "cuda", device == "mps").get(device) != "yes":
        return "lora", run_precision
    return method, run_precision


def _peft_layers(model) -> list:
    """Every PEFT layer whose adapters ``disable_adapter()`` would switch off: LoRA layers and
    modules_to_save copies (imported adapters may carry those)."""
    if not hasattr(model, "peft_config"):
        return []
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import ModulesToSaveWrapper

    return [m for m in model.modules() if isinstance(m, (BaseTunerLayer, ModulesToSaveWrapper))]


@contextmanager
def _adapters_off(layers: list):
    """What ``PeftModel.disable_adapter()`` does for unmerged adapters, on a known layer list."""
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)


class _Side:
    """One pane's decoding state: its model, adapter context, cache, generator and tokens."""

    def __init__(
        self, model, context, prompt_ids: torch.Tensor, settings: SamplingSettings, run_precision: str = "fp32"
    ):
        self.model, self.context, self.settings = model, context, settings
        self.precision = run_precision
        self.ids = prompt_ids
        self.next_input = prompt_ids
        self.cache = None
        self.generated: list[int] = []
        self.done = False
        self.generator = torch.Generator(device=prompt_ids.device).manual_seed(settings.seed)
        self.processors = sampling_processors(settings)

    @torch.no_grad()
    def advance(self, eos: set[int]) -> None:
        if self.done:
            return
        # Autocast per forward, never around the generator's yields: it is thread-local state.
        with self.context(), precision.autocast(self.next_input.device.type, self.precision):
            out = self.model(input_ids=self.next_input, past_key_values=self.cache, use_cache=True)
        self.cache = out.past_key_values
        scores = self.processors(self.ids, out.logits[:, -1, :].float())
        if self.settings.temperature > 0:
            probs = torch.softmax(scores, dim=-1)
            token = torch.multinomial(probs, 1, generator=self.generator)
        else:
            token = scores.argmax(dim=-1, keepdim=True)
        tid = int(token)
        if tid in eos:
            self.done = True
            return
        self.generated.append(tid)
        self.ids = torch.cat([self.ids, token], dim=-1)
        self.next_input = token


def sampling_processors(settings: SamplingSettings):
    """transformers' logits processors for the settings: repetition penalty, temperature, top-p."""
    from transformers import (
        LogitsProcessorList,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopPLogitsWarper,
    )

    procs = LogitsProcessorList()
    if settings.repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(settings.repetition_penalty))
    if settings.temperature > 0:
        procs.append(TemperatureLogitsWarper(settings.temperature))
        if settings.top_p < 1.0:
            procs.append(TopPLogitsWarper(settings.top_p))
    return procs


def _eos_ids(tokenizer, model) -> set[int]:
    ids = set()
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for v in (tokenizer.eos_token_id, gen_eos):
        if isinstance(v, int):
            ids.add(v)
        elif isinstance(v, (list, tuple)):
            ids.update(v)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(im_end, int) and im_end != tokenizer.unk_token_id:
        ids.add(im_end)  # the ChatML end of turn, for templates we supplied
    return ids
