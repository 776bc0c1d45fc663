"""General regression (studio/evaluation/regression.py): the KL against a hand computation, the
sentence following the thresholds, the bundled prompts, and the tiny model's adapter measured
against its base (KL above 0) and the base against itself (exactly 0, nothing changed)."""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest
import torch

from studio.evaluation import regression
from studio.evaluation.regression import (
    CHANGED_ROUGE_L,
    KL_LARGE,
    KL_SMALL,
    general_prompts,
    sentence,
    summarise,
    token_kl,
)

RESULT_KEYS = {"kl_per_token", "kl_ci95", "changed_share", "changed_ci95", "prompts", "tokens", "level"}
RESULT_KEYS |= {"sentence", "thresholds", "max_new_tokens", "seconds", "most_changed"}


# ---- the numbers ------------------------------------------------------------------------------
@pytest.mark.unit
def test_kl_of_a_known_pair_matches_the_hand_computation():
    p = torch.tensor([0.5, 0.25, 0.25])
    q = torch.tensor([0.25, 0.5, 0.25])
    by_hand = 0.5 * math.log(0.5 / 0.25) + 0.25 * math.log(0.25 / 0.5) + 0.25 * math.log(1.0)  # = 0.25 ln 2
    kl = token_kl(p.log()[None], q.log()[None])
    assert kl.shape == (1,)
    assert kl.item() == pytest.approx(by_hand, abs=1e-6)  # fp32 math: ~1e-7 of rounding
    assert kl.item() == pytest.approx(0.25 * math.log(2), abs=1e-6)


@pytest.mark.unit
def test_identical_distributions_give_zero_and_a_ruled_out_token_adds_nothing():
    logits = torch.randn(2, 5, 50, generator=torch.Generator().manual_seed(0))
    log_probs = torch.log_softmax(logits, -1)
    assert torch.equal(token_kl(log_probs, log_probs), torch.zeros(2, 5))
    # The base gives token 0 no chance (log-prob -inf): 0 * (-inf - q) is 0, not NaN.
    p = torch.tensor([[float("-inf"), math.log(0.5), math.log(0.5)]])
    q = torch.log(torch.tensor([[0.2, 0.4, 0.4]]))
    assert token_kl(p, q).item() == pytest.approx(math.log(0.5 / 0.4), abs=1e-6)
    # bf16 log-probs are read in fp32: the same pair in bf16 gives the fp32 answer to bf16's precision.
    assert token_kl(p.bfloat16(), q.bfloat16()).item() == pytest.approx(math.log(0.5 / 0.4), abs=1e-2)


@pytest.mark.unit
def test_summarise_pools_tokens_and_counts_changed_answers():
    # Two prompts: 3 nats over 10 tokens and 1 nat over 30 tokens: 4 / 40 = 0.1 per token (pooled,
    # not the mean of 0.3 and 0.033). One adapter answer keeps under half of the base's.
    result = summarise([3.0, 1.0], [10, 30], [1.0, CHANGED_ROUGE_L - 0.01])
    assert result["kl_per_token"] == pytest.approx(0.1)
    assert result["changed_share"] == 0.5 and result["prompts"] == 2 and result["tokens"] == 40
    lo, hi = result["kl_ci95"]
    assert 1 / 30 - 1e-9 <= lo <= 0.1 <= hi <= 0.3 + 1e-9  # between the two prompts' own rates
    lo, hi = result["changed_ci95"]
    assert 0 <= lo < 0.5 < hi <= 1
    same = summarise([0.0] * 5, [12] * 5, [1.0] * 5)
    assert same["kl_per_token"] == 0 and same["changed_share"] == 0 and same["level"] == "small"
    assert same["kl_ci95"] == [0.0, 0.0]
    with pytest.raises(ValueError, match="at least one"):
        summarise([], [], [])


@pytest.mark.unit
@pytest.mark.parametrize(
    ("kl", "level", "opening"),
    [
        (0.0, "small", "behaves like the base"),
        (KL_SMALL - 0.001, "small", "behaves like the base"),
        (KL_SMALL, "moderate", "has moved somewhat"),
        (KL_LARGE, "moderate", "has moved somewhat"),
        (KL_LARGE + 0.001, "large", "answers differently"),
        (3.0, "large", "answers differently"),
    ],
)
def test_the_sentence_follows_the_thresholds(kl, level, opening):
    assert regression.level(kl) == level
    text = sentence(kl, 0.04, 100)
    assert opening in text
    assert f"KL {kl:.3f} nats/token" in text and "4 of 100 answers (4%) changed materially" in text
    assert f"below {KL_SMALL} is small, above {KL_LARGE} large" in text  # the thresholds explained
    assert f"ROUGE-L below {CHANGED_ROUGE_L}" in text and text.endswith(".")
    assert ("Read the answers that changed most" in text) == (level == "large")  # the next step


