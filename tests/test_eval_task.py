"""Task evaluation (studio/evaluation/task.py) and `finetune-studio eval`: which turn a row is
scored on, the --json shape and the stored files, --fail-if-worse on a good and a bad adapter,
and bad input as sentences with exit code 2."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from studio.cli import main
from tests.helpers import tiny_run_config, write_csv

METRIC_KEYS = {
    "name",
    "description",
    "base",
    "adapter",
    "base_ci95",
    "adapter_ci95",
    "diff",
    "diff_ci95",
    "wins",
    "ties",
    "losses",
    "p_value",
}
RESULT_KEYS = {"run", "version", "rows", "eval_set_sha256", "seconds", "metrics", "examples"}
RESULT_KEYS |= {"reason", "verdicts", "cut_share"}


def _eval(capsys, *argv) -> tuple[int, str, str]:
    """`finetune-studio eval` in this process; general regression off unless asked for (its own
    tests are in test_eval_regression.py; 100 prompts per call would double this file's time)."""
    argv = tuple(map(str, argv))
    if "--regression-prompts" not in argv:
        argv += ("--regression-prompts", "0")
    capsys.readouterr()
    code = main(["eval", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def _eval_json(capsys, *argv) -> tuple[int, dict]:
    code, out, err = _eval(capsys, *argv, "--json")
    assert code in (0, 1), err
    return code, json.loads(out)


def _tokenizer(model_dir):
    from studio.models import load_tokenizer

    return load_tokenizer(str(model_dir))


# ---- rows -----------------------------------------------------------------------------------
@pytest.mark.unit
def test_a_chat_row_is_scored_on_its_last_assistant_turn(tiny_model_dir):
    from studio.evaluation.rows import build_rows

    conv = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "what is one plus two"},
        {"role": "assistant", "content": "answer three"},
        {"role": "user", "content": "and times two"},
        {"role": "assistant", "content": " answer six "},
    ]
    tok = _tokenizer(tiny_model_dir)
    (row,), skipped = build_rows([conv], tok, max_length=256)
    assert skipped == 0
    assert row.reference == "answer six"
    assert row.prompt == conv[:4]
    # Every earlier turn is in the prompt, rendered with the template and its generation prompt.
    assert row.prompt_text == tok.apply_chat_template(conv[:4], tokenize=False, add_generation_prompt=True)
    assert "answer three" in row.prompt_text and "answer six" not in row.prompt_text
    assert row.prompt_text.endswith("<|im_start|>assistant\n")


@pytest.mark.unit
def test_a_plain_text_row_is_scored_on_continuing_its_first_half(tiny_model_dir):
    from studio.evaluation.rows import build_rows

    tok = _tokenizer(tiny_model_dir)
    rows, skipped = build_rows(["the sky is blue and the grass is green", "hello"], tok, max_length=256)
    assert skipped == 1  # one word: nothing to continue
    (row,) = rows
    assert (row.prompt, row.reference) == ("the sky is blue", "and the grass is green")
    assert row.prompt_text == "the sky is blue"  # no chat template: the run trained on raw text


def test_held_out_rows_are_the_ones_training_held_out(trained_tiny_run):
    from studio.evaluation.heldout import held_out_rows, prompt_and_reference
    from studio.evaluation.rows import build_rows, held_out_conversations

    tok = _tokenizer(trained_tiny_run.config().model)
    rows, _ = build_rows(held_out_conversations(trained_tiny_run, tok), tok, 64)
    trained = [prompt_and_reference(e) for e in held_out_rows(trained_tiny_run, tok)]
    assert [r.prompt_ids for r in rows] == [prompt for prompt, _ in trained]
    assert [r.reference for r in rows] == [tok.decode(ref, skip_special_tokens=True).strip() for _, ref in trained]


# ---- the command and what it stores ---------------------------------------------------------------
def test_eval_json_shape_examples_and_stored_files(trained_tiny_run, capsys, tmp_path):
    run = trained_tiny_run
    code, result = _eval_json(capsys, run.path)
    assert code == 0
    assert RESULT_KEYS <= set(result), RESULT_KEYS - set(result)
    assert result["run"] == run.id and result["version"] == run.version
    assert result["rows"] == 4 and len(result["eval_set_sha256"]) == 64
    assert result["metrics"] and len(result["verdicts"]) == len(result["metrics"])
    for m in result["metrics"]:
        assert METRIC_KEYS <= set(m), METRIC_KEYS - set(m)
        for key in ("base_ci95", "adapter_ci95", "diff_ci95"):
            lo, hi = m[key]
            assert lo <= hi
        assert m["wins"] + m["ties"] + m["losses"] == result["rows"]
    assert set(result["cut_share"]) == {"base", "adapter"}

    lines = [json.loads(x) for x in Path(result["examples"]).read_text(encoding="utf-8").splitlines()]
    assert len(lines) == result["rows"]
    names = [m["name"] for m in result["metrics"]]
    for line in lines:
        assert {"prompt", "reference", "base", "adapter", "scores"} <= set(line)
        assert line["reference"].startswith("answer ")
        assert set(line["scores"]) == set(names)
    stored = json.loads(Path(result["path"]).read_text(encoding="utf-8"))
    assert stored["metrics"] == result["metrics"] and stored["settings"]["metrics"] == names

    # A second evaluation on the same rows is stored next to the first, never over it.
    _, again = _eval_json(capsys, run.path)
    assert again["eval_set_sha256"] == result["eval_set_sha256"]
    assert again["path"] != result["path"] and Path(result["path"]).is_file()
    assert len(list((run.path / "evaluations").glob("*.json"))) >= 2

    # Without --json: a table and the verdict sentences.
    code, out, _ = _eval(capsys, run.id, "--runs-dir", run.path.parent, "--rows", 2)
    assert code == 0 and "win/tie/loss" in out and "Every row" in out and "2 rows" in out


def test_a_multi_turn_eval_file_scores_the_last_reply(trained_tiny_run, capsys, tmp_path):
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"what is {a} plus 1"},
                {"role": "assistant", "content": f"answer {a + 1}"},
                {"role": "user", "content": "and plus 2"},
                {"role": "assistant", "content": f"answer {a + 2}"},
            ]
        }
        for a in range(1, 4)
    ]
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    _, result = _eval_json(capsys, trained_tiny_run.path, "--eval-path", path, "--max-new-tokens", 4)
    assert result["rows"] == 3 and result["source"] == str(path) and result["max_new_tokens"] == 4
    lines = [json.loads(x) for x in Path(result["examples"]).read_text(encoding="utf-8").splitlines()]
    assert sorted(x["reference"] for x in lines) == ["answer 3", "answer 4", "answer 5"]
    for x in lines:  # the earlier reply is part of the prompt, not of the reference
        n = int(x["reference"].split()[1])
        assert f"answer {n - 1}" in x["prompt"] and "and plus 2" in x["prompt"] and len(x["messages"]) == 3


