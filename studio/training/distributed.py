"""Several processes, one run: the same trainer under `accelerate launch` (or torchrun).

The launcher starts one process per device and sets RANK / WORLD_SIZE / LOCAL_RANK. Each
process trains on every WORLD_SIZE-th batch of the same seeded stream and the gradients are
averaged across processes, so N processes with batch B train like one process with batch B and
gradient accumulation N. Only rank 0 writes: the run folder, status, metrics and weights.

Two ways to hold the model (``training.distributed``):

- ``ddp``: DistributedDataParallel, a full copy of the model on every device.
- ``fsdp``: PyTorch FSDP2 (``torch.distributed.fsdp.fully_shard``): every decoder layer, and the
  loss module around the model as the root, keep 1/N of their parameters, gradients and
  optimizer state on each device and gather a layer's weights only while it runs. The root is the
  loss module, not the model, because the loss calls the decoder and the output layer directly
  (``loss.py``): hooks on the model's own forward would never run. Works on CPU with gloo
  (the tests) and on GPUs with NCCL.

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
# Accelerator: it shards with FSDP2 itself when the run says `training.distributed: fsdp`, and
# would otherwise silently train something other than what the launch config asked for.
SHARDING_ENV = {"ACCELERATE_USE_FSDP": "FSDP", "ACCELERATE_USE_DEEPSPEED": "DeepSpeed"}


def from_env(strategy: str = "ddp") -> Dist:
    """This process's place, from the launcher's environment (one process when there is none).

    Raises:
        ConfigError: the launch config asks for sharding the run does not do (DeepSpeed, or an
            accelerate FSDP config for a run that says ddp).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    asked = [name for var, name in SHARDING_ENV.items() if os.environ.get(var, "").lower() in ("true", "1")]
    if asked and not (asked == ["FSDP"] and strategy == "fsdp"):
        from studio.config import ConfigError

        fix = (
            "add `--distributed fsdp` (FSDP2, configured by the studio) or launch with "
            "`accelerate launch --multi_gpu ...`"
            if asked[0] == "FSDP"
            else "launch with `accelerate launch --multi_gpu ...` and `--distributed fsdp` to shard the model"
        )
        raise ConfigError(
            [f"accelerate was launched with a {asked[0]} config, which this trainer does not read; {fix}."]
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


def wrap(loss_fn, dist: Dist, device: str, strategy: str = "ddp"):
    """What the training step calls: ``loss_fn`` under DistributedDataParallel (ddp), ``loss_fn``
    itself sharded in place (fsdp), or ``loss_fn`` alone with one process."""
    if not dist.enabled:
        return loss_fn
    if strategy == "fsdp":
        shard(loss_fn, dist)
        return loss_fn
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(loss_fn, device_ids=[dist.local_rank] if device == "cuda" else None)


def shard(loss_fn, dist: Dist) -> None:
    """FSDP2: each decoder layer is one unit, the loss module (holding embeddings, final norm and
    output layer) the root. Call before building the optimizer: parameters become DTensors."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from studio.training.loss import causal_lm

    mesh = init_device_mesh("cuda" if torch.cuda.is_available() else "cpu", (dist.world,))
    for layer in decoder_layers(causal_lm(loss_fn.model)):
        fully_shard(layer, mesh=mesh)
    fully_shard(loss_fn, mesh=mesh)


def decoder_layers(lm) -> list[torch.nn.Module]:
    """The repeated blocks of a transformers causal LM (``model.layers`` for the Llama family)."""
    decoder = lm.get_decoder() if hasattr(lm, "get_decoder") else getattr(lm, "model", None)
    layers = getattr(decoder, "layers", None) or getattr(decoder, "h", None)
    if layers is None:
        raise ValueError(f"{type(lm).__name__} has no list of decoder layers to shard; use ddp.")
    return list(layers)


def is_sharded(module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def sum_over_ranks(values: list[float], dist: Dist) -> list[float]:
    """Element-wise sum of ``values`` over all processes (the values themselves with one)."""
    if not dist.enabled:
        return values
    nccl = torch.distributed.get_backend() == "nccl"
    box = torch.tensor(values, dtype=torch.float64, device=f"cuda:{dist.local_rank}" if nccl else "cpu")
    torch.distributed.all_reduce(box)
    return box.tolist()


def any_rank(flag: bool, dist: Dist) -> bool:
    """True on every process when ``flag`` is true on any (e.g. a stop asked of one of them)."""
    return sum_over_ranks([float(flag)], dist)[0] > 0


def barrier(dist: Dist) -> None:
    if dist.enabled:
        torch.distributed.barrier()
