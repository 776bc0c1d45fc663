"""How sure a score is: intervals over rows, the paired adapter-minus-base difference, a verdict.

Per-row scores are numbers in [0, 1]. Intervals come from a bootstrap over rows shaped by a
score interval, each doing what it does well:

- **The bootstrap over rows** measures the spread: the variance of the resampled means, and for
  a paired comparison the correlations between the two sides (row indices are resampled once,
  so each row keeps its two scores together).
- **A Wilson score interval** gives the shape, with an effective number of rows
  ``m(1-m) / bootstrap variance`` (the design-effect form of Wilson; for 0/1 scores it is plain
  Wilson, for ROUGE-like scores as narrow as their spread). Why not the bootstrap's own
  percentiles: with 30 rows and a true rate of 2%, all 30 rows score 0 more than half the time,
  every resample of them is 0, and the percentile interval [0, 0] covers 2% well under half the
  time. Wilson asks which rates are consistent with the rows (0 of 30: 0 to 11%), the standard
  fix for proportions near 0 and 1 (Agresti & Coull 1998).
- **The difference** (d = adapter - base per row) is MOVER (Newcombe 1998; Zou & Donner 2008):
  Wilson intervals on its gains ``max(d, 0)`` and losses ``max(-d, 0)`` combined with their
  bootstrap correlation. When few rows differ, gains and losses sit near 0, where Wilson is
  right and the percentile bootstrap collapses to 0 again. For 0/1 scores it is Newcombe's
  interval on the rows where the two sides disagree; for continuous scores gains and losses
  are measured in units of the largest per-row difference seen (with no loss among 30 rows of
  ROUGE gains near 0.1, a loss would be about that size, not a jump from 1 to 0).

``tests/test_eval_stats.py`` simulates the coverage (0/1 scores at 2%, 50% and 98% with 30 and
200 rows, continuous scores, paired differences): measured 92.5-97.8% coverage of the truth
(100% where nearly every row ties and the truth is 0), where the percentile bootstrap covers
2%-with-30-rows 45% of the time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Sequence

import numpy as np

__all__ = ["Paired", "bootstrap_ci", "holm", "paired", "verdict"]

MEANINGFUL = 0.10
"""An interval that still allows a difference this large (10 points) either way cannot say
"no difference": the verdict says the rows are too few instead."""
_TIE = 1e-12  # per-row scores closer than this are a tie
_CELLS = 2_000_000  # resampled values held at once (memory), whatever the rows and resamples
_EXACT_FLIPS = 12  # up to this many differing rows the sign-flip test enumerates all 4096 signs


def _rows(scores: Sequence[float], what: str = "scores") -> np.ndarray:
    x = np.asarray(scores, dtype=np.float64).ravel()
    if x.size == 0:
        raise ValueError(f"No {what} to summarise: score at least one row.")
    if not np.all((x >= 0.0) & (x <= 1.0)):  # NaN fails this too
        bad = float(x[~((x >= 0.0) & (x <= 1.0))][0])
        raise ValueError(f"Per-row {what} must be numbers from 0 to 1 (found {bad!r}); fix the metric that gave it.")
    return x


def _z(level: float) -> float:
    if not 0.0 < level < 1.0:
        raise ValueError(f"The interval level must be between 0 and 1, such as 0.95 (got {level!r}).")
    return NormalDist().inv_cdf(0.5 + level / 2)


def _wilson(mean: float, var: float, n: int, z: float, scale: float = 1.0) -> tuple[float, float]:
    """Wilson score interval for a mean of scores in [0, scale] whose estimate has variance ``var``."""
    if scale != 1.0:
        lo, hi = _wilson(mean / scale, var / scale**2, n, z)
        return lo * scale, hi * scale
    spread = mean * (1.0 - mean)  # the largest per-row variance [0, 1] scores with this mean can have
    if spread <= 1e-12:
        n_eff = float(n)  # every row at 0 (or 1): the binomial worst case, plain Wilson
    elif var <= 1e-15:
        return mean, mean  # every row the same score inside (0, 1): nothing varies
    else:
        n_eff = min(max(spread / var, float(n)), 1e12)  # never more uncertain than 0/1 scores
    denom = 1.0 + z * z / n_eff
    center = (mean + z * z / (2 * n_eff)) / denom
    half = z / denom * math.sqrt(spread / n_eff + z * z / (4 * n_eff * n_eff))
    return max(0.0, center - half), min(1.0, center + half)


def _mover(gain: float, loss: float, gain_ci, loss_ci, r: float) -> tuple[float, float]:
    """Interval for gain - loss from the two intervals and the correlation of their estimates."""
    (g_lo, g_hi), (l_lo, l_hi) = gain_ci, loss_ci
    low = (gain - g_lo) ** 2 + (l_hi - loss) ** 2 - 2 * r * (gain - g_lo) * (l_hi - loss)
    high = (g_hi - gain) ** 2 + (loss - l_lo) ** 2 - 2 * r * (g_hi - gain) * (loss - l_lo)
    diff = gain - loss
    return max(-1.0, diff - math.sqrt(max(low, 0.0))), min(1.0, diff + math.sqrt(max(high, 0.0)))


def _resampled_means(columns: np.ndarray, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """Bootstrap means of each column's rows, (columns, resamples); one index draw serves every
    column, so rows keep their values together."""
    if resamples < 2:
        raise ValueError(f"resamples must be at least 2 (got {resamples}); 2000 is the default.")
    n = columns.shape[1]
    out = np.empty((columns.shape[0], resamples))
    step = max(1, _CELLS // (n * columns.shape[0]))
    for start in range(0, resamples, step):
        stop = min(resamples, start + step)
        idx = rng.integers(0, n, size=(stop - start, n))
        out[:, start:stop] = columns[:, idx].mean(axis=2)
    return out


def bootstrap_ci(
    scores: Sequence[float], *, level: float = 0.95, resamples: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """Interval for the mean of per-row scores: bootstrap over rows for the spread, Wilson for
    the shape (module docstring: why). Scores must lie in [0, 1].

    Example:
        >>> lo, hi = bootstrap_ci([0.0] * 30)
        >>> lo, round(hi, 3)  # 0 of 30 right still allows up to 11%
        (0.0, 0.114)
    """
    x = _rows(scores)
    z = _z(level)
    means = _resampled_means(x[None, :], resamples, np.random.default_rng(seed))[0]
    return _wilson(float(x.mean()), float(means.var()), x.size, z)


@dataclass(frozen=True)
class Paired:
    """Base and adapter on the same rows: means, intervals, per-row wins, and the test of "no difference"."""

    base: float
    """Mean base score."""
    adapter: float
    """Mean adapter score."""
    diff: float
    """adapter - base."""
    base_ci95: tuple[float, float]
    adapter_ci95: tuple[float, float]
    diff_ci95: tuple[float, float]
    """Interval for the difference (paired: each resampled row keeps both its scores)."""
    wins: int
    """Rows where the adapter scores higher than the base."""
    ties: int
    losses: int
    p_value: float
    """Two-sided, for "the difference is 0": a sign-flip permutation test on the per-row
    differences (exact when at most 12 rows differ, else ``resamples`` random flips)."""
    n: int
    """Rows compared."""
    level: float = 0.95
    """The intervals' level (the field names say 95, the default)."""

    def to_dict(self) -> dict:
        """The numbers as JSON types, in the CLI's ``--json`` field names."""
        return {
            "base": float(self.base),
            "adapter": float(self.adapter),
            "base_ci95": [float(x) for x in self.base_ci95],
            "adapter_ci95": [float(x) for x in self.adapter_ci95],
            "diff": float(self.diff),
            "diff_ci95": [float(x) for x in self.diff_ci95],
            "wins": int(self.wins),
            "ties": int(self.ties),
            "losses": int(self.losses),
            "p_value": float(self.p_value),
            "n": int(self.n),
        }


