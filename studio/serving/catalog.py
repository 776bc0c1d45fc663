"""What the endpoint can serve: the base model, and every finished LoRA/QLoRA run on that base
(its final adapter and its checkpoints), each with how its base must be loaded and its identity
(version, weights hash) for the request log."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from studio import models
from studio.inference.playground import BASE_ADAPTER, BaseLoad, Playground, base_load_for, split_ref
from studio.planning import precision
from studio.planning.hardware import Hardware
from studio.runs import files
from studio.runs.registry import Run, RunRegistry, checkpoint_step

ADAPTER_METHODS = ("lora", "qlora")


@dataclass
class Served:
    """One model id the endpoint answers to."""

    id: str  # the base's model reference, a run id, or "<run id>@step-N"
    load: BaseLoad  # the base it runs on; rows with the same load share a batch
    created: int  # unix seconds
    run: Run | None = None  # None for the base
    checkpoint: str | None = None
    version: int = 0
    weights: Path | None = None

    @property
    def is_base(self) -> bool:
        return self.run is None


class Catalog:
    """Model ids by name, resolved against the runs folder on every call (a run finished or
    deleted since is seen at once). Tokenizers are cached per weights folder."""

    def __init__(self, registry: RunRegistry, hw: Hardware, base: str = models.DEFAULT_MODEL):
        self.registry = registry
        self.base = base
        self.device = hw.device
        # The base alone runs as a LoRA run trained here would have loaded it: same batch.
        self.base_load = BaseLoad(base, "lora", precision.resolve("auto", hw.bf16))
        self._tokenizers: dict[str, object] = {}
        self._configs: dict[str, object] = {}  # model ref -> its transformers config (None: unreadable)
        self._lock = threading.Lock()

    def models(self) -> list[Served]:
        """The base, then each servable run (newest first) followed by its checkpoints."""
        out = [Served(self.base, self.base_load, 0)]
        for run in self.registry.trained():
            try:
                out += self._run_entries(run)
            except (ValueError, OSError):  # a run whose config cannot be read is not offered
                continue
        return out

    def _run_entries(self, run: Run) -> list[Served]:
        cfg = run.config()
        if cfg.model != self.base or cfg.method not in ADAPTER_METHODS:
            return []
        status = run.status()
        method, run_precision = base_load_for(cfg.method, precision.of_status(status), self.device)
        load = BaseLoad(cfg.model, method, run_precision, cfg.trust_remote_code)
        created = int(status.finished_at or status.created_at)
        out = [Served(run.id, load, created, run, None, status.version, run.weights_dir())]
        for ckpt in reversed(run.checkpoints()):
            ref = f"{run.id}@{ckpt.name}"
            out.append(Served(ref, load, created, run, ckpt.name, status.version, ckpt))
        return out

    def get(self, model_id: str) -> Served:
        """The served entry for a request's ``model``.

        Raises:
            LookupError: no such model here (the message lists what is).
            ValueError: it exists but cannot be served per request (full fine-tuning, another base).
        """
        if model_id == self.base:
            return Served(self.base, self.base_load, 0)
        run_id, checkpoint = split_ref(model_id)
        try:
            run = self.registry.get(run_id)
        except LookupError:
            raise LookupError(
                f"The model {model_id!r} does not exist here. GET /v1/models lists the base "
                f"({self.base!r}) and every finished adapter."
            ) from None
        if not run.is_trained():
            raise LookupError(f"Run {run.id} has no finished adapter yet (it is {run.status().state}).")
        cfg = run.config()
        if cfg.method not in ADAPTER_METHODS:
            raise ValueError(
                f"Run {run.id} is a full fine-tune: a whole model, not an adapter on {self.base!r}. "
                "Export it (merged) and serve it on its own."
            )
        if cfg.model != self.base:
            raise ValueError(
                f"Run {run.id} was trained on {cfg.model!r}, and this endpoint serves adapters on "
                f"{self.base!r}; start `finetune-studio serve --model {cfg.model}` for it."
            )
        match = [m for m in self._run_entries(run) if m.id == (model_id if checkpoint else run.id)]
        if not match:
            have = ", ".join(f"step-{checkpoint_step(c)}" for c in run.checkpoints()) or "none"
            raise LookupError(f"Run {run.id} has no checkpoint {checkpoint!r} (it has: {have}).")
        return match[0]

    def resolve(self, model_id: str) -> tuple[BaseLoad, Callable[[Playground], str]]:
        """What the engine needs for a ref: its base load, and the call that loads its adapter."""
        if model_id is None or model_id == self.base:
            return self.base_load, lambda pg: BASE_ADAPTER
        served = self.get(model_id)
        return served.load, lambda pg: pg.serve_adapter(served.run, served.checkpoint)

    def _config(self, served: Served):
        key = served.load.model
        with self._lock:
            if key not in self._configs:
                from transformers import AutoConfig

                try:
                    self._configs[key] = AutoConfig.from_pretrained(models.resolve(key))
                except (OSError, ValueError):
                    self._configs[key] = None
            return self._configs[key]

    def context_length(self, served: Served) -> int | None:
        """The base's context window in tokens (``max_position_embeddings``), None when unknown."""
        return getattr(self._config(served), "max_position_embeddings", None)

    def vocab_size(self, served: Served) -> int:
        """How many token ids a prompt may use: those both the tokenizer and the model's
        embedding know (a tokenizer with added tokens can outgrow an embedding never resized)."""
        size = len(self.tokenizer(served))
        embedding = getattr(self._config(served), "vocab_size", None)
        return min(size, embedding) if isinstance(embedding, int) else size

    def tokenizer(self, served: Served):
        """The run's own tokenizer (saved with its adapter: its chat template is the one it
        trained with), else the base's."""
        folder = served.weights
        key = str(folder) if folder is not None and (folder / "tokenizer_config.json").exists() else self.base
        with self._lock:
            if key not in self._tokenizers:
                self._tokenizers[key] = models.load_tokenizer(key)
            return self._tokenizers[key]

    def weights_hash(self, served: Served) -> str | None:
        """sha256 (first 16 hex) of the adapter weights on disk now (studio/runs/files.py: the same
        hash the playground records for what it loaded, computed once per version of the files)."""
        return None if served.weights is None else files.weights_sha256(served.weights)
