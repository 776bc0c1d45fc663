"""``training.optimizer``: which AdamW a run steps with, and building it.

    adamw              torch.optim.AdamW; fused (one kernel for all parameters) on CUDA
    adamw_8bit         bitsandbytes AdamW8bit: both moments in 8-bit blocks (2 B per parameter, not 8)
    paged_adamw_8bit   the same in paged memory: on a spike the state moves to RAM instead of the
                       run stopping out of GPU memory
    paged_adamw_32bit  bitsandbytes PagedAdamW32bit: fp32 moments in paged memory (the QLoRA
                       paper's optimizer)

``auto`` is decided by ``config.optimizer_for``. bitsandbytes runs its optimizers on CPU as well
(paged memory falls back to ordinary memory there), so every choice trains on every device.
"""

from __future__ import annotations

import warnings

import torch

from studio.models import ModelError

BITSANDBYTES = {"adamw_8bit": "AdamW8bit", "paged_adamw_8bit": "PagedAdamW8bit", "paged_adamw_32bit": "PagedAdamW32bit"}


def build(name: str, params: list[torch.nn.Parameter], lr: float, weight_decay: float, device: str):
    """An optimizer over ``params``; ModelError when bitsandbytes is needed and missing."""
    if name == "adamw":
        # Fused AdamW updates every parameter in one kernel launch and without the foreach
        # implementation's temporary copy of the parameters (CUDA only).
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=device == "cuda" or None)
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise ModelError(
            f"The optimizer {name} needs bitsandbytes, which is not installed; install it "
            "(pip install bitsandbytes) or choose adamw."
        ) from None
    # On CPU bitsandbytes warns at every new state buffer that paging falls back to ordinary memory.
    warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU")
    return getattr(bnb.optim, BITSANDBYTES[name])(params, lr=lr, weight_decay=weight_decay)
