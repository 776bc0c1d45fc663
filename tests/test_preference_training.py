"""Issue 25: preference tuning through the studio's own trainer, on the tiny model. DPO and ORPO
learn to prefer the chosen answers (held-out reward accuracy rises), stream their statistics with
the loss, save an adapter version that plain PEFT loads; the wrong objective for a file is a
sentence before any model loads."""

from __future__ import annotations

import pytest

from studio.config import RunConfig
from studio.data import DataError
from studio.runs.registry import RunRegistry
from studio.training import run_training
from tests.helpers import write_csv

pytestmark = pytest.mark.numeric


def _pairs(path):
    # The chosen answer ends in one word, the rejected in another, after the same words: a
    # preference a tiny random model can learn in a few steps and carry to held-out prompts (the
    # words are the way round the untrained tiny model does not already prefer).
    rows = [
        [f"what is {a} plus {b}", f"the sum of {a} and {b} is odd", f"the sum of {a} and {b} is right"]
        for a in range(1, 13)
        for b in range(1, 6)
    ]
    return write_csv(path, ["prompt", "chosen", "rejected"], rows)


def _config(model, data, objective, **training):
    return RunConfig.from_dict(
        {
            "model": str(model),
            "method": "lora",
            "data": {"path": str(data), "max_length": 64, "eval_rows": 12},
            "lora": {"dropout": 0.0},
            "training": {
                "objective": objective,
                "max_steps": 24,
                "batch_size": 4,
                "learning_rate": 5e-3,
                "precision": "fp32",
                "memory_check": False,
                "eval_steps": 12,
                "seed": 0,
                **training,
            },
        }
    )


@pytest.mark.parametrize("objective", ["dpo", "orpo"])
def test_preference_objectives_learn_the_chosen_answers(tiny_model_dir, tmp_path, objective):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    data = _pairs(tmp_path / "pairs.csv")
    cfg = _config(tiny_model_dir, data, objective, memory_check=True)  # the pre-run check drives a pair batch too
    run = RunRegistry(tmp_path / "runs").create(cfg)
    status = run_training(cfg, run)
    assert status.state == "finished", status.message
    check = status.memory_check  # it ran (what it measures on top of earlier tests' memory can round to 0)
    assert check["peak_bytes"] > 0 and check["estimate_bytes"] > 0, check
    train, evals = run.train_metrics(), run.eval_metrics()
    assert len(train) == 24 and all("reward_accuracy" in m.extra and "reward_margin" in m.extra for m in train)
    held_out = [m.extra["reward_accuracy"] for m in evals if m.step > 0]
    assert len(held_out) == 2 and held_out[-1] >= 0.75, held_out  # 12 held-out pairs, after 24 steps
    margins = [m.extra["reward_margin"] for m in train]
    assert sum(margins[-6:]) / 6 > sum(margins[:6]) / 6  # the margin grows as it learns
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), run.weights_dir())
    assert run.versions()[0].record["config"]["training"]["objective"] == objective

    # Evaluate: the held-out preference accuracy, base vs adapter, next to the generation metrics.
    from studio.evaluation.task import evaluate_task
    from studio.inference.playground import Playground

    result = evaluate_task(Playground(), run, rows=4, regression_prompts=0, max_new_tokens=4)
    pref = result["preference"]
    assert pref["pairs"] == 12 and pref["adapter"] >= 0.75 and pref["adapter"] > pref["base"], pref
    assert (
        pref["adapter_ci95"][0] <= pref["adapter"] <= pref["adapter_ci95"][1]
        and "preference accuracy" in pref["verdict"]
    )
    assert run.versions()[0].scores()[0]["preference"]["adapter"] == pref["adapter"]


def test_the_wrong_objective_for_a_file_is_a_sentence(tiny_model_dir, tmp_path, instruction_csv):
    from studio.training.trainer import Trainer

    pairs = _pairs(tmp_path / "pairs.csv")
    registry = RunRegistry(tmp_path / "runs")
    for data, objective, said in (
        (pairs, "sft", "holds preference pairs"),
        (instruction_csv, "dpo", "learns from preference data"),
    ):
        cfg = _config(tiny_model_dir, data, objective)
        with pytest.raises(DataError, match=said):
            Trainer(cfg, registry.create(cfg)).setup()


