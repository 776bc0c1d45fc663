"""What a run writes about itself, typed: ``status.json`` and the records of ``metrics.jsonl``.

Readers and writers share these classes instead of filtering raw dicts by string keys. The
files on disk keep their shape: a record is one flat JSON object with a ``"kind"``, and a
status is one flat JSON object. Keys a class does not know (written by a newer studio, or the
memory snapshot's per-device keys) are kept in ``extra`` and written back unchanged, so an older
reader never drops what a newer writer stored.

    status.json     RunStatus
    metrics.jsonl   TrainRecord ("train"), EvalRecord ("eval"), Event ("checkpoint", "compile",
                    "memory_check"), one per line
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, TypeVar, Union

STATES = ("queued", "running", "stopping", "finished", "failed", "interrupted")
ACTIVE_STATES = ("queued", "running", "stopping")

T = TypeVar("T")


def _to_dict(obj: Any) -> dict[str, Any]:
    """The flat JSON object: known fields that are set, then the unknown keys kept in ``extra``."""
    out = {f.name: getattr(obj, f.name) for f in fields(obj) if f.name != "extra"}
    return {k: v for k, v in out.items() if v is not None} | obj.extra


def _from_dict(cls: type[T], data: dict[str, Any], implied: tuple[str, ...] = ()) -> T:
    """``implied`` keys are what the class itself stands for (a record's ``kind``): not extra."""
    known = {f.name for f in fields(cls)} - {"extra"}
    kwargs = {k: v for k, v in data.items() if k in known}
    extra = {k: v for k, v in data.items() if k not in known and k not in implied}
    return cls(**kwargs, extra=extra)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class Retry:
    """The one-click retry offered after a failure: what to say, which method, which settings."""

    text: str
    method: str
    changes: dict[str, Any] = field(default_factory=dict)  # dotted config field -> new value

    def to_dict(self) -> dict[str, Any]:
        return {"text": self.text, "method": self.method, "changes": dict(self.changes)}

    @classmethod
    def from_dict(cls, data: Any) -> Retry | None:
        if not isinstance(data, dict) or not isinstance(data.get("changes"), dict):
            return None
        return cls(str(data.get("text", "")), str(data.get("method", "")), data["changes"])


@dataclass
class RunStatus:
    """``status.json``: where a run stands, and what identifies its result.

    Written by the training job (state, progress, scores), by a rename (name) and by an import;
    ``Run.set_status`` checks the field names, so a typo fails where it is written.
    """

    state: str = "failed"  # one of STATES
    message: str = ""
    # identity
    name: str | None = None  # display name; the run id when unset
    version: int = 0  # finished saves so far (a resume that finishes adds one)
    method: str | None = None
    model: str | None = None
    imported: bool = False
    import_warnings: list[str] | None = None
    source_run: str | None = None  # an imported run's id where it was trained
    source_version: int | None = None
    # the process and the clock
    pid: int | None = None
    pid_started: float | None = None  # the pid's start time: a reused pid is another process
    created_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None
    updated_at: float | None = None
    # what training set up
    step: int = 0
    total_steps: int | None = None
    trainable_params: int | None = None
    train_rows: int | None = None
    eval_rows: int | None = None
    device: str | None = None
    precision: str | None = None  # "bf16" | "fp32", as resolved on the machine that trained
    bf16: bool | None = None  # written before ``precision`` existed; kept for old runs
    data_warnings: list[str] | None = None
    data_sha256: str | None = None
    compiled_layers: int | None = None
    compile_note: str | None = None
    memory_check: dict[str, Any] | None = None  # MemoryCheck.to_dict()
    startup: dict[str, float] | None = None  # seconds per start-up phase, and to the first loss point
    # how it ended
    base_eval_loss: float | None = None
    eval_loss: float | None = None
    final_loss: float | None = None
    stopped: bool = False  # Stop was pressed: it can be resumed to the final step
    early_stopped: bool = False
    retry: Retry | None = None  # set on a failure that a settings change can fix
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES

    def to_dict(self) -> dict[str, Any]:
        out = _to_dict(self)
        if self.retry is not None:
            out["retry"] = self.retry.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunStatus:
        status = _from_dict(cls, data)
        status.retry = Retry.from_dict(data.get("retry"))
        return status

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in fields(cls)} - {"extra"}


@dataclass
class TrainRecord:
    """One optimizer step."""

    KIND: ClassVar[str] = "train"
    step: int
    loss: float
    total_steps: int = 0
    lr: float | None = None
    grad_norm: float | None = None
    tokens: int = 0  # real (unpadded) tokens in the step
    labeled_tokens: int = 0  # tokens the loss counts
    tokens_per_s: float = 0.0
    epoch: float | None = None
    time: float | None = None
    elapsed_s: float = 0.0  # since this session of the run started (a resume restarts it)
    steps_this_session: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # the memory snapshot: rss_mib, cuda_*_mib

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.KIND} | _to_dict(self)


@dataclass
class EvalRecord:
    """One evaluation on the held-out rows (token-weighted mean loss)."""

    KIND: ClassVar[str] = "eval"
    step: int
    eval_loss: float
    time: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.KIND} | _to_dict(self)


@dataclass
class Event:
    """Anything else worth a line in the run's history: a checkpoint saved, a compile verdict,
    the memory check's measurement. Nothing is plotted from these."""

    kind: str
    step: int = 0
    time: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return _to_dict(self)


Record = Union[TrainRecord, EvalRecord, Event]


def parse_record(data: Any) -> Record | None:
    """A metrics.jsonl line's object as its record; None for one that is not a usable record
    (a train or eval line without a finite number is skipped, not drawn as a gap)."""
    if not isinstance(data, dict) or not isinstance(data.get("kind"), str):
        return None
    kind = data["kind"]
    if not _number(data.get("step", 0)):
        return None
    if kind == TrainRecord.KIND:
        return _from_dict(TrainRecord, data, ("kind",)) if _number(data.get("loss")) else None
    if kind == EvalRecord.KIND:
        return _from_dict(EvalRecord, data, ("kind",)) if _number(data.get("eval_loss")) else None
    return _from_dict(Event, data)
