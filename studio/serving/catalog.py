"""What the endpoint can serve: the base model, every deployment (a name pointing at an adapter
version, studio/runs/deployments.py), and every finished LoRA/QLoRA run on that base (its latest
version, its kept versions ``RUN@vN`` and its checkpoints ``RUN@step-N``), each with how its base
must be loaded and its identity (version, weights hash) for the request log.

A run's id and a deployment name are resolved to an exact version when a request arrives, so a
request decodes on the version it started with while the next one gets a promotion or a new save."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from studio import models
from studio.inference.playground import BASE_ADAPTER, BaseLoad, Playground, base_load_for, split_ref
from studio.planning import precision
from studio.planning.hardware import Hardware
from studio.runs import files, fingerprint, versions
from studio.runs.deployments import Deployments
from studio.runs.registry import Run, RunRegistry

ADAPTER_METHODS = ("lora", "qlora")


@dataclass
class Served:
    """One model id the endpoint answers to."""

    id: str  # what the request named: the base, a deployment, a run id, "<run id>@vN" or "@step-N"
    load: BaseLoad  # the base it runs on; rows with the same load share a batch
    created: int  # unix seconds
    run: Run | None = None  # None for the base
    checkpoint: str | None = None  # the exact weights: "vN" (a version) or "step-N" (a checkpoint)
    version: int = 0
    weights: Path | None = None
    deployment: str | None = None  # the deployment name the request used, if any
    kept: versions.Version | None = None  # the version it is (its lineage, for GET /v1/models/{id})

    @property
    def exact(self) -> str:
        """The run and the weights it is: ``RUN@v3`` or ``RUN@step-40``."""
        return self.id if self.run is None else f"{self.run.id}@{self.checkpoint}"

    @property
    def is_base(self) -> bool:
        return self.run is None


class Catalog:
    """Model ids by name, resolved against the runs folder on every call (a run finished or
    deleted since is seen at once). Tokenizers are cached per weights folder."""

    def __init__(self, registry: RunRegistry, hw: Hardware, base: str = models.DEFAULT_MODEL):
        self.registry = registry
        self.deployments = Deployments(registry)
        self.base = base
        self.device = hw.device
        # The base alone runs as a LoRA run trained here would have loaded it: same batch.
        self.base_load = BaseLoad(base, "lora", precision.resolve("auto", hw.bf16))
        self._tokenizers: dict[str, object] = {}
        self._configs: dict[str, object] = {}  # model ref -> its transformers config (None: unreadable)
        self._lock = threading.Lock()

    def models(self) -> list[Served]:
        """The base, the deployments, then each servable run (newest first) followed by its
        kept versions and checkpoints."""
        out = [Served(self.base, self.base_load, 0)]
        for d in self.deployments.list():
            try:
                out.append(self.get(d.name))
            except (LookupError, ValueError):  # pointing at what is gone or not servable here
                continue
        for run in self.registry.trained():
            try:
                out += self._run_entries(run)
            except (ValueError, OSError):  # a run whose config cannot be read is not offered
                continue
        return out

    def _load_of(self, run: Run) -> BaseLoad | None:
        cfg = run.config()
        if cfg.model != self.base or cfg.method not in ADAPTER_METHODS:
            return None
        method, run_precision = base_load_for(cfg.method, precision.of_status(run.status()), self.device)
        return BaseLoad(cfg.model, method, run_precision, cfg.trust_remote_code)

    def _run_entries(self, run: Run) -> list[Served]:
        load = self._load_of(run)
        if load is None:
            return []
        kept = run.versions()
        if not kept:
            return []
        latest = kept[-1]
        out = [self._version_entry(run.id, run, load, latest)]
        for v in reversed(kept):
            out.append(self._version_entry(f"{run.id}@{v.label}", run, load, v))
        created = int(run.status().finished_at or run.status().created_at)
        for ckpt in reversed(run.checkpoints()):
            out.append(Served(f"{run.id}@{ckpt.name}", load, created, run, ckpt.name, latest.number, ckpt))
        return out

    @staticmethod
    def _version_entry(model_id: str, run: Run, load: BaseLoad, v: versions.Version) -> Served:
        created = int(v.record.get("created_at") or run.status().finished_at or run.status().created_at)
        return Served(model_id, load, created, run, v.label, v.number, v.path, kept=v)

    def get(self, model_id: str) -> Served:
        """The served entry for a request's ``model``: the base, a deployment, a run (its latest
        version), ``RUN@vN`` or ``RUN@step-N``, resolved to exact weights now.

        Raises:
            LookupError: no such model here (the message lists what is).
            ValueError: it exists but cannot be served per request (full fine-tuning, another base).
        """
        if model_id == self.base:
            return Served(self.base, self.base_load, 0)
        deployment = self.deployments.get(model_id)
        if deployment is not None:
            served = self._get(deployment.ref, f"Deployment {model_id!r} points at {deployment.ref}, which")
            served.id, served.deployment = model_id, model_id
            return served
        return self._get(model_id)

    def _get(self, model_id: str, who: str | None = None) -> Served:
        run_id, point = split_ref(model_id)
        try:
            run = self.registry.get(run_id)
        except LookupError:
            if who:
                raise LookupError(f"{who} does not exist here any more; point it at another version.") from None
            raise LookupError(
                f"The model {model_id!r} does not exist here. GET /v1/models lists the base "
                f"({self.base!r}), the deployments and every finished adapter."
            ) from None
        who = who or f"Run {run.id}"
        if not run.versions():
            raise LookupError(f"{who} has no finished adapter yet (it is {run.status().state}).")
        cfg = run.config()
        if cfg.method not in ADAPTER_METHODS:
            raise ValueError(
                f"{who} is a full fine-tune: a whole model, not an adapter on {self.base!r}. "
                "Export it (merged) and serve it on its own."
            )
        if cfg.model != self.base:
            raise ValueError(
                f"{who} was trained on {cfg.model!r}, and this endpoint serves adapters on "
                f"{self.base!r}; start `finetune-studio serve --model {cfg.model}` for it."
            )
        match = [m for m in self._run_entries(run) if m.id == model_id]
        if not match:
            try:
                run.weights_at(point)  # its sentence names what the run has
            except ValueError as exc:
                raise LookupError(str(exc)) from None
            raise LookupError(f"{model_id!r} cannot be served here.")
        return match[0]

    def check_base(self, served: Served) -> None:
        """Raise ValueError naming both weights digests when the version was trained on a base
        whose weights on this machine have changed since (updated or replaced under the same id):
        it is not served until it is retrained, or re-evaluated and redeployed knowingly."""
        if served.kept is None:
            return
        trained_on = served.kept.record.get("base_fingerprint") or fingerprint.read(served.kept.path)
        problem = fingerprint.changed_weights(trained_on, served.load.model, served.run.path)
        if problem:
            who = f"Deployment {served.deployment!r} ({served.exact})" if served.deployment else served.exact
            raise ValueError(f"{who} is not served: {problem}")

    def resolve(self, model_id: str) -> tuple[BaseLoad, Callable[[Playground], str]]:
        """What the engine needs for a ref: its base load, and the call that loads its adapter."""
        if model_id is None or model_id == self.base:
            return self.base_load, lambda pg: BASE_ADAPTER
        served = self.get(model_id)
        # The exact version, not "the latest": a request decodes on what it resolved to.
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
