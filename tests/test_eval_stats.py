"""Intervals that mean what they say: a coverage simulation (small sets, scores near 0 and 1,
paired differences), the sign-flip test's error rate, the verdict's words against numbers, Holm."""

import math

import numpy as np
import pytest

from studio.evaluation.stats import Paired, bootstrap_ci, holm, paired, verdict

pytestmark = pytest.mark.unit

# The simulation: REPS data sets per case, each interval at 95%. With 400 sets the measured
# coverage of a true 95% interval has a standard deviation of 1.1 points, so 91.5% is 3 below:
# a real undercoverage fails, noise does not. RESAMPLES is below the default (2000) to keep the
# file fast; it only adds Monte Carlo noise to the bootstrap's variance (about 4%).
REPS, RESAMPLES, FLOOR = 400, 1000, 0.915


def _coverage(draw, truth, interval) -> float:
    rng = np.random.default_rng(20261206)
    hits = 0
    for rep in range(REPS):
        lo, hi = interval(draw(rng), rep)
        hits += lo <= truth <= hi
    return hits / REPS


@pytest.mark.parametrize("p", [0.02, 0.5, 0.98])
@pytest.mark.parametrize("n", [30, 200])
def test_mean_interval_covers_bernoulli_rates(p, n):
    cov = _coverage(
        lambda rng: (rng.random(n) < p).astype(float), p, lambda x, rep: bootstrap_ci(x, resamples=RESAMPLES, seed=rep)
    )
    print(f"bernoulli p={p} n={n}: coverage {cov:.3f}")
    # At 2% of 30 rows the data can only be 0, 1, 2, 3 ... of 30: no interval covers exactly 95%,
    # and Wilson's (0/30: 0-11%, 2/30: 1.9-21%, 3/30: 3.5-26%) covers 97.8% (exact binomial sum).
    assert FLOOR <= cov <= (0.995 if n * min(p, 1 - p) > 1 else 1.0)


def test_the_plain_percentile_bootstrap_fails_where_ours_does_not():
    """Why the Wilson shape (stats.py docstring): 30 rows at 2% are all 0 most of the time."""

    def percentile(x, rep):
        means = x[np.random.default_rng(rep).integers(0, x.size, (RESAMPLES, x.size))].mean(axis=1)
        return np.quantile(means, [0.025, 0.975])

    cov = _coverage(lambda rng: (rng.random(30) < 0.02).astype(float), 0.02, percentile)
    print(f"plain percentile bootstrap, p=0.02 n=30: coverage {cov:.3f}")
    assert cov < 0.6


@pytest.mark.parametrize("a, b, n", [(0.5, 5.0, 30), (2.0, 2.0, 30), (0.5, 5.0, 200)])
def test_mean_interval_covers_continuous_scores(a, b, n):
    """ROUGE-like scores: skewed near 0 (Beta(0.5, 5), mean 0.09) and spread out (Beta(2, 2))."""
    cov = _coverage(
        lambda rng: rng.beta(a, b, n), a / (a + b), lambda x, rep: bootstrap_ci(x, resamples=RESAMPLES, seed=rep)
    )
    print(f"beta({a}, {b}) n={n}: coverage {cov:.3f}")
    assert FLOOR <= cov <= 0.995


def _binary_pairs(p_base, fix, br, n):
    """0/1 scores: the adapter fixes a share `fix` of the base's wrong rows and breaks `br` of its right ones."""

    def draw(rng):
        base = rng.random(n) < p_base
        adapter = np.where(base, rng.random(n) >= br, rng.random(n) < fix)
        return base.astype(float), adapter.astype(float)

    return draw, (1 - p_base) * fix - p_base * br


def _independent_pairs(p_base, p_adapter, n):
    def draw(rng):
        return (rng.random(n) < p_base).astype(float), (rng.random(n) < p_adapter).astype(float)

    return draw, p_adapter - p_base


def _continuous_pairs(n):
    """ROUGE-like: the adapter adds 0.05 on average, with per-row noise, clipped to [0, 1]."""

    def draw(rng):
        base = rng.beta(2, 5, n)
        return base, np.clip(base + rng.normal(0.05, 0.1, n), 0, 1)

    rng = np.random.default_rng(99)  # the true mean difference, from two million rows
    base = rng.beta(2, 5, 2_000_000)
    truth = float(np.mean(np.clip(base + rng.normal(0.05, 0.1, base.size), 0, 1) - base))
    return draw, truth


