"""Crash safety: a run killed with SIGKILL resumes from its last checkpoint and ends where an
uninterrupted run ends, with the same losses; nothing half-written is ever listed as trained."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from studio.cli import main
from studio.config import RunConfig
from studio.runs.records import Event, TrainRecord
from studio.runs.registry import RunRegistry, checkpoint_step
from studio.training import JobManager
from tests.helpers import wait_until

pytestmark = pytest.mark.numeric  # CI runs these again under the other precision (see conftest.py)

ROOT = Path(__file__).resolve().parents[1]
STEPS = 40  # the killed run is stopped at its first checkpoint (step 5); 35 steps leave it time


def _args(model_dir, data, runs):
    return [
        "train",
        "--data",
        str(data),
        "--model",
        str(model_dir),
        "--method",
        "lora",
        "--max-steps",
        str(STEPS),
        "--save-steps",
        "5",
        "--batch-size",
        "4",
        "--max-length",
        "64",
        "--learning-rate",
        "1e-2",
        "--lora-dropout",
        "0.1",
        "--eval-fraction",
        "0",
        "--memory-check",
        "false",
        "--runs-dir",
        str(runs),
    ]


def _losses(run):
    return {m.step: m.loss for m in run.train_metrics()}


def _kill_at_first_checkpoint(args: list[str], runs: Path) -> None:
    """`finetune-studio ARGS` in a process of its own, killed with SIGKILL once its first
    checkpoint is complete."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "studio.cli", *args], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 120
    while time.time() < deadline and not list(runs.glob("*/checkpoints/step-*/trainer_state.pt")):
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


@pytest.mark.process
def test_a_killed_dpo_run_resumes_to_the_same_losses_and_rewards(tiny_model_dir, tmp_path):
    """Issue 25: a DPO run killed with SIGKILL resumes from its checkpoint to the losses and
    reward statistics of a run never killed."""
    from tests.test_preference_training import _pairs

    data = _pairs(tmp_path / "pairs.csv")
    reference_runs, killed_runs = tmp_path / "reference", tmp_path / "killed"
    dpo = ["--objective", "dpo", "--beta", "0.2"]
    assert main([*_args(tiny_model_dir, data, reference_runs), *dpo]) == 0
    _kill_at_first_checkpoint([*_args(tiny_model_dir, data, killed_runs), *dpo], killed_runs)
    run = RunRegistry(killed_runs).list()[0]
    killed_at = max(_losses(run))
    assert killed_at < STEPS and main(["resume", run.id, "--runs-dir", str(killed_runs)]) == 0
    reference = RunRegistry(reference_runs).list()[0]
    ours, theirs = run.train_metrics(), reference.train_metrics()
    assert [m.step for m in ours] == list(range(1, STEPS + 1))
    for a, b in zip(ours, theirs):
        assert a.loss == pytest.approx(b.loss, rel=1e-4), a.step
        assert a.extra["reward_margin"] == pytest.approx(b.extra["reward_margin"], rel=1e-3, abs=1e-5), a.step
    assert run.versions()[-1].record["config"]["training"]["objective"] == "dpo"


@pytest.mark.process
def test_sigkill_then_resume_ends_at_the_final_step_with_the_same_losses(
    tiny_model_dir, instruction_csv, tmp_path, monkeypatch, capsys
):
    reference_runs, killed_runs = tmp_path / "reference", tmp_path / "killed"
    monkeypatch.chdir(tmp_path)  # `resume FOLDER` without --runs-dir: the default ./runs is elsewhere
    assert main(_args(tiny_model_dir, instruction_csv, reference_runs)) == 0
    reference = RunRegistry(reference_runs).list()[0]

    _kill_at_first_checkpoint(_args(tiny_model_dir, instruction_csv, killed_runs), killed_runs)

    registry = RunRegistry(killed_runs)
    run = registry.list()[0]
    assert run.status().state == "running"  # what a crash leaves behind
    assert not run.is_trained() and registry.trained() == []  # never listed or exported as finished
    assert main(["export", run.id, "--runs-dir", str(killed_runs)]) == 1
    killed_at = max(_losses(run))
    assert killed_at < STEPS

    # Resumed by the folder `train` printed, with no --runs-dir: the run is judged by its own
    # folder (its process is gone, so it is interrupted), not by whatever ./runs holds.
    assert main(["resume", str(run.path)]) == 0
    status = run.status()
    assert status.state == "finished" and status.step == STEPS and run.is_trained()
    steps = [m.step for m in run.train_metrics()]
    assert steps == list(range(1, STEPS + 1))  # every step once: redone steps are not drawn twice
    ours, theirs = _losses(run), _losses(reference)
    for step in (1, killed_at, STEPS):
        assert ours[step] == pytest.approx(theirs[step], rel=1e-4), step
    assert len(run.checkpoints()) <= 2  # keep_checkpoints
    assert main(["resume", run.id, "--runs-dir", str(killed_runs)]) == 2  # finished runs cannot be resumed
    assert f"already reached its final step ({STEPS} of {STEPS})" in capsys.readouterr().err


