"""The learning-rate schedule of a continuation: a finished run trained on to a new total.

A finished run's own schedule has decayed to (about) zero at its final step, so continuing it
on that schedule would not train at all, and jumping straight back to the peak would shake the
Adam moments it carries over. A continuation therefore gets its own schedule over the added
steps: a short linear warm-up from near zero to the run's learning rate, then the run's own kind
of decay (cosine, linear or constant).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

MAX_WARMUP_SHARE = 0.1  # a continuation warms up over at most 10% of the steps it adds


@dataclass(frozen=True)
class Continuation:
    """Steps ``start`` -> ``total``: ``warmup`` steps up to the peak, then ``kind`` decay."""

    start: int
    total: int
    warmup: int
    kind: str  # training.lr_scheduler: cosine | linear | constant

    @classmethod
    def plan(cls, start: int, total: int, warmup_ratio: float, kind: str) -> "Continuation":
        """The run's warm-up ratio (at most 10%) of the added steps, and at least one step: the
        first continued step never trains at the full rate on moments built at a rate near zero."""
        added = total - start
        warmup = max(1, round(min(warmup_ratio, MAX_WARMUP_SHARE) * added))
        return cls(start, total, min(warmup, max(added - 1, 1)), kind)

    def factor(self, i: int) -> float:
        """The share of the peak learning rate that the continuation's step ``i`` (0-based) uses.
        Warm-up rises to the peak without starting at zero; the decay never reaches zero inside
        the continuation, so its last step still trains."""
        if i < self.warmup:
            return (i + 1) / (self.warmup + 1)
        progress = (i - self.warmup) / max(1, self.total - self.start - self.warmup)
        if self.kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        if self.kind == "linear":
            return 1.0 - progress
        return 1.0

    def scheduler(self, optimizer: torch.optim.Optimizer, base_lrs: list[float], done: int = 0):
        """A LambdaLR over the optimizer (its Adam moments kept), peaking at ``base_lrs``, with
        ``done`` of the continuation's steps already taken (a stopped continuation resumed)."""
        for group, base in zip(optimizer.param_groups, base_lrs):
            group["initial_lr"] = base
        # A plain function, not a bound method: LambdaLR's state_dict leaves those out, so a
        # checkpoint loads into whichever schedule the resumed run builds first.
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: self.factor(i), last_epoch=done - 1)

    def describe(self, peak: float) -> str:
        """What the person reads in the run's status and log."""
        decay = self.total - self.start - self.warmup
        how = {"cosine": "cosine decay", "linear": "linear decay", "constant": "constant"}.get(self.kind, self.kind)
        return (
            f"Continuing from step {self.start} to {self.total}: warm-up {self.warmup} "
            f"step{'s' if self.warmup != 1 else ''} to learning rate {peak:g}, then {how} over {decay} steps."
        )