@pytest.mark.parametrize(
    "case",
    [
        "fixes many, n=30",
        "fixes many, n=200",
        "rare: 2% vs 5%, n=30",
        "ceiling: 95% vs 98%, n=200",
        "no effect, few rows differ, n=30",
        "continuous, n=30",
        "continuous, n=200",
    ],
)
def test_paired_difference_interval_covers_the_true_difference(case):
    draw, truth = {
        "fixes many, n=30": lambda: _binary_pairs(0.5, 0.4, 0.05, 30),
        "fixes many, n=200": lambda: _binary_pairs(0.5, 0.4, 0.05, 200),
        "rare: 2% vs 5%, n=30": lambda: _independent_pairs(0.02, 0.05, 30),
        "ceiling: 95% vs 98%, n=200": lambda: _independent_pairs(0.95, 0.98, 200),
        "no effect, few rows differ, n=30": lambda: _binary_pairs(0.5, 0.03, 0.03, 30),
        "continuous, n=30": lambda: _continuous_pairs(30),
        "continuous, n=200": lambda: _continuous_pairs(200),
    }[case]()

    def interval(pair, rep):
        return paired(*pair, resamples=RESAMPLES, seed=rep).diff_ci95

    cov = _coverage(draw, truth, interval)
    print(f"paired {case}: true difference {truth:+.4f}, coverage {cov:.3f}")
    assert cov >= FLOOR
    if "rare" not in case and "few rows" not in case:  # where nearly every row ties, discreteness rules
        assert cov <= 0.995


def test_sign_flip_test_holds_its_error_rate_when_nothing_changed():
    draw, truth = _binary_pairs(0.5, 0.2, 0.2, 30)  # rows change both ways, equally often
    assert truth == 0
    rng = np.random.default_rng(3)
    rejections = sum(paired(*draw(rng), resamples=500, seed=rep).p_value < 0.05 for rep in range(REPS))
    print(f"sign-flip test at 5%: {rejections / REPS:.3f} false alarms")
    assert rejections / REPS <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / REPS)


# --- known answers ------------------------------------------------------------------------


def test_bootstrap_ci_known_values():
    lo, hi = bootstrap_ci([0.0] * 30)
    assert lo == 0.0 and hi == pytest.approx(0.1135, abs=1e-4)  # Wilson, 0 of 30
    lo, hi = bootstrap_ci([1.0] * 30)
    assert hi == 1.0 and lo == pytest.approx(1 - 0.1135, abs=1e-4)
    lo, hi = bootstrap_ci([0.0, 1.0] * 15)
    assert lo == pytest.approx(0.3315, abs=0.01) and hi == pytest.approx(0.6685, abs=0.01)  # Wilson, 15 of 30
    assert bootstrap_ci([0.5] * 10) == (0.5, 0.5)  # nothing varies
    lo, hi = bootstrap_ci([0.4, 0.5, 0.6] * 100)  # continuous: as narrow as the spread (sd 0.082)
    assert hi - lo == pytest.approx(2 * 1.96 * 0.0816 / math.sqrt(300), rel=0.1)
    assert bootstrap_ci([0.0, 1.0] * 15, seed=1) == bootstrap_ci([0.0, 1.0] * 15, seed=1)


def test_a_wider_level_is_a_wider_interval():
    x = [0.0, 1.0, 1.0] * 10
    lo90, hi90 = bootstrap_ci(x, level=0.9)
    lo99, hi99 = bootstrap_ci(x, level=0.99)
    assert lo99 < lo90 < 2 / 3 < hi90 < hi99


@pytest.mark.parametrize(
    "call, words",
    [
        (lambda: bootstrap_ci([]), "No scores"),
        (lambda: bootstrap_ci([0.5, float("nan")]), "from 0 to 1 (found nan)"),
        (lambda: bootstrap_ci([1.5]), "from 0 to 1 (found 1.5)"),
        (lambda: bootstrap_ci([0.5], level=95), "between 0 and 1"),
        (lambda: paired([0, 1], [1]), "2 base scores for 1 adapter scores"),
        (lambda: paired([], []), "No base scores"),
    ],
)
def test_bad_input_says_what(call, words):
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")):
        call()


def test_paired_counts_and_exact_p_value():
    p = paired([0.0] * 10, [1.0] * 3 + [0.0] * 7)
    assert (p.wins, p.ties, p.losses, p.n) == (3, 7, 0, 10)
    assert p.diff == pytest.approx(0.3) and p.base == 0.0 and p.adapter == pytest.approx(0.3)
    assert p.p_value == pytest.approx(2 / 8)  # 3 rows differ: 2 of the 8 sign patterns are as extreme
    assert p.diff_ci95[0] < 0 < p.diff_ci95[1]  # 3 wins of 10 rows: not enough
    many = paired([0.0] * 40, [1.0] * 20 + [0.0] * 20)  # 20 rows differ: random flips
    assert many.p_value == pytest.approx(1 / 2001) and many.diff_ci95[0] > 0
    same = paired([0.3, 0.7, 1.0] * 10, [0.3, 0.7, 1.0] * 10)
    assert (same.wins, same.ties, same.losses, same.diff, same.p_value) == (0, 30, 0, 0.0, 1.0)
    assert same.diff_ci95[0] < 0 < same.diff_ci95[1]  # 30 ties still allow a difference
    mixed = paired([0.5, 0.6], [0.6, 0.5])
    assert (mixed.wins, mixed.ties, mixed.losses) == (1, 0, 1)
    assert set(p.to_dict()) >= {"base", "adapter", "base_ci95", "adapter_ci95", "diff", "diff_ci95", "wins", "ties"}


