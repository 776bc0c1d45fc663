"""Saving and restoring a run's trainer state, one process or sharded.

A save is the adapter (or the full model) with its tokenizer. A checkpoint (``checkpoints/step-N``)
adds ``trainer_state.pt``: optimizer, scheduler, RNG and the position in the data stream, so a
resumed run continues where it stopped and ends at the configured final step. A finished run
keeps the same state without weights (``final_state/``, next to ``adapter/`` or ``model/``): what
continuing it to a new total needs (training/schedule.py).

Under DDP every replica is identical and rank 0 saves for all. Under FSDP every process takes
part: rank 0 writes whole weights, as one process would, and the optimizer state stays sharded,
each process writing its own part (torch distributed checkpoint, in ``sharded/``). Every process
must then call ``Checkpoints.save`` and ``Checkpoints.restore`` together: they reach the same
collectives in the same order.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from studio import models
from studio.runs.registry import STATE_FILE, Run  # STATE_FILE: optimizer, scheduler, RNG and position
from studio.training import distributed
from studio.training.batching import Batching

SHARDED_DIR = "sharded"  # a sharded run's checkpoint: model and optimizer, one file per process


@dataclass
class Position:
    """Where a run is in its loop: what resuming needs besides weights, optimizer, scheduler and RNG."""

    step: int
    micro: int  # micro-batches this process consumed: where its data stream resumes
    batching: Batching  # the layout the stream was drawn in
    total_steps: int
    best_eval: float | None = None
    evals_without_gain: int = 0
    continued_from: int | None = None  # a continuation's first step: its schedule is rebuilt from it


def step_folder(run: Run, step: int) -> Path:
    """Where the checkpoint of ``step`` goes: ``checkpoints/step-N`` in the run folder."""
    return run.path / "checkpoints" / f"step-{step}"


def prune(run: Run, keep: int) -> None:
    """Delete all but the latest ``keep`` checkpoints (rank 0 only)."""
    for old in run.checkpoints()[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


@dataclass
class Checkpoints:
    """Saves and restores of one run's model, made once the trainer has built it; under FSDP every
    process must call :meth:`save` and :meth:`restore` (they hold collectives)."""

    model: torch.nn.Module
    tokenizer: object
    loss_fn: torch.nn.Module  # what the model trains through; sharded in place under FSDP
    dist: distributed.Dist
    sharded: bool
    device: str
    full: bool  # full fine-tuning: every weight is saved, else the adapters

    def save(
        self, dest: Path, optimizer=None, scheduler=None, position: Position | None = None, weights: bool = True
    ) -> None:
        """Save the adapter (or full model) with its tokenizer into ``dest``, and with ``position``
        (then ``optimizer`` and ``scheduler`` too) what resuming needs; ``weights=False`` saves
        only that state (a finished run's weights are its adapter/ or model/ already). A temp
        folder renamed at the end means a half-written save is never mistaken for a finished one."""
        dist, sharded = self.dist, self.sharded
        if not dist.main and not sharded:  # DDP keeps every replica identical: rank 0 saves for all
            return
        tmp = dest.with_name(f".{dest.name}.tmp")
        if dist.main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        gathered = {}
        if sharded:  # every process takes part; rank 0 gets whole tensors, written as one run would
            distributed.barrier(dist)
            if weights:
                gathered = {"state_dict": full_state_dict(self.loss_fn, prefix="model.")}
            if position is not None:  # optimizer state stays sharded: each process writes its own part
                save_sharded(self.loss_fn, optimizer, tmp / SHARDED_DIR)
        if dist.main:
            if weights:
                if len(getattr(self.model, "peft_config", {})) > 1:  # a DPO reference (start_from) is not this run's
                    gathered["selected_adapters"] = ["default"]
                self.model.save_pretrained(tmp, safe_serialization=True, **gathered)
                self.tokenizer.save_pretrained(tmp)
            if position is not None:
                torch.save(
                    {
                        "step": position.step,
                        "micro": position.micro,
                        "processes": dist.world,  # micro counts this process's share of the stream
                        "batching": [position.batching.rows, position.batching.width],  # and in this layout
                        "total_steps": position.total_steps,
                        "best_eval": position.best_eval,
                        "evals_without_gain": position.evals_without_gain,
                        "continued_from": position.continued_from,
                        "optimizer": None if sharded else optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "rng": torch.get_rng_state(),
                        "cuda_rng": torch.cuda.get_rng_state_all() if self.device == "cuda" else None,
                    },
                    tmp / STATE_FILE,
                )
            shutil.rmtree(dest, ignore_errors=True)
            tmp.rename(dest)
        if sharded:
            distributed.barrier(dist)  # nobody goes on (or reads it) before the rename

    def restore(
        self, checkpoint: Path, optimizer, scheduler, layout: Batching, weights: Path | None = None
    ) -> Position:
        """Load a checkpoint's weights, optimizer, scheduler and RNG; returns where the run was.
        ``layout`` is the run's batching now (a checkpoint from before packing was padded);
        ``weights`` is where the weights are when the checkpoint holds only state (final_state/).

        Raises:
            ModelError: the checkpoint was saved by another number of processes, sharded when
                this run is not (or the other way round), or does not match the model.
        """
        state = torch.load(checkpoint / STATE_FILE, weights_only=True)
        processes = state.get("processes", 1)
        if processes != self.dist.world:
            raise models.ModelError(
                f"Checkpoint {checkpoint.name} was saved by a run of {processes} process(es) and this one has "
                f"{self.dist.world}: each process replays its own share of the data, so resume it with "
                f"{processes} (e.g. torchrun --nproc_per_node {processes} -m studio.cli resume ...)."
            )
        was_sharded = (checkpoint / SHARDED_DIR).is_dir()
        if was_sharded != self.sharded:
            how = "sharded (--distributed fsdp)" if was_sharded else "not sharded"
            raise models.ModelError(
                f"Checkpoint {checkpoint.name} was saved by a run that was {how}; resume it the way it "
                "was launched (the same launcher, number of processes and --distributed)."
            )
        if self.sharded:
            load_sharded(self.loss_fn, optimizer, checkpoint / SHARDED_DIR)
        else:
            self._load_weights(weights or checkpoint)
            optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        if state.get("cuda_rng") is not None and self.device == "cuda":
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        # The stream replays in the layout the checkpoint was trained in (packed on a GPU, padded on
        # a CPU; checkpoints from before packing were padded), wherever it resumes.
        return Position(
            step=state["step"],
            micro=state["micro"],
            batching=Batching(*state.get("batching", [layout.rows, None])),
            total_steps=state.get("total_steps", 0),
            best_eval=state.get("best_eval"),
            evals_without_gain=state.get("evals_without_gain", 0),
            continued_from=state.get("continued_from"),
        )

    def _load_weights(self, checkpoint: Path) -> None:
        from safetensors.torch import load_file

        files = sorted(checkpoint.glob("*.safetensors"))
        weights = {k: v for f in files for k, v in load_file(f).items()}
        if self.full:
            missing, unexpected = self.model.load_state_dict(weights, strict=False)
            tied = {k for k in missing if "lm_head" in k or "embed_out" in k}
            if unexpected or set(missing) - tied:
                raise models.ModelError(f"Checkpoint {checkpoint.name} does not match this model; start a new run.")
        else:
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(self.model, weights)


# ---- sharded (FSDP) state ------------------------------------------------------------------------
def full_state_dict(module, prefix: str = "") -> dict:
    """The whole (unsharded) state dict of a sharded module on rank 0 (empty elsewhere), on the
    CPU, keys without ``prefix``. Every process must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k.removeprefix(prefix): v for k, v in full.items()}


def save_sharded(module, optimizer, folder) -> None:
    """Model and optimizer state as a torch distributed checkpoint: each process writes its shards."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(module, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(folder))


def load_sharded(module, optimizer, folder) -> None:
    """Restore what :func:`save_sharded` wrote into the (already sharded) module and its optimizer."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(module, optimizer)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=str(folder))
    set_state_dict(module, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