@pytest.mark.unit
def test_a_small_kl_with_many_changed_answers_is_not_called_unchanged():
    """A tiny or undertrained base forks its greedy answers at near-ties: KL 0.001 with 80% of the
    answers changed must not read "behaves like the base" (it did, on the tiny test model)."""
    text = sentence(0.001, 0.8, 10)
    assert "behaves like the base" not in text and "barely moved" in text and "near-ties" in text
    assert "8 of 10 answers (80%) changed materially" in text
    calm = sentence(0.001, regression.CHANGED_MANY - 0.01, 100)
    assert "behaves like the base" in calm and "near-ties" not in calm


# ---- the bundled prompts --------------------------------------------------------------------------
@pytest.mark.unit
def test_the_bundled_prompts_load_are_unique_varied_and_ship_in_the_package():
    prompts = general_prompts()
    assert len(prompts) == 100
    assert len({p.prompt for p in prompts}) == 100 and len({p.id for p in prompts}) == 100
    assert all(p.prompt.strip() == p.prompt and len(p.prompt) >= 10 for p in prompts)
    assert len({p.category for p in prompts}) >= 10
    few = general_prompts(10)
    assert len(few) == 10 and len({p.category for p in few}) >= 8  # spread over the kinds
    assert general_prompts(500) == prompts
    with pytest.raises(ValueError, match="0 means skip"):
        general_prompts(0)
    # Package data: pyproject.toml ships it in the wheel (tests/test_packaging.py checks the wheel).
    import tomllib

    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text(encoding="utf-8"))
    shipped = pyproject["tool"]["setuptools"]["package-data"]["studio.evaluation"]
    assert any(Path(regression.PROMPTS_FILE).match(pattern) for pattern in shipped)


# ---- on the tiny model ------------------------------------------------------------------------------
def test_the_adapter_moved_and_the_base_against_itself_did_not(trained_tiny_run):
    from studio.evaluation import task
    from studio.inference.playground import Playground
    from studio.models import load_tokenizer

    run = trained_tiny_run
    playground = Playground("cpu")
    tokenizer = load_tokenizer(run.config().model)
    sides = task._sides(playground, run, None)
    calls = []
    started = time.perf_counter()
    try:
        moved = regression.measure_regression(
            sides, tokenizer, task.generate, prompts=8, max_new_tokens=16, progress=lambda *a: calls.append(a)
        )
        itself = regression.measure_regression([sides[0], sides[0]], tokenizer, task.generate, prompts=8)
    finally:
        for engine, _ in sides:
            engine.close()
    seconds = time.perf_counter() - started
    assert RESULT_KEYS <= set(moved), RESULT_KEYS - set(moved)
    assert moved["prompts"] == 8 and moved["max_new_tokens"] == 16 and 8 <= moved["tokens"] <= 8 * 16
    assert moved["kl_per_token"] > 0 and moved["kl_ci95"][0] <= moved["kl_per_token"] <= moved["kl_ci95"][1]
    assert len(moved["most_changed"]) == 3 and moved["sentence"].startswith("Outside your task")
    assert calls[0] == (0, 8, None) and calls[-1][:2] == (8, 8) and len(calls) == 3  # two chunks of 4
    # The base against itself: the same answers and the same logits, so exactly 0.
    assert itself["kl_per_token"] == 0.0 and itself["changed_share"] == 0.0
    assert "behaves like the base" in itself["sentence"]
    assert seconds < 60, seconds  # about 2 s alone on a 2-core CPU


def test_stop_stops_between_chunks(trained_tiny_run):
    import threading

    from studio.evaluation import task
    from studio.inference.playground import Playground
    from studio.models import load_tokenizer

    run = trained_tiny_run
    sides = task._sides(Playground("cpu"), run, None)
    stop = threading.Event()

    def progress(done, total, eta_s):
        if done:
            stop.set()  # Stop pressed after the first chunk

    try:
        with pytest.raises(task.EvaluationStopped):
            regression.measure_regression(
                sides, load_tokenizer(run.config().model), task.generate, prompts=8, progress=progress, stop=stop
            )
    finally:
        for engine, _ in sides:
            engine.close()


# ---- through finetune-studio eval -------------------------------------------------------------------
def test_eval_reports_regression_and_the_flag_shrinks_or_skips_it(trained_tiny_run, capsys):
    import json

    from studio.cli import main

    run = trained_tiny_run
    capsys.readouterr()
    assert main(["eval", str(run.path), "--rows", "2", "--regression-prompts", "4", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert RESULT_KEYS <= set(result["regression"]) and result["regression"]["prompts"] == 4
    assert result["regression"]["kl_per_token"] > 0
    stored = json.loads(Path(result["path"]).read_text(encoding="utf-8"))
    assert stored["regression"] == result["regression"]  # kept with the run's evaluation

    assert main(["eval", str(run.path), "--rows", "2", "--regression-prompts", "0", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["regression"] is None

    assert main(["eval", str(run.path), "--rows", "2", "--regression-prompts", "2"]) == 0
    assert "Outside your task the adapter" in capsys.readouterr().out  # the table's sentence

    assert main(["eval", str(run.path), "--regression-prompts", "-1"]) == 2
    err = capsys.readouterr().err
    assert "--regression-prompts" in err and "Traceback" not in err
