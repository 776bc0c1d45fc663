"""Which training method fits this machine, and why: full fine-tuning, LoRA or QLoRA.

For each method the estimate (``studio.planning.memory``) is compared with the memory the training
device has free:

    fits    the estimate is at most 85% of what is available (room for the unexpected)
    tight   between 85% and 100%: it may run, or may run out of memory on a long batch
    no      above what is available
    n/a     the method cannot run on this device at all (QLoRA without bitsandbytes 4-bit)

The recommendation is the highest-quality method that fits comfortably; quality runs
full > LoRA > QLoRA and memory the other way round. When a better method than the
recommended one almost fits, the planner searches the settings a person can change
(gradient checkpointing, a smaller micro-batch with more accumulation so the effective batch
is unchanged, a shorter max length) and suggests the first change that makes it fit.

Example:
    >>> plan = plan_for_config(RunConfig(method="lora"), hardware.detect())
    >>> plan.recommended, plan.methods[0].verdict
    ('full', 'fits')
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from studio.config import RunConfig
from studio.formatting import format_bytes
from studio.planning import precision
from studio.planning.hardware import Hardware
from studio.planning.memory import Estimate, ModelShape, Settings, estimate, shape_for_model
from studio.runs.records import Retry

TIGHT_SHARE = 0.85
QUALITY_ORDER = ("full", "lora", "qlora")
METHOD_NAMES = {"full": "Full fine-tuning", "lora": "LoRA", "qlora": "QLoRA"}


@dataclass
class MethodPlan:
    method: str
    verdict: str  # fits | tight | no | n/a
    reason: str
    estimate: Estimate | None = None  # None when the method cannot run on this device
    share: float | None = None  # estimate / available memory
    sharded: bool = False  # the estimate is per device under FSDP (it does not fit replicated)


@dataclass
class Suggestion:
    """A change of settings that makes ``method`` fit; ``changes`` uses RunConfig dotted names."""

    method: str
    changes: dict[str, object]
    text: str
    estimate_bytes: int

    def as_retry(self) -> Retry:
        """The change as the one-click retry a page or a failed run offers."""
        return Retry(self.text, self.method, dict(self.changes))


@dataclass
class Plan:
    device: str
    available_bytes: int
    settings: Settings
    methods: list[MethodPlan] = field(default_factory=list)
    recommended: str | None = None
    recommendation: str = ""
    suggestion: Suggestion | None = None

    def get(self, method: str) -> MethodPlan:
        return next(m for m in self.methods if m.method == method)

    def to_dict(self) -> dict:
        return {
            "device": self.device,
            "available_bytes": self.available_bytes,
            "recommended": self.recommended,
            "recommendation": self.recommendation,
            "suggestion": None
            if self.suggestion is None
            else {
                "method": self.suggestion.method,
                "changes": self.suggestion.changes,
                "text": self.suggestion.text,
                "estimate_bytes": self.suggestion.estimate_bytes,
            },
            "methods": [
                {
                    "method": m.method,
                    "verdict": m.verdict,
                    "reason": m.reason,
                    "share": m.share,
                    "sharded": m.sharded,
                    "estimate": None if m.estimate is None else m.estimate.to_dict(),
                }
                for m in self.methods
            ],
        }


def available_bytes(hw: Hardware, device: str, devices: int = 1) -> int:
    """Memory training can use on each ``device``: free memory on the fullest of the first
    ``devices`` GPUs, available RAM otherwise (MPS shares the machine's RAM)."""
    if device == "cuda" and hw.cuda:
        return min(gpu.free_bytes for gpu in hw.cuda[: max(devices, 1)])
    return hw.ram_available_bytes


def _verdict(total: int, available: int) -> str:
    if total <= TIGHT_SHARE * available:
        return "fits"
    return "tight" if total <= available else "no"


def _why_not(method: str, hw: Hardware, device: str) -> str | None:
    """Why a method cannot run on this device at all, or None."""
    if method == "qlora":
        support = hw.bnb_4bit.get(device, f"bitsandbytes 4-bit is not available on {device.upper()}")
        if support != "yes":
            return support
    return None


def plan(shape: ModelShape, hw: Hardware, settings: Settings, device: str | None = None) -> Plan:
    """Estimate every method with these settings on ``device`` (default: the training device)."""
    device = device or hw.device
    avail = available_bytes(hw, device, settings.devices)
    out = Plan(device, avail, settings)
    where = "free on the GPU" if device == "cuda" else "of RAM available"
    if settings.devices > 1:
        where = f"free on each of {settings.devices} GPUs"
    for method in QUALITY_ORDER:
        blocked = _why_not(method, hw, device)
        if blocked:
            out.methods.append(MethodPlan(method, "n/a", blocked))
            continue
        # The plan chooses the layout: a full copy per GPU (DDP) first, and only when that does
        # not fit comfortably, sharding (FSDP), which divides the weights, gradients and
        # optimizer state by the number of GPUs.
        est = estimate(shape, method, replace(settings, sharded=False), device)
        sharded = False
        if settings.devices > 1 and method != "qlora" and _verdict(est.total_bytes, avail) != "fits":
            fsdp = estimate(shape, method, replace(settings, sharded=True), device)
            if fsdp.total_bytes < est.total_bytes:
                est, sharded = fsdp, True
        verdict = _verdict(est.total_bytes, avail)
        share = est.total_bytes / avail
        how = (
            f"{format_bytes(est.total_bytes)} per GPU sharded with FSDP," if sharded else format_bytes(est.total_bytes)
        )
        reason = {
            "fits": f"about {how} of the {format_bytes(avail)} {where} ({share:.0%})",
            "tight": f"about {how} of the {format_bytes(avail)} {where} ({share:.0%}): "
            "may run out of memory on the longest batches",
            "no": f"needs about {how}, more than the {format_bytes(avail)} {where}",
        }[verdict]
        out.methods.append(MethodPlan(method, verdict, reason, est, share, sharded))

    fitting = [m for m in out.methods if m.verdict == "fits"]
    tight = [m for m in out.methods if m.verdict == "tight"]
    if fitting:
        best = fitting[0]
        out.recommended = best.method
        out.recommendation = f"{METHOD_NAMES[best.method]}: {_merit(best)}"
        if best.sharded:
            out.recommendation += (
                f" It fits only sharded across the {settings.devices} GPUs: launch it with "
                "`--distributed fsdp` (a full copy on every GPU, as DDP keeps, would not fit comfortably)."
            )
    elif tight:
        out.recommended = tight[0].method
        out.recommendation = (
            f"{METHOD_NAMES[tight[0].method]}, but it is tight: nothing fits comfortably with these settings."
        )
    else:
        out.recommendation = "Nothing fits with these settings."
    # Worth a suggestion: every method better than a comfortable recommendation, or every
    # method when nothing fits comfortably. Best first: the highest quality a change could buy.
    better = out.methods[: QUALITY_ORDER.index(out.recommended)] if fitting else out.methods
    for m in better:
        if m.estimate is not None:
            out.suggestion = suggest(shape, m.method, settings, device, avail)
            if out.suggestion:
                break
    return out


def _merit(m: MethodPlan) -> str:
    est = m.estimate
    if m.method == "full":
        return (
            f"the highest quality, and it fits comfortably. It saves the whole model "
            f"({format_bytes(est.adapter_bytes)}) and wants a lower learning rate (about 2e-5)."
        )
    if m.method == "lora":
        return (
            f"trains {est.trainable_params / est.total_params:.2%} of the weights and saves a "
            f"{format_bytes(est.adapter_bytes)} adapter; close to full fine-tuning in quality."
        )
    return (
        f"a 4-bit base with a {format_bytes(est.adapter_bytes)} adapter: the least memory, a little "
        "below LoRA in quality and slower per step."
    )


def suggest(
    shape: ModelShape, method: str, settings: Settings, device: str, avail: int, target_bytes: int | None = None
) -> Suggestion | None:
    """The first change (or pair of changes) that makes ``method`` fit comfortably, cheapest first.

    ``target_bytes`` replaces "fits comfortably in ``avail``" with "estimated at most this":
    after a real out-of-memory error the estimate was evidently too low, so the retry aims
    below what actually failed."""
    candidates: list[tuple[dict, Settings, str]] = []
    if not settings.gradient_checkpointing:
        candidates.append(
            (
                {"training.gradient_checkpointing": True},
                replace(settings, gradient_checkpointing=True),
                "turn on gradient checkpointing",
            )
        )
    b, acc = settings.batch_size, settings.gradient_accumulation
    while b > 1:  # keep the effective batch: halve the micro-batch, double the accumulation
        b, acc = max(1, b // 2), acc * 2
        candidates.append(
            (
                {"training.batch_size": b, "training.gradient_accumulation": acc},
                replace(settings, batch_size=b, gradient_accumulation=acc),
                f"use micro-batch {b} with gradient accumulation {acc} (same effective batch)",
            )
        )
    singles = list(candidates)
    seq = settings.seq_len
    while seq // 2 >= 128:
        seq //= 2
        candidates.append(
            (
                {"data.max_length": seq},
                replace(settings, seq_len=seq),
                f"lower max length to {seq} tokens (longer rows are cut)",
            )
        )
    # Pairs: checkpointing together with a smaller micro-batch.
    if singles and not settings.gradient_checkpointing:
        for changes, s, text in singles[1:]:
            candidates.append(
                (
                    {"training.gradient_checkpointing": True, **changes},
                    replace(s, gradient_checkpointing=True),
                    f"turn on gradient checkpointing and {text}",
                )
            )
    for changes, s, text in candidates:
        est = estimate(shape, method, s, device)
        if est.total_bytes <= target_bytes if target_bytes is not None else _verdict(est.total_bytes, avail) == "fits":
            return Suggestion(
                method,
                changes,
                f"{METHOD_NAMES[method]} would fit if you {text} (about {format_bytes(est.total_bytes)}).",
                est.total_bytes,
            )
    return None


def settings_for(
    config: RunConfig,
    hw: Hardware,
    device: str | None = None,
    *,
    seq_len: int | None = None,
    batch_size: int | None = None,
    labeled_share: float = 1.0,
    devices: int = 1,
    sharded: bool = False,
) -> Settings:
    """The memory estimate's settings for a run of ``config``: the one way to build them.

    Everything memory depends on is read from the config here; what the config cannot know is
    given by the caller, and nobody patches the result afterwards.

    Args:
        config: the run's config (precision, batch, LoRA, optimizer, checkpointing, max length).
        hw: the machine; ``auto`` precision resolves against its bf16 support.
        device: the device estimated for (default: ``hw``'s training device). Another device
            than this machine's (``estimate --device cuda`` on a laptop) is taken to have bf16
            when it is CUDA.
        seq_len: tokens per row of the batch, when the data is known: its longest row (shorter
            than max length) or the measured batch's width. Default ``data.max_length``.
        batch_size: rows of the measured batch (default ``training.batch_size``).
        labeled_share: share of the batch's positions that carry a label (1: every one).
        devices: processes the run is launched on, each with a batch of its own.
        sharded: with ``devices`` > 1, FSDP instead of a full copy per device.

    Example:
        >>> settings_for(RunConfig(), hardware.detect(), seq_len=300).seq_len
        300
    """
    t = config.training
    device_bf16 = hw.bf16 if device in (None, hw.device) else device == "cuda"
    return Settings(
        seq_len=config.data.max_length if seq_len is None else seq_len,
        batch_size=t.batch_size if batch_size is None else batch_size,
        gradient_accumulation=t.gradient_accumulation,
        gradient_checkpointing=t.gradient_checkpointing,
        bf16=precision.resolve(t.precision, device_bf16) == "bf16",
        lora_r=config.lora.r,
        lora_targets=config.lora.target_modules(),
        lora_dropout=config.lora.dropout,
        optimizer=t.optimizer,
        labeled_share=labeled_share,
        devices=max(devices, 1),
        sharded=sharded,
        objective=t.objective,
    )


def plan_for_config(config: RunConfig, hw: Hardware, shape: ModelShape | None = None) -> Plan:
    """Plan for a run config; reads the model's config (not its weights) unless ``shape`` is given."""
    if shape is None:
        shape = shape_for_model(config.model, config.trust_remote_code)
    return plan(shape, hw, settings_for(config, hw))


def retry_after_oom(config: RunConfig, hw: Hardware, device: str) -> Suggestion | None:
    """A change to retry with after the run ran out of memory: the cheapest setting change that
    cuts the estimate by at least 30% and fits what is free, else QLoRA (when it can run)."""
    shape = shape_for_model(config.model, config.trust_remote_code)
    settings = settings_for(config, hw, device)
    avail = available_bytes(hw, device)
    current = estimate(shape, config.method, settings, device).total_bytes
    fix = suggest(
        shape, config.method, settings, device, avail, target_bytes=int(min(TIGHT_SHARE * avail, 0.7 * current))
    )
    if fix is not None:
        return fix
    if config.method != "qlora" and _why_not("qlora", hw, device) is None:
        est = estimate(shape, "qlora", settings, device).total_bytes
        return Suggestion(
            "qlora", {"method": "qlora"}, f"QLoRA needs about {format_bytes(est)}: switch the method to QLoRA.", est
        )
    return None
