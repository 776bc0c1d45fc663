"""Train/eval split that never puts the same prompt on both sides."""

from __future__ import annotations

import random

MAX_EVAL_ROWS = 200  # eval runs every eval_steps: keep it to seconds on a CPU


def split_by_prompt(
    keys: list[str], eval_fraction: float = 0.1, eval_rows: int = 0, seed: int = 42, max_eval: int = MAX_EVAL_ROWS
) -> tuple[list[int], list[int]]:
    """Indices (train, eval). Rows sharing a key (the normalised prompt) stay together, so
    duplicates cannot leak from training into evaluation. ``eval_rows`` > 0 overrides the
    fraction. Fewer than 10 rows: no eval split (there is nothing to spare)."""
    n = len(keys)
    target = eval_rows if eval_rows > 0 else round(n * eval_fraction)
    target = min(target, max_eval, n // 2)
    if n < 10 or target <= 0:
        return list(range(n)), []
    groups: dict[str, list[int]] = {}
    for i, k in enumerate(keys):
        groups.setdefault(k, []).append(i)
    order = list(groups)
    random.Random(seed).shuffle(order)
    eval_idx: list[int] = []
    for k in order:
        if len(eval_idx) >= target:
            break
        eval_idx += groups[k]
    chosen = set(eval_idx)
    return [i for i in range(n) if i not in chosen], sorted(eval_idx)