def paired(
    base: Sequence[float], adapter: Sequence[float], *, level: float = 0.95, resamples: int = 2000, seed: int = 0
) -> Paired:
    """Compare per-row scores of base and adapter on the same rows.

    Row indices are resampled ONCE for both sides, so each row keeps its two scores together;
    the intervals are Wilson-shaped and the difference's MOVER (module docstring).

    Example:
        >>> p = paired([0, 0, 1, 0] * 10, [1, 0, 1, 1] * 10)
        >>> (p.wins, p.ties, p.losses), round(p.diff, 2), p.diff_ci95[0] > 0
        ((20, 20, 0), 0.5, True)
    """
    b, a = _rows(base, "base scores"), _rows(adapter, "adapter scores")
    if b.size != a.size:
        raise ValueError(f"{b.size} base scores for {a.size} adapter scores: score both on the same rows.")
    z = _z(level)
    rng = np.random.default_rng(seed)
    d = a - b
    rows = np.stack([b, a, np.clip(d, 0.0, 1.0), np.clip(-d, 0.0, 1.0)])  # base, adapter, gains, losses
    means = rows.mean(axis=1)
    boot = _resampled_means(rows, resamples, rng)
    var = boot.var(axis=1)
    # Gains and losses in units of the largest difference seen (module docstring; 0/1 scores: 1).
    scale = float(np.abs(d).max()) if np.abs(d).max() > _TIE else 1.0
    ci = [_wilson(float(means[k]), float(var[k]), b.size, z, 1.0 if k < 2 else scale) for k in range(4)]
    # Gains and losses never share a row, so their means correlate negatively: a wider interval.
    r = float(np.corrcoef(boot[2], boot[3])[0, 1]) if var[2] > 0 and var[3] > 0 else 0.0
    return Paired(
        base=float(means[0]),
        adapter=float(means[1]),
        diff=float(d.mean()),
        base_ci95=ci[0],
        adapter_ci95=ci[1],
        diff_ci95=_mover(float(means[2]), float(means[3]), ci[2], ci[3], r),
        wins=int(np.sum(d > _TIE)),
        ties=int(np.sum(np.abs(d) <= _TIE)),
        losses=int(np.sum(d < -_TIE)),
        p_value=_sign_flip_p(d, resamples, rng),
        n=int(d.size),
        level=level,
    )