def test_the_page_and_the_cli_give_the_same_numbers_and_stop_stops(trained_tiny_run, capsys, tmp_path):
    import threading

    from studio.evaluation.task import EvaluationStopped
    from studio.service import Studio

    rows = [[f"what is {a} plus {b}", f"answer {a + b}"] for a in range(1, 4) for b in range(1, 4)]
    path = write_csv(tmp_path / "eval.csv", ["instruction", "output"], rows)
    studio = Studio(trained_tiny_run.path.parent)
    calls, stop = [], threading.Event()

    def progress(done, total, eta_s):
        calls.append((done, total, eta_s))
        if done:
            stop.set()  # Stop pressed after the first batch

    before = set((trained_tiny_run.path / "evaluations").glob("*"))
    with pytest.raises(EvaluationStopped):
        studio.evaluate_task(trained_tiny_run.id, eval_path=str(path), progress=progress, stop=stop)
    assert calls[0] == (0, 9, None) and calls[1][:2] == (4, 9) and calls[1][2] >= 0 and len(calls) == 2
    assert set((trained_tiny_run.path / "evaluations").glob("*")) == before  # nothing stored

    page = studio.evaluate_task(trained_tiny_run.id, eval_path=str(path), regression_prompts=6)
    _, cli = _eval_json(capsys, trained_tiny_run.path, "--eval-path", path, "--regression-prompts", "6")
    assert cli["metrics"] == page["metrics"] and cli["eval_set_sha256"] == page["eval_set_sha256"]
    for key in ("kl_per_token", "changed_share", "prompts", "sentence"):
        assert cli["regression"][key] == pytest.approx(page["regression"][key]), key


# ---- --fail-if-worse ------------------------------------------------------------------------------
KEYS = {"sky": "answer blue", "grass": "answer green"}


def _prompts(n: int) -> list[tuple[str, str]]:
    rng = random.Random(3)
    words = "the of is what colour hello world model data one two".split()
    out = []
    for i in range(n):
        key = "sky" if i % 2 else "grass"
        out.append((f"{rng.choice(words)} {rng.choice(words)} {key}", KEYS[key]))
    return out


