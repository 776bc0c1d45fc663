"""Ctrl-C and SIGTERM stop a CLI run the way the Stop button does: the current step finishes,
a checkpoint and the adapter are saved, the run ends *stopped* and resumes to the same losses
as a run never stopped; a second Ctrl-C aborts at once. The runs are real CLI processes."""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from studio.cli import main
from studio.runs.registry import RunRegistry, checkpoint_step
from studio.training.signals import EXIT_CODES, StopOnSignals
from tests.helpers import wait_until

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE = Path(sys.executable).with_name("accelerate")
# Enough steps that the signal, sent once step 2 is in the metrics, lands well before the end
# (the tiny model takes 15-200 ms a step, idle or with both cores busy), few enough that the
# reference run costs seconds.
STEPS = 40


def _args(model_dir, data, runs, steps=STEPS):
    return [
        "train",
        *("--data", str(data), "--model", str(model_dir), "--method", "lora"),
        *("--max-steps", str(steps), "--batch-size", "4", "--max-length", "64"),
        *("--learning-rate", "1e-2", "--lora-dropout", "0.1", "--eval-fraction", "0"),
        # fp32: the resumed losses are compared with a reference's at fp32's tolerance
        *("--precision", "fp32", "--memory-check", "false", "--runs-dir", str(runs)),
    ]


def _losses(run):
    return {m.step: m.loss for m in run.train_metrics()}


def _train_in_background(args, log: Path, env=None, launcher=None):
    command = [*(launcher or [sys.executable, "-m"]), "studio.cli", *args]
    with log.open("w") as err:  # a file, not a pipe: a full pipe would stall the run
        return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err, env=env)


def _wait_for_step(proc, runs: Path, step: int, timeout: float = 120):
    def reached():
        assert proc.poll() is None, "the run ended before the signal was sent"
        found = RunRegistry(runs).list() if runs.is_dir() else []
        return bool(found) and max(_losses(found[0]), default=0) >= step

    wait_until(reached, timeout, f"step {step} in the metrics")


@pytest.mark.process
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["sigint", "sigterm"])
def test_a_signal_stops_saves_and_the_run_resumes_to_the_same_losses(
    sig, tiny_model_dir, instruction_csv, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)  # `resume FOLDER` below: judged by the folder, not by ./runs
    stopped_runs = tmp_path / "stopped"
    proc = _train_in_background(_args(tiny_model_dir, instruction_csv, stopped_runs), tmp_path / "err.log")
    _wait_for_step(proc, stopped_runs, 2)
    os.kill(proc.pid, sig)
    assert proc.wait(timeout=60) == EXIT_CODES[sig]  # 130 / 143
    err = (tmp_path / "err.log").read_text()
    assert "stopping after the current step and saving a checkpoint" in err
    assert "Traceback" not in err

    [run] = RunRegistry(stopped_runs).list()
    status = run.status()
    assert status.state == "finished" and status.stopped and "Resume" in status.message
    assert 2 <= status.step < STEPS and run.is_trained()  # the adapter was saved too
    assert checkpoint_step(run.resume_point()) == status.step  # saved at the very step it stopped
    assert max(_losses(run)) == status.step
    assert run.resume_problem() is None
    stopped_at = status.step

    assert main(["resume", str(run.path)]) == 0
    status = run.status()
    assert status.state == "finished" and not status.stopped and status.step == STEPS
    assert [m.step for m in run.train_metrics()] == list(range(1, STEPS + 1))

    reference_runs = tmp_path / "reference"
    assert main(_args(tiny_model_dir, instruction_csv, reference_runs)) == 0
    ours, theirs = _losses(run), _losses(RunRegistry(reference_runs).list()[0])
    for step in (1, stopped_at, stopped_at + 1, STEPS):  # before, at and right after the stop, the end
        assert ours[step] == pytest.approx(theirs[step], rel=1e-4, abs=1e-5), step


@pytest.mark.process
def test_a_second_ctrl_c_aborts_at_once(tiny_model_dir, instruction_csv, tmp_path):
    runs = tmp_path / "runs"
    # Checkpoints every step make each step slow enough that the second Ctrl-C lands before the
    # first one's stop is complete.
    args = [*_args(tiny_model_dir, instruction_csv, runs, steps=5000), "--save-steps", "1"]
    proc = _train_in_background(args, tmp_path / "err.log")
    _wait_for_step(proc, runs, 2)
    os.kill(proc.pid, signal.SIGINT)
    wait_until(lambda: "Ctrl-C" in (tmp_path / "err.log").read_text(), 30, "the first Ctrl-C's line")
    os.kill(proc.pid, signal.SIGINT)
    code = proc.wait(timeout=30)
    assert code not in (0, *EXIT_CODES.values())  # aborted: neither finished nor stopped with a save
    assert "Traceback" not in (tmp_path / "err.log").read_text()
    [run] = RunRegistry(runs).list()
    status = run.status()
    if status.state == "finished":  # the stop was already through; nothing to abort
        pytest.skip("the first Ctrl-C's stop finished before the second arrived")
    assert status.state == "interrupted" and "second Ctrl-C" in status.message
    assert run.resume_problem() is None  # it resumes from the last checkpoint it saved


@pytest.mark.unit
def test_the_handlers_are_the_previous_ones_again_after_the_run():
    before = {sig: signal.getsignal(sig) for sig in EXIT_CODES}
    stop = threading.Event()
    with StopOnSignals(stop, announce=False) as signals:
        assert signal.getsignal(signal.SIGTERM) == signals._handle
        signal.raise_signal(signal.SIGTERM)
        signal.raise_signal(signal.SIGTERM)  # a repeated SIGTERM still only stops
        assert stop.is_set() and signals.exit_code == 143
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)  # Ctrl-C after a stop was asked: abort now
    assert {sig: signal.getsignal(sig) for sig in EXIT_CODES} == before


@pytest.mark.unit
def test_off_the_main_thread_nothing_is_installed():
    """A run trained in a thread (the server's job) keeps the process's handlers."""
    before, seen = signal.getsignal(signal.SIGINT), []

    def body():
        with StopOnSignals(threading.Event()):
            seen.append(signal.getsignal(signal.SIGINT))

    thread = threading.Thread(target=body)
    thread.start()
    thread.join(10)
    assert seen == [before]


@pytest.mark.process
def test_sigterm_to_torchrun_stops_every_process_at_the_same_step(tiny_model_dir, instruction_csv, tmp_path):
    runs = tmp_path / "runs"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    launcher = [str(Path(sys.executable).with_name("torchrun")), "--nproc-per-node", "2", "-m"]
    args = [*_args(tiny_model_dir, instruction_csv, runs, steps=5000), "--batch-size", "2"]
    started = time.monotonic()
    proc = _train_in_background(args, tmp_path / "err.log", env=env, launcher=launcher)
    _wait_for_step(proc, runs, 2)
    os.kill(proc.pid, signal.SIGTERM)  # torchrun passes it on to both processes
    proc.wait(timeout=60)
    err = (tmp_path / "err.log").read_text()
    # Had the processes stopped at different steps, the one still training would wait in a
    # collective for the other and torchrun would kill it after its 30 s grace.
    assert time.monotonic() - started < 120, err[-3000:]
    [run] = RunRegistry(runs).list()
    status = run.status()
    assert status.state == "finished" and status.stopped, (status.message, err[-3000:])
    assert checkpoint_step(run.resume_point()) == status.step < 5000
    assert "forcefully exiting" not in err, err[-3000:]
