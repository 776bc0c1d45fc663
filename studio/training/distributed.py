"""Several processes, one run: the same trainer under `accelerate launch` (or torchrun).

The launcher starts one process per device and sets RANK / WORLD_SIZE / LOCAL_RANK. Each
process trains on every WORLD_SIZE-th batch of the same seeded stream, DistributedDataParallel
averages the gradients, and only rank 0 writes: the run folder, status, metrics and weights.
With one process (the web server, a plain `finetune-studio train`) nothing here does anything.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


# accelerate sets these for an FSDP or DeepSpeed config. This loop does not use accelerate's
# Accelerator, so it would silently train plain DDP (a full replica on every device) instead.
SHARDING_ENV = {"ACCELERATE_USE_FSDP": "FSDP", "ACCELERATE_USE_DEEPSPEED": "DeepSpeed"}


def from_env() -> Dist:
    """This process's place, from the launcher's environment (one process when there is none).

    Raises:
        ConfigError: the launcher asked for FSDP or DeepSpeed sharding, which this trainer lacks.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    asked = [name for var, name in SHARDING_ENV.items() if os.environ.get(var, "").lower() in ("true", "1")]
    if asked:
        from studio.config import ConfigError

        raise ConfigError(
            [
                f"accelerate was launched with a {asked[0]} config, but this trainer does not shard "
                "the model: it keeps a full copy on every device (DistributedDataParallel). Launch "
                "with `accelerate launch --multi_gpu ...` (no FSDP/DeepSpeed config), or pick a "
                "method that fits one device (LoRA, QLoRA)."
            ]
        )
    return Dist(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))


def init(dist: Dist) -> None:
    """Join the process group: NCCL across GPUs, gloo across CPU processes."""
    if not dist.enabled or torch.distributed.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(dist.local_rank)
    torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def broadcast(value, dist: Dist):
    """Rank 0's ``value`` on every rank (e.g. the run folder it created)."""
    if not dist.enabled:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def wrap(model, dist: Dist, device: str):
    """DistributedDataParallel when several processes train; the model itself otherwise."""
    if not dist.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[dist.local_rank] if device == "cuda" else None)