def test_dpo_starts_from_an_sft_version_which_is_also_its_reference(tiny_model_dir, tmp_path, instruction_csv):
    """The usual recipe: sft first, then dpo from that version. The DPO run's adapter starts as the
    sft version's and that version, frozen, is the reference: so the first step's rewards are
    exactly 0; only the trained adapter is saved."""
    from studio.models import ModelError
    from studio.training.trainer import Trainer

    registry = RunRegistry(tmp_path / "runs")
    sft_cfg = _config(tiny_model_dir, instruction_csv, "sft", max_steps=6, eval_steps=0)
    sft = registry.create(sft_cfg)
    assert run_training(sft_cfg, sft).state == "finished"

    cfg = _config(tiny_model_dir, _pairs(tmp_path / "pairs.csv"), "dpo", start_from=f"{sft.id}@v1")
    run = registry.create(cfg)
    status = run_training(cfg, run)
    assert status.state == "finished", status.message
    first = run.train_metrics()[0].extra
    assert first["chosen_reward"] == first["rejected_reward"] == first["reward_margin"] == 0.0
    assert run.eval_metrics()[-1].extra["reward_accuracy"] >= 0.75
    saved = run.weights_dir()
    assert not (saved / "reference").exists() and (saved / "adapter_model.safetensors").exists()

    for bad, said in ((f"{sft.id}@v9", "no version v9"), ("nope", "No run called 'nope'")):
        wrong = _config(tiny_model_dir, _pairs(tmp_path / "pairs.csv"), "dpo", start_from=bad)
        with pytest.raises(ModelError, match=said):
            Trainer(wrong, registry.create(wrong)).setup()


def test_kto_learns_from_answers_marked_good_or_bad(tiny_model_dir, tmp_path):
    """Unpaired feedback (prompt, completion, label): each answer judged on its own against the
    KL reference point; the held-out answers' rewards take the side their labels say."""
    rows = []
    for a in range(1, 13):
        for b in range(1, 6):
            good = (a + b) % 2 == 0  # half the prompts have a good answer, half a bad one
            word = "odd" if good else "right"
            rows.append([f"what is {a} plus {b}", f"the sum of {a} and {b} is {word}", "👍" if good else "👎"])
    data = write_csv(tmp_path / "feedback.csv", ["prompt", "completion", "label"], rows)
    cfg = _config(tiny_model_dir, data, "kto")
    run = RunRegistry(tmp_path / "runs").create(cfg)
    status = run_training(cfg, run)
    assert status.state == "finished", status.message
    held_out = run.eval_metrics()[-1].extra
    assert held_out["reward_accuracy"] >= 0.75 and held_out["chosen_reward"] > held_out["rejected_reward"], held_out

    sft = _config(tiny_model_dir, data, "sft")  # never taught as supervised data: the bad answers would be too
    with pytest.raises(DataError, match="train it with objective kto"):
        from studio.training.trainer import Trainer

        Trainer(sft, RunRegistry(tmp_path / "runs").create(sft)).setup()


@pytest.mark.unit
def test_kto_reference_rows_pair_each_prompt_with_the_next_answer():
    import torch

    from studio.training.objectives import mismatched

    ids = torch.tensor([[1, 2, 10, 11, 0], [3, 20, 21, 22, 0], [4, 5, 6, 30, 0]])
    mask = (ids != 0).long()
    labels = torch.tensor([[-100, -100, 10, 11, -100], [-100, 20, 21, 22, -100], [-100, -100, -100, 30, -100]])
    kl_ids, kl_mask, kl_labels = mismatched(ids, mask, labels)
    assert kl_ids.tolist() == [[1, 2, 20, 21, 22], [3, 30, 0, 0, 0], [4, 5, 6, 10, 11]]
    assert kl_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert kl_labels.tolist() == [[-100, -100, 20, 21, 22], [-100, 30, -100, -100, -100], [-100, -100, -100, 10, 11]]


def test_full_fine_tuning_dpo_keeps_a_frozen_reference_and_the_plan_counts_it(tiny_model_dir, tmp_path):
    from studio.planning import hardware
    from studio.planning.memory import estimate, shape_for_model
    from studio.planning.planner import settings_for

    cfg = _config(tiny_model_dir, _pairs(tmp_path / "pairs.csv"), "dpo", learning_rate=1e-3, max_steps=12)
    cfg = cfg.with_overrides({"method": "full"})
    run = RunRegistry(tmp_path / "runs").create(cfg)
    status = run_training(cfg, run)
    assert status.state == "finished", status.message
    first, last = run.train_metrics()[0].extra, run.train_metrics()[-1].extra
    assert first["reward_margin"] == 0.0 and last["reward_margin"] > 0  # the reference stayed where it started
    assert (run.weights_dir() / "model.safetensors").exists()

    shape, hw = shape_for_model(str(tiny_model_dir)), hardware.detect()
    dpo = estimate(shape, "full", settings_for(cfg, hw, "cpu"), "cpu").breakdown
    sft = estimate(shape, "full", settings_for(cfg.with_overrides({"training.objective": "sft"}), hw, "cpu"), "cpu")
    assert dpo["reference_weights"] == 4 * shape.total_params and "reference_weights" not in sft.breakdown
