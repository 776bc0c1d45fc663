"""A finished run continues to a new total (`resume RUN --max-steps N`): from its final state
(weights, Adam moments, data position) on a schedule of its own, never at a learning rate
already decayed to zero."""

import math

import pytest

from studio.cli import main
from studio.runs import files
from studio.runs.records import Event
from studio.runs.registry import RunRegistry
from studio.service import Studio
from studio.training.schedule import Continuation
from studio.training.trainer import Trainer
from studio.ui import train_tab
from studio.ui.views import resumable_choices

LR = 1e-2


def _train(model_dir, data, runs, steps):
    return main(
        [
            "train",
            *("--data", str(data), "--model", str(model_dir), "--method", "lora"),
            *("--max-steps", str(steps), "--batch-size", "4", "--max-length", "64"),
            *("--learning-rate", str(LR), "--eval-fraction", "0", "--precision", "fp32"),
            *("--memory-check", "false", "--runs-dir", str(runs)),
        ]
    )


def test_a_finished_run_continues_to_a_new_total(tiny_model_dir, instruction_csv, runs_dir, capsys):
    assert _train(tiny_model_dir, instruction_csv, runs_dir, 8) == 0
    run = RunRegistry(runs_dir).list()[0]
    assert run.status().version == 1 and run.checkpoints() == []  # 8 steps: no checkpoint on the way
    assert (run.final_state_dir / "trainer_state.pt").exists()  # the final save keeps the trainer state
    assert not list(run.final_state_dir.glob("*.safetensors"))  # ... without the weights a second time
    capsys.readouterr()

    # A plain resume, or a total not above the final step, is refused with what to type.
    assert main(["resume", run.id, "--runs-dir", str(runs_dir)]) == 2
    assert "continue it with --max-steps N (N > 8, the new total)" in capsys.readouterr().err
    assert main(["resume", run.id, "--runs-dir", str(runs_dir), "--max-steps", "4"]) == 2
    assert "the new total must be more than 8 (got --max-steps 4)" in capsys.readouterr().err

    v1_sha = files.weights_sha256(run.weights_dir())
    assert main(["resume", run.id, "--runs-dir", str(runs_dir), "--max-steps", "16"]) == 0
    out = capsys.readouterr().out
    said = "Continuing from step 8 to 16: warm-up 1 step to learning rate 0.01, then cosine decay over 7 steps."
    assert said in out
    status = run.status()
    assert status.state == "finished" and status.step == 16 and status.total_steps == 16
    assert status.version == 2  # the continuation saved a new version; v1 is kept as it was
    v1, v2 = run.versions()
    assert files.weights_sha256(v1.path) == v1_sha == v1.record["weights_sha256"] != v2.record["weights_sha256"]
    assert (v2.parent, v2.record["kind"], v2.record["step"], v1.record["step"]) == (1, "continued", 16, 8)
    assert "Saved as v2." in status.message
    assert run.config().training.max_steps == 16
    assert "optimizer state loaded from final_state/" in run.log_path.read_text()
    assert any(isinstance(m, Event) and m.kind == "continue" and m.step == 8 for m in run.metrics())
    assert [c.name for c in run.checkpoints()] == ["step-8", "step-10"]  # at the start, then every 10 steps

    train = run.train_metrics()
    assert [m.step for m in train] == list(range(1, 17))
    lrs = {m.step: m.lr for m in train}
    assert lrs[8] < 0.05 * LR  # the run's own cosine had (all but) reached zero
    assert 0 < lrs[9] < LR and lrs[9] == pytest.approx(LR / 2)  # warm-up, not the decayed rate
    assert lrs[10] == pytest.approx(LR)  # the peak is the run's learning rate
    assert all(lrs[s + 1] < lrs[s] for s in range(10, 16)) and lrs[16] < 0.1 * LR
    assert all(math.isfinite(m.loss) for m in train)
    assert (run.final_state_dir / "trainer_state.pt").exists()  # it can be continued again

    # A continuation stopped or killed part-way resumes on its own schedule: each checkpoint it
    # saved (at its start, and at step 10) restores the total of 16 and the rate the next step used.
    for saved in run.checkpoints():
        resumed = Trainer(run.config(), run)
        resumed.setup()
        resumed.restore(saved)
        assert (resumed.total_steps, resumed.continued_from) == (16, 8)
        assert resumed.scheduler.get_last_lr()[0] == pytest.approx(lrs[resumed.step + 1])

    # Continue training in the UI: the finished run is listed, a total at or below it is refused
    # before anything starts, a larger one trains on (the same path as the CLI's).
    studio = Studio(runs_dir)
    assert (f"{run.id} (finished at step 16: continue to N steps)", run.id) in resumable_choices(studio)
    with pytest.warns(UserWarning, match="type a new total above it"):  # gr.Warning outside a page
        assert "type a new total above it" in train_tab.resume(studio, run.id, 16)
    assert train_tab.resume(studio, run.id, 20) == f"Continuing {run.id} to 20 steps..."
    studio.jobs.current.thread.join(60)
    assert run.status().step == 20 and run.status().version == 3


def test_a_run_from_before_versions_loads_as_v1_and_continues_to_v2(tiny_model_dir, instruction_csv, runs_dir):
    """A runs folder from before versions (its one save in adapter/, no versions/) still lists,
    chats, serves and exports as v1, and continuing it makes v2 beside it."""
    import shutil

    from studio.export.zips import export_zip

    assert _train(tiny_model_dir, instruction_csv, runs_dir, 8) == 0
    run = RunRegistry(runs_dir).list()[0]
    shutil.move(run.weights_dir(), run.path / "adapter")  # the layout every earlier studio wrote
    for name in ("version.json", "fingerprint.json"):
        (run.path / "adapter" / name).unlink()
    shutil.rmtree(run.path / "versions")
    [v1] = run.versions()
    assert v1.legacy and run.weights_dir() == run.path / "adapter" and run.is_trained()
    assert v1.record["step"] == 8 and v1.record["data"]["sha256"] == run.status().data_sha256
    studio = Studio(runs_dir)
    studio.activate_run(f"{run.id}@v1")  # the Chat tab loads it by its version ref
    assert export_zip(run).name == f"{run.id}-v1-adapter.zip"

    assert main(["resume", run.id, "--runs-dir", str(runs_dir), "--max-steps", "12"]) == 0
    old, new = run.versions()
    assert old.path == run.path / "adapter" and new.path == run.path / "versions" / "v2" and new.parent == 1
    assert run.weights_dir() == new.path and run.status().version == 2


@pytest.mark.unit
def test_the_continuation_schedule_warms_up_then_decays_without_reaching_zero():
    plan = Continuation.plan(40, 80, warmup_ratio=0.1, kind="cosine")
    assert plan.warmup == 4
    factors = [plan.factor(i) for i in range(40)]
    assert 0 < factors[0] < factors[3] < factors[4] == 1.0
    assert all(b < a for a, b in zip(factors[4:], factors[5:])) and 0 < factors[-1] < 0.01
    assert plan.describe(2e-4) == (
        "Continuing from step 40 to 80: warm-up 4 steps to learning rate 0.0002, then cosine decay over 36 steps."
    )
    assert Continuation.plan(10, 11, 0.05, "linear").warmup == 1  # even one added step starts below the peak
    assert Continuation.plan(0, 100, 0.5, "constant").warmup == 10  # at most 10% of the added steps
