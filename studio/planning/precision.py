"""One precision per run, everywhere its numbers are computed.

``training.precision`` is ``auto``, ``bf16`` or ``fp32``. A run resolves it once (:func:`resolve`)
and records the answer in its status (``precision``); training, the memory check, the held-out
evaluation and the playground's scores then load the base in the same dtype
(:func:`weights_dtype`) and run under the same autocast (:func:`autocast`), so a "base vs adapter"
loss computed on the Chat tab is the number the training log shows, on every machine.

``auto`` means bf16 autocast where the device has native bf16 (CUDA with bf16, CPUs with
AVX512-BF16 or AMX) and fp32 elsewhere, so the same config trains differently on two CPUs.
``FINETUNE_STUDIO_AUTO_PRECISION=bf16|fp32`` decides ``auto`` instead of the hardware: CI runs
the numeric tests under both, so a green run on a CPU without bf16 also covers one with it.
"""

from __future__ import annotations

import os
from contextlib import nullcontext

import torch

from studio.runs.records import RunStatus

PRECISIONS = ("bf16", "fp32")  # what a run resolves to; the setting also takes "auto"
AUTO_ENV = "FINETUNE_STUDIO_AUTO_PRECISION"


def resolve(setting: str, device_bf16: bool) -> str:
    """``bf16`` or ``fp32`` for a ``training.precision`` setting on a device.

    Raises:
        ValueError: ``FINETUNE_STUDIO_AUTO_PRECISION`` holds something other than bf16 or fp32.
    """
    if setting in PRECISIONS:
        return setting
    forced = os.environ.get(AUTO_ENV, "").strip().lower()
    if forced:
        if forced not in PRECISIONS:
            raise ValueError(f"{AUTO_ENV} must be bf16 or fp32 (got {forced!r}); unset it to let the hardware decide.")
        return forced
    return "bf16" if device_bf16 else "fp32"


def compute_dtype(precision: str) -> torch.dtype:
    return torch.bfloat16 if precision == "bf16" else torch.float32


def weights_dtype(method: str, precision: str) -> torch.dtype:
    """The dtype a base model's weights load in. Full fine-tuning keeps fp32 master weights
    (pure bf16 weights barely learn at full fine-tuning learning rates); a LoRA base is frozen,
    so it loads in the compute dtype (QLoRA's 4-bit layers compute in it too)."""
    return torch.float32 if method == "full" else compute_dtype(precision)


def autocast(device: str, precision: str):
    """The autocast context a run's forward passes use (none for fp32)."""
    if precision != "bf16":
        return nullcontext()
    return torch.autocast(device_type="cpu" if device == "mps" else device, dtype=torch.bfloat16)


def of_status(status: RunStatus) -> str:
    """A run's recorded precision. Runs from before the ``precision`` key recorded ``bf16``;
    an imported adapter carries its source's, and one from a zip without it is scored in fp32
    (exact, if slower)."""
    if status.precision in PRECISIONS:
        return status.precision
    return "bf16" if status.bf16 else "fp32"
