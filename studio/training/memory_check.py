"""Measure before training: an optimizer step on the longest rows, peak memory against the estimate.

Under several processes (DDP or FSDP) every process checks itself on the same rows, against the
per-device estimate, and they agree on one verdict: if one would not fit, all stop with its
sentence; the numbers reported are the process that used the most.

Length-sorted batching puts the longest rows together, so the batch of the longest rows is
the run's worst case: if a step on it fits, the run fits. A training step's peak comes once the
optimizer holds its state (the second step of a run): so the state is allocated first, by a step
on zero gradients, and one forward and backward on the longest rows follow (two real steps took
twice as long, 4.1 s before the first loss point on the default model, 2-core CPU). Both run with
learning rate 0 and the RNG state is restored afterwards, and the optimizer and scheduler are rebuilt,
so the run that follows is exactly the run it would have been without the check (a test
compares the losses).

What is measured:
    CUDA  torch.cuda.max_memory_allocated plus what the device already used outside torch's
          allocator (the CUDA context, other processes), i.e. the device's peak use
    CPU   the process's peak resident set size (VmHWM, reset through /proc/self/clear_refs
          so the peak is this check's own)
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil
import torch

from studio.data.render import labeled_tokens
from studio.formatting import format_bytes
from studio.planning.memory import estimate, shape_for_model

STEPS = 1  # on the longest rows, after the optimizer's state is allocated


class MemoryCheckFailed(Exception):
    """The run would not fit; the message says by how much and what to change."""

    def __init__(self, message: str, suggestion=None):
        super().__init__(message)
        self.suggestion = suggestion  # planner.Suggestion: the change a one-click retry applies


@dataclass
class MemoryCheck:
    """What the check measured, and the estimate on the same basis.

    On CUDA both are the device's peak (allocated plus context). On CPU they are the training's
    own memory on top of the loaded model (peak RSS minus the RSS before the check; the estimate
    minus weights, adapter and runtime), so the comparison holds inside the web server too,
    whose process also holds the page's libraries and perhaps a chat model.
    """

    device: str
    batch_size: int
    seq_len: int  # the longest batch's width (tokens)
    peak_bytes: int  # device peak on CUDA, process peak RSS on CPU
    baseline_bytes: int  # the same quantity just before the check (model loaded)
    measured_bytes: int  # compared with the estimate: the device peak, or the CPU increase
    estimate_bytes: int  # studio.planning.memory's estimate for this exact batch shape, same basis
    available_bytes: int  # device total on CUDA; this process's RSS plus RAM available on CPU
    seconds: float

    @property
    def error(self) -> float:
        """Estimate relative to the measurement (+0.05 = the estimate was 5% high)."""
        return self.estimate_bytes / self.measured_bytes - 1 if self.measured_bytes else 0.0

    def summary(self) -> str:
        what = "peak GPU memory" if self.device == "cuda" else "memory on top of the loaded model (process RSS)"
        return (
            f"Memory check (a step on the longest rows, batch {self.batch_size} x {self.seq_len} tokens): "
            f"{what} {format_bytes(self.measured_bytes, 2)} measured, {format_bytes(self.estimate_bytes, 2)} estimated "
            f"({self.error:+.0%})."
        )

    def to_dict(self) -> dict:
        return asdict(self) | {"summary": self.summary()}


def _cpu_peak_rss() -> int:
    text = Path("/proc/self/status").read_text()
    m = re.search(r"VmHWM:\s+(\d+) kB", text)
    return int(m.group(1)) * 1024 if m else psutil.Process().memory_info().rss


def _reset_cpu_peak() -> None:
    try:  # Linux: "5" resets the peak RSS (VmHWM) to the current RSS
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # elsewhere the peak is the process's lifetime peak: an overestimate, never an under-


def _cuda_outside_allocator() -> int:
    free, total = torch.cuda.mem_get_info()
    return (total - free) - torch.cuda.memory_reserved()


def available_bytes(device: str, local_rank: int = 0) -> int:
    """What the run may reach at its peak: this process's GPU's total memory (the measurement
    counts the context and other processes too), or this process's RSS plus its share of the RAM
    still available (the processes of a run on one machine share it)."""
    if device == "cuda":
        return torch.cuda.get_device_properties(local_rank).total_memory
    sharing = max(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), 1)
    return psutil.virtual_memory().available // sharing + psutil.Process().memory_info().rss


def check_memory(trainer) -> MemoryCheck:
    """Run the check on a set-up trainer. Raises MemoryCheckFailed when the run would not fit."""
    from studio.planning.planner import settings_for, suggest

    cfg = trainer.config
    batch = trainer.largest_batch()
    rows, width = batch["input_ids"].shape
    device = trainer.device
    shape = shape_for_model(cfg.model, cfg.trust_remote_code)
    # The output layer runs at labeled positions only (training/loss.py): the estimate counts those.
    labeled = labeled_tokens(batch) if trainer.loss_fn.labeled_only else rows * width
    # The measured batch, on this run's devices; precision resolves from the same config and
    # hardware as the trainer's did.
    settings = settings_for(
        cfg,
        trainer.hw,
        device,
        seq_len=width,
        batch_size=rows if cfg.training.objective == "sft" else rows // 2,  # a preference pair is two rows
        labeled_share=labeled / (rows * width),
        devices=trainer.dist.world,
        sharded=trainer.sharded,
    )
    breakdown = estimate(shape, cfg.method, settings, device).breakdown
    est = sum(breakdown.values())
    already_loaded = breakdown["base_weights"] + breakdown["adapter_weights"] + breakdown["runtime_overhead"]
    dist = trainer.dist

    available = available_bytes(device, trainer.dist.local_rank)

    def would_not_fit(what: str) -> MemoryCheckFailed:
        fix = suggest(shape, cfg.method, settings, device, available)
        return MemoryCheckFailed(
            f"{what} {fix.text if fix else 'Choose QLoRA, a smaller model, or shorter rows.'}", fix
        )

    # On CPU running out of memory is not an exception: the kernel kills the process (the
    # server with it). So a run the estimate says cannot fit is refused before it is tried.
    refused = None
    if device != "cuda" and est > available:
        refused = would_not_fit(
            f"This run needs about {format_bytes(est, 2)} of RAM (batch {rows} x {width} tokens) but "
            f"{format_bytes(available, 2)} is available."
        )
    _agree(refused, dist)  # every process tries the steps, or none does

    rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if device == "cuda" else None
    for group in trainer.optimizer.param_groups:
        group["lr"] = 0.0  # the steps allocate everything a real step does but change no weight
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    trainer.model.train()
    start = time.time()
    out_of_memory = None
    try:
        # On CPU weights load memory-mapped and enter RSS on first use: a tiny forward first, so
        # that the baseline already holds them and the increase is training's own memory. Through
        # the loss module: under FSDP it is the root that gathers the sharded weights. (Not on
        # CUDA, where the weights are already in place and a compiled model would compile for it.)
        if device != "cuda":
            with torch.no_grad(), trainer.autocast():
                first = 1 if cfg.training.objective == "sft" else 2  # a preference loss compares a pair
                trainer.loss_fn(input_ids=batch["input_ids"][:first, :8], labels=batch["labels"][:first, :8])
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            outside = _cuda_outside_allocator()
            baseline = torch.cuda.memory_allocated() + outside
        else:
            baseline = psutil.Process().memory_info().rss
            _reset_cpu_peak()
        for p in params:  # the optimizer's state, as a step allocates it (the gradients are freed after)
            p.grad = torch.zeros_like(p)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
        for _ in range(STEPS):
            with trainer.autocast():
                loss = trainer.loss_fn(**batch)  # the loss path training uses
            loss.backward()
            trainer.clip_gradients(params)
            trainer.optimizer.step()
            trainer.optimizer.zero_grad(set_to_none=True)
            del loss
        if device == "cuda":
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() + outside
        else:
            peak = _cpu_peak_rss()
    except (torch.OutOfMemoryError, MemoryError):
        trainer.optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.empty_cache()
        out_of_memory = would_not_fit(
            f"The memory check ran out of memory with batch {rows} x {width} tokens "
            f"({format_bytes(available, 2)} {'on the GPU' if device == 'cuda' else 'of RAM'})."
        )
    finally:
        torch.set_rng_state(rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
    _agree(out_of_memory, dist)
    trainer.reset_optimizer()  # fresh AdamW state and schedule: the check leaves no trace
    if device == "cuda":
        measured, compared = peak, est
    else:
        measured, compared = max(0, peak - baseline), max(0, est - already_loaded)
    result = MemoryCheck(
        device,
        rows,
        width,
        int(peak),
        int(baseline),
        int(measured),
        int(compared),
        int(available),
        round(time.time() - start, 2),
    )
    swapping = None
    if device != "cuda" and measured > available - baseline:
        swapping = would_not_fit(
            f"A step needed {format_bytes(measured, 2)} more RAM than the "
            f"{format_bytes(available - baseline, 2)} that was free, so the run would swap."
        )
    _agree(swapping, dist)
    return _largest(result, dist)


def _agree(failure: MemoryCheckFailed | None, dist) -> None:
    """Raise ``failure`` here, or, under several processes, the first process's failure on every
    process (so that none trains on while another stopped)."""
    if dist.enabled:
        verdicts: list = [None] * dist.world
        mine = None if failure is None else (str(failure), failure.suggestion)
        torch.distributed.all_gather_object(verdicts, mine)
        rank, first = next(((r, v) for r, v in enumerate(verdicts) if v is not None), (None, None))
        if first is not None:
            raise MemoryCheckFailed(f"Process {rank} of {dist.world}: {first[0]}", first[1])
    elif failure is not None:
        raise failure


def _largest(result: MemoryCheck, dist) -> MemoryCheck:
    """The measurement of the process that used the most memory (every process gets it)."""
    if not dist.enabled:
        return result
    results: list = [None] * dist.world
    torch.distributed.all_gather_object(results, result)
    return max(results, key=lambda r: r.measured_bytes)