def test_paired_keeps_each_row_together():
    """Strongly correlated sides: the paired interval is far narrower than the two sides' own."""
    rng = np.random.default_rng(0)
    base = rng.beta(2, 2, 100)
    p = paired(base, np.clip(base + 0.02, 0, 1))
    width = p.diff_ci95[1] - p.diff_ci95[0]
    assert p.diff_ci95[0] > 0 and width < 0.2 * (p.base_ci95[1] - p.base_ci95[0])


def _pair(diff, lo, hi, n=100):
    return Paired(0.5, 0.5 + diff, diff, (0.4, 0.6), (0.4, 0.6), (lo, hi), 1, 1, 1, 0.5, n)


@pytest.mark.parametrize(
    "p, metric, sentence",
    [
        (
            _pair(0.42, 0.30, 0.54),
            "exact_match",
            "The adapter is better on exact match (+42 points, 95% interval +30 to +54): larger than chance.",
        ),
        (
            _pair(-0.2, -0.3, -0.1),
            "rouge_l",
            "The adapter is worse on ROUGE-L (-20 points, 95% interval -30 to -10): larger than chance.",
        ),
        (
            _pair(-0.02, -0.09, 0.05),
            "exact_match",
            "No difference on exact match larger than chance (-2 points, 95% interval -9 to +5).",
        ),
        (
            _pair(0.05, -0.12, 0.22, n=30),
            "exact_match",
            "30 rows are too few to tell a difference of 5 points on exact match: "
            "the 95% interval runs from -12 to +22.",
        ),
        (
            _pair(0.0, -0.11, 0.11, n=30),
            "regex",
            "30 rows are too few to tell whether the adapter differs on the format: "
            "the 95% interval runs from -11 to +11.",
        ),
        (
            _pair(0.004, 0.001, 0.007, n=5000),
            "chrf",
            "The adapter is better on chrF (+0.4 points, 95% interval +0.1 to +0.7): larger than chance.",
        ),
        (
            _pair(0.0, 0.0, 0.3),
            "custom:mine:f",
            "100 rows are too few to tell whether the adapter differs on custom:mine:f: "
            "the 95% interval runs from 0 to +30.",
        ),
    ],
)
def test_verdict_words(p, metric, sentence):
    assert verdict(p, metric) == sentence


def test_verdict_follows_the_numbers_on_real_comparisons():
    rng = np.random.default_rng(5)
    seen = set()
    for rep in range(48):
        n = [30, 200][rep % 2]
        base = (rng.random(n) < 0.5).astype(float)
        change = rng.random(n) < [0.4, 0.4, 0.04][rep % 3]
        adapter = [np.where(change, 1.0, base), np.where(change, 0.0, base), np.where(change, 1 - base, base)][rep % 3]
        p = paired(base, adapter, resamples=300, seed=rep)
        text = verdict(p, "exact_match")
        lo, hi = p.diff_ci95
        if lo > 0:
            kind, start = "better", "The adapter is better on exact match ("
        elif hi < 0:
            kind, start = "worse", "The adapter is worse on exact match ("
        elif max(-lo, hi) < 0.10:
            kind, start = "none", "No difference on exact match larger than chance ("
        else:
            kind, start = "few", f"{n} rows are too few to tell "
        assert text.startswith(start), (p, text)
        seen.add(kind)
    assert seen == {"better", "worse", "none", "few"}  # every case happened, not one of them alone


@pytest.mark.parametrize(
    "p_values, alpha, expected",
    [
        ([0.01, 0.04, 0.03, 0.005], 0.05, [True, False, False, True]),
        ([0.01, 0.02, 0.03], 0.05, [True, True, True]),  # 0.01 <= 0.05/3, 0.02 <= 0.05/2, 0.03 <= 0.05
        ([0.04, 0.001, 0.5], 0.05, [False, True, False]),  # 0.04 > 0.05/2: stops there
        ([0.03, 0.03], 0.05, [False, False]),  # Bonferroni's step: 0.03 > 0.025
        ([0.02, 0.02], 0.05, [True, True]),
        ([0.2, 0.01, 0.01, 0.01], 0.05, [False, True, True, True]),  # 0.01 <= 0.05/2, then 0.2 > 0.05
        ([float("nan"), 0.001], 0.05, [False, True]),
        ([0.009], 0.01, [True]),
        ([], 0.05, []),
    ],
)
def test_holm(p_values, alpha, expected):
    assert holm(p_values, alpha) == expected