@pytest.fixture(scope="module")
def good_base_runs(tiny_model_dir, tmp_path_factory):
    """A base that answers well (the tiny model fully fine-tuned on the task), a LoRA run on it
    trained on the same good answers, and one trained on garbage for the same prompts (fp32)."""
    from studio.runs.registry import RunRegistry
    from studio.training import run_training

    root = tmp_path_factory.mktemp("eval-task")
    registry = RunRegistry(root / "runs")
    prompts = _prompts(40)
    rng = random.Random(5)
    garbage = [[p, " ".join(rng.choice(["hello", "world", "nine", "data"]) for _ in range(3))] for p, _ in prompts]
    good = write_csv(root / "good.csv", ["instruction", "output"], [list(p) for p in prompts])
    bad = write_csv(root / "bad.csv", ["instruction", "output"], garbage)
    fp32 = {"precision": "fp32", "memory_check": False}

    def train(cfg):
        run = registry.create(cfg)
        assert run_training(cfg, run).state == "finished", run.log_path.read_text(encoding="utf-8")
        return run

    base = train(tiny_run_config(tiny_model_dir, good, "full", max_steps=40, learning_rate=3e-3, **fp32))
    good_run = train(tiny_run_config(base.weights_dir(), good, max_steps=10, **fp32))
    bad_run = train(tiny_run_config(base.weights_dir(), bad, max_steps=20, **fp32))
    eval_file = write_csv(root / "eval.csv", ["instruction", "output"], [list(p) for p in prompts[:24]])
    return registry.root, base, good_run, bad_run, eval_file


def test_fail_if_worse_exits_1_on_a_bad_adapter_and_0_on_a_good_one(good_base_runs, capsys):
    root, base, good_run, bad_run, eval_file = good_base_runs
    flags = ("--runs-dir", root, "--eval-path", eval_file, "--fail-if-worse")

    # The full fine-tune against the random tiny model: a whole model, scored through its own engine.
    code, full = _eval_json(capsys, base.id, *flags)
    assert code == 0 and full["metrics"][0]["adapter"] >= 0.8, full["metrics"][0]
    assert full["metrics"][0]["diff_ci95"][0] > 0

    code, good = _eval_json(capsys, good_run.id, *flags)
    assert good["metrics"][0]["base"] >= 0.8, good["metrics"][0]  # the base it was trained on answers well
    assert code == 0, good["verdicts"]

    code, out, err = _eval(capsys, bad_run.id, *flags)
    assert code == 1, out + err
    assert "worse than the base" in err and "Every row" in out


def test_against_another_adapter_and_every_score_side_by_side(good_base_runs, capsys):
    """--against puts another adapter where the base was, on the same rows; the stored
    evaluations then line up by eval set in the comparison, and the drill-down filters them."""
    from studio.evaluation import stored
    from studio.runs.registry import RunRegistry

    root, base, good_run, bad_run, eval_file = good_base_runs
    flags = ("--runs-dir", root, "--eval-path", eval_file)
    _, good = _eval_json(capsys, good_run.id, *flags)
    code, out, err = _eval(capsys, bad_run.id, *flags, "--against", good_run.id, "--fail-if-worse")
    assert code == 1 and f"worse than {good_run.id}" in err, out + err
    code, against = _eval_json(capsys, bad_run.id, *flags, "--against", good_run.id)
    assert against["against"] == good_run.id and against["eval_set_sha256"] == good["eval_set_sha256"]
    # The same rows answered greedily by the same adapter: the same score, now on the "base" side.
    assert against["metrics"][0]["base"] == pytest.approx(good["metrics"][0]["adapter"])
    assert f"worse than {good_run.id}" in against["verdicts"][0]

    code, out, err = _eval(capsys, good_run.id, *flags, "--against", base.id)  # a full fine-tune
    assert code == 2 and "trained the same way on the same base" in err, out + err
    code, out, err = _eval(capsys, good_run.id, *flags, "--against", good_run.id)
    assert code == 2 and "compared with itself" in err, out + err

    latest = stored.evaluations(bad_run)[0]
    assert latest["against"] == good_run.id and Path(latest["examples"]).is_file()
    rows = stored.examples(latest)
    primary = latest["metrics"][0]["name"]
    worse = stored.drill_down(latest, rows, stored.ADAPTER_WORSE)
    everything = stored.drill_down(latest, rows)
    assert len(everything) == latest["rows"] and 0 < len(worse) <= len(everything)
    assert (worse[f"{primary}: adapter"] < worse[f"{primary}: base"]).all()
    assert len(worse) == latest["metrics"][0]["losses"]  # "worse" rows are the paired losses

    side_by_side = stored.comparison(RunRegistry(root).list(), good["eval_set_sha256"])
    scored = side_by_side[side_by_side["metric"] == primary]
    assert {good_run.id, bad_run.id, base.id} <= set(scored["run"])
    mine = scored[(scored["run"] == good_run.id) & (scored["compared with"] == "base")]
    assert mine["score"].iloc[0] == pytest.approx(good["metrics"][0]["adapter"], abs=1e-4)