def _sign_flip_p(d: np.ndarray, resamples: int, rng: np.random.Generator) -> float:
    """P(|mean| at least this large) if each row's difference were as likely negated (no effect)."""
    moved = np.abs(d[np.abs(d) > _TIE])
    m = moved.size
    if m == 0:
        return 1.0
    observed = abs(float(d.sum())) - 1e-9  # the rows that tie add 0 under every flip
    if m <= _EXACT_FLIPS:
        signs = 1 - 2 * ((np.arange(2**m)[:, None] >> np.arange(m)) & 1)
        return float(np.mean(np.abs(signs @ moved) >= observed))
    hits, step = 0, max(1, _CELLS // m)
    for start in range(0, resamples, step):
        signs = rng.choice(np.array([-1.0, 1.0]), size=(min(step, resamples - start), m))
        hits += int(np.sum(np.abs(signs @ moved) >= observed))
    return (hits + 1) / (resamples + 1)


_SHOWN = {
    "exact_match": "exact match",
    "contains": "contains",
    "json": "JSON fields",
    "json_valid": "valid JSON",
    "regex": "the format",
    "label": "label accuracy",
    "numeric": "numeric match",
    "rouge_l": "ROUGE-L",
    "chrf": "chrF",
}


def _points(x: float) -> str:
    """A difference in points (score x 100), signed: +42, -2, +0.4, 0."""
    v = x * 100
    v = round(v) if abs(v) >= 9.95 else round(v, 1)
    if v == 0:
        return "0"
    text = f"{abs(v):g}"
    return ("+" if v > 0 else "-") + text


def verdict(p: Paired, metric: str, than: str | None = None) -> str:
    """One sentence that follows from the difference's interval (the adapter against the base,
    or against ``than``, another adapter scored on the same rows).

    Better (or worse) "larger than chance" when the interval excludes 0; "no difference" when
    it includes 0 and excludes differences of 10 points (:data:`MEANINGFUL`) either way; else
    the rows are too few to tell.

    Example:
        >>> verdict(paired([0] * 50, [1] * 30 + [0] * 20), "exact_match")
        'The adapter is better on exact match (+60 points, 95% interval +44 to +72): larger than chance.'
    """
    name = _SHOWN.get(metric, metric.replace("_", " "))
    level = f"{p.level * 100:g}%"
    lo, hi = p.diff_ci95
    numbers = f"{_points(p.diff)} points, {level} interval {_points(lo)} to {_points(hi)}"
    other = f" than {than}" if than else ""
    if lo > 0:
        return f"The adapter is better{other} on {name} ({numbers}): larger than chance."
    if hi < 0:
        return f"The adapter is worse{other} on {name} ({numbers}): larger than chance."
    if max(-lo, hi) < MEANINGFUL:
        return f"No difference on {name} larger than chance ({numbers})."
    rows = "1 row is" if p.n == 1 else f"{p.n} rows are"
    size = _points(abs(p.diff)).lstrip("+")
    what = f"a difference of {size} points on {name}" if size != "0" else f"whether the adapter differs on {name}"
    return f"{rows} too few to tell {what}: the {level} interval runs from {_points(lo)} to {_points(hi)}."


def holm(p_values: Sequence[float], alpha: float = 0.05) -> list[bool]:
    """Holm-Bonferroni: which hypotheses are rejected at family-wise error ``alpha``, in input order.

    The smallest p-value is compared with alpha/m, the next with alpha/(m-1), and so on; the
    first that fails stops the rejections. A NaN p-value is never rejected.

    Example:
        >>> holm([0.01, 0.04, 0.03, 0.005])
        [True, False, False, True]
    """
    ps = [1.0 if p is None or math.isnan(p) else float(p) for p in p_values]
    m = len(ps)
    rejected = [False] * m
    for rank, i in enumerate(sorted(range(m), key=lambda k: ps[k])):
        if ps[i] > alpha / (m - rank):
            break
        rejected[i] = True
    return rejected