def test_stop_saves_a_checkpoint_and_the_server_resumes_to_the_end(tiny_model_dir, instruction_csv, runs_dir):
    cfg = RunConfig.from_dict(
        {
            "model": str(tiny_model_dir),
            "method": "full",
            "data": {"path": str(instruction_csv), "max_length": 64, "eval_fraction": 0.1},
            "training": {
                "max_steps": 40,
                "learning_rate": 1e-3,
                "batch_size": 4,
                "save_steps": 1000,
                "memory_check": False,
            },
        }
    ).check()
    jobs = JobManager(RunRegistry(runs_dir))
    job = jobs.start(cfg)
    wait_until(lambda: any(isinstance(m, TrainRecord) and m.step >= 3 for m in job.snapshot()), 120, "step 3")
    assert jobs.save_now()
    saved = lambda: any(isinstance(m, Event) and m.kind == "checkpoint" for m in job.snapshot())  # noqa: E731
    wait_until(saved, 60, "the requested checkpoint")
    jobs.stop()
    job.thread.join(120)
    assert not job.thread.is_alive(), "the stopped run did not end within 120 s"
    status = job.run.status()
    assert status.state == "finished" and status.stopped and "Resume" in status.message
    assert status.version == 1  # a stopped run saved an adapter: version 1
    point = job.run.resume_point()
    assert point is not None and checkpoint_step(point) == status.step < 40

    resumed = jobs.resume(job.run)
    assert resumed.run.path == job.run.path
    resumed.thread.join(120)
    assert not resumed.thread.is_alive(), "the resumed run did not end within 120 s"
    status = job.run.status()
    assert status.state == "finished" and status.step == 40 and not status.stopped
    assert status.version == 2  # the resumed run's adapter replaces it as version 2
    assert job.run.resume_point() is None
    with pytest.raises(LookupError):
        jobs.resume(job.run)


@pytest.mark.unit
def test_each_reason_a_run_cannot_be_resumed_is_named(tmp_path):
    """Still running (a live process), finished, or no checkpoint: the sentence says which."""
    from studio.runs.registry import process_started_at

    registry = RunRegistry(tmp_path / "runs")
    run = registry.create(RunConfig.from_dict({"data": {"path": "x.csv"}}))
    run.set_status("running", pid=os.getpid(), pid_started=process_started_at(), step=3)
    assert not run.mark_if_orphaned() and "still running (process" in run.resume_problem()
    # A dead pid (or a live pid that now belongs to another process) is an orphan.
    run.set_status("running", pid=os.getpid(), pid_started=process_started_at() - 3600)
    assert run.mark_if_orphaned() and run.status().state == "interrupted"
    assert "before saving its first checkpoint" in run.resume_problem()
    (run.path / "checkpoints" / "step-2").mkdir(parents=True)
    (run.path / "checkpoints" / "step-2" / "trainer_state.pt").write_bytes(b"")
    assert run.resume_problem() is None and run.resume_point().name == "step-2"
    run.set_status("finished", stopped=False, step=10, total_steps=10)
    assert "already reached its final step (10 of 10)" in run.resume_problem()


@pytest.mark.unit
def test_a_queued_run_is_an_orphan_only_when_a_studio_starts(tmp_path):
    """A queued run has no process: resuming it by name must not mark it interrupted while a
    live server's queue holds it; a studio starting up knows the old queue is gone."""
    registry = RunRegistry(tmp_path / "runs")
    run = registry.create(RunConfig.from_dict({"data": {"path": "x.csv"}}))
    assert not run.mark_if_orphaned() and run.status().state == "queued"
    assert "still queued" in run.resume_problem()
    registry.mark_orphans_interrupted()
    assert run.status().state == "interrupted" and "never started" in run.status().message