def test_every_checkpoint_in_one_pass_and_the_best_at_the_task(good_base_runs, capsys):
    """--checkpoints: each checkpoint and the final weights against the base on the same rows,
    stored like any evaluation; the final's scores equal its own evaluation's; the best named."""
    from studio.evaluation import stored
    from studio.runs.registry import RunRegistry
    from studio.training import run_training

    root, base, good_run, bad_run, eval_file = good_base_runs
    cfg = good_run.config().with_overrides({"training.save_steps": 4, "training.max_steps": 12})
    run = RunRegistry(root).create(cfg)
    assert run_training(cfg, run).state == "finished"
    flags = ("--runs-dir", root, "--eval-path", eval_file)
    code, out, err = _eval(capsys, run.id, *flags, "--checkpoints", "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert [c["checkpoint"] for c in summary["checkpoints"]] == ["step-4", "step-8", "final"]
    assert [c["step"] for c in summary["checkpoints"]] == [4, 8, 12]
    best = max(summary["checkpoints"], key=lambda c: (c["adapter"], c["step"]))
    assert summary["best"] == best["checkpoint"] and summary["sentence"].startswith(
        "The final weights" if best["checkpoint"] == "final" else f"{best['checkpoint']} (step"
    )
    kept = {r.get("checkpoint") for r in stored.evaluations(run)}
    assert kept == {"step-4", "step-8", None}  # each stored as its own evaluation
    _, alone = _eval_json(capsys, run.id, *flags, "--regression-prompts", "0")
    final = summary["checkpoints"][-1]
    assert final["adapter"] == pytest.approx(alone["metrics"][0]["adapter"])  # batched with others = alone
    assert final["base"] == pytest.approx(alone["metrics"][0]["base"])

    code, out, err = _eval(capsys, run.id, *flags, "--checkpoints")  # the table
    assert code == 0 and "<- best" in out and summary["sentence"] in out
    code, _, err = _eval(capsys, base.id, *flags, "--checkpoints")
    assert code == 2 and "whole model" in err
    code, _, err = _eval(capsys, run.id, *flags, "--checkpoints", "--against", good_run.id)
    assert code == 2 and "--against" in err


# ---- bad input --------------------------------------------------------------------------------------
@pytest.fixture
def untrained_run(tiny_model_dir, tmp_path):
    """A run folder with a config and data but no weights: enough to check input before any model loads."""
    from studio.runs.registry import RunRegistry

    data = write_csv(tmp_path / "train.csv", ["instruction", "output"], [[p, a] for p, a in _prompts(20)])
    return RunRegistry(tmp_path / "runs").create(tiny_run_config(tiny_model_dir, data))


@pytest.mark.unit
def test_bad_input_is_a_sentence_with_exit_code_2(untrained_run, capsys, tmp_path):
    run = untrained_run
    code, out, err = _eval(capsys, "no-such-run", "--runs-dir", run.path.parent)
    assert code == 2 and "No run called 'no-such-run'" in err and "Traceback" not in err

    code, _, err = _eval(capsys, run.path, "--metric", "no_such_metric")
    assert code == 2 and "no_such_metric" in err and "Traceback" not in err

    code, _, err = _eval(capsys, run.path, "--metric", "regex", "--pattern", "answer ([")
    assert code == 2 and "Traceback" not in err and err.strip().endswith((".", ")"))

    other = write_csv(tmp_path / "other.csv", ["colour", "size"], [["red", "big"], ["blue", "small"]])
    code, _, err = _eval(capsys, run.path, "--eval-path", other)
    assert code == 2 and str(other) in err and "colour" in err

    mapped = ("--eval-path", other, "--mapping", "colour=prompt", "size=response")
    code, _, err = _eval(capsys, run.path, *mapped)  # mapped by hand, the file is fine: the run is not
    assert code == 2 and "train it first" in err

    code, _, err = _eval(capsys, run.path, "--eval-path", tmp_path / "missing.csv")
    assert code == 2 and "missing.csv" in err

    code, _, err = _eval(capsys, run.path, "--rows", 0)
    assert code == 2 and "--rows" in err

    code, _, err = _eval(capsys, run.path)  # valid input, but nothing trained yet
    assert code == 2 and "train it first" in err


@pytest.mark.process
def test_eval_in_a_fresh_process_exits_with_its_own_code(trained_tiny_run):
    """As a CI job runs it: `finetune-studio eval --json` in a new process prints its result and
    exits with the command's own code. (On the default model, an engine thread still alive at exit
    aborted the process with 134; tests/test_serve.py checks that Engine.close waits for it.)"""
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "studio.cli", "eval", str(trained_tiny_run.path), "--rows", "2", "--json"]
        + ["--regression-prompts", "4"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    assert result["rows"] == 2 and result["regression"]["prompts"] == 4
