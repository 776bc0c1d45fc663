"""The pre-run memory check: it measures, it leaves no trace on the run, and it refuses runs that cannot fit."""

from contextlib import contextmanager

import pytest
import torch

from studio.runs.registry import RunRegistry
from studio.training import Trainer, run_training
from studio.training import memory_check as mc
from tests.helpers import tiny_run_config

pytestmark = pytest.mark.numeric  # CI runs these again under the other precision (see conftest.py)


def _cfg(model_dir, data, method, **training):
    """Dropout on, so the RNG the check must restore is really used."""
    return tiny_run_config(model_dir, data, method, dropout=0.1, **{"max_steps": 6, **training})


def _losses(run):
    return [m.loss for m in run.train_metrics()]


@pytest.mark.parametrize("method", ["full", "lora"])
def test_check_measures_and_leaves_the_run_unchanged(method, tiny_model_dir, instruction_csv, runs_dir):
    """Same seed with and without the check: identical losses, step for step. For full
    fine-tuning this proves no weight moved; for LoRA (dropout 0.1) that the RNG was restored."""
    registry = RunRegistry(runs_dir)
    runs = {}
    for check in (True, False):
        cfg = _cfg(tiny_model_dir, instruction_csv, method, memory_check=check)
        runs[check] = registry.create(cfg)
        assert run_training(cfg, runs[check]).state == "finished"
    assert _losses(runs[True]) == _losses(runs[False])
    status = runs[True].status()
    m = status.memory_check
    assert m["device"] == "cpu" and m["batch_size"] == 4 and 0 < m["seq_len"] <= 64
    assert m["peak_bytes"] >= m["baseline_bytes"] > 0 and m["estimate_bytes"] > 0
    assert m["measured_bytes"] == m["peak_bytes"] - m["baseline_bytes"]  # CPU: training's own memory
    assert "measured" in m["summary"] and "estimated" in m["summary"]
    assert runs[False].status().memory_check is None


@pytest.mark.unit
def test_a_run_the_estimate_says_cannot_fit_is_refused_before_it_starts(
    tiny_model_dir, instruction_csv, runs_dir, monkeypatch
):
    monkeypatch.setattr(mc, "available_bytes", lambda device, local_rank=0: 100 * 2**20)
    cfg = _cfg(tiny_model_dir, instruction_csv, "lora")
    run = RunRegistry(runs_dir).create(cfg)
    status = run_training(cfg, run)
    assert status.state == "failed"
    assert "needs about" in status.message and "100 MiB is available" in status.message
    assert "Traceback" not in status.message
    assert _losses(run) == [] and not run.is_trained()  # nothing trained, nothing half-saved


@pytest.mark.unit
def test_out_of_memory_during_the_check_is_a_sentence_with_a_fix(tiny_model_dir, instruction_csv, runs_dir):
    cfg = _cfg(tiny_model_dir, instruction_csv, "lora", batch_size=8)
    trainer = Trainer(cfg, RunRegistry(runs_dir).create(cfg))
    trainer.setup()

    @contextmanager
    def oom():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        yield

    trainer.autocast = oom
    with pytest.raises(mc.MemoryCheckFailed) as err:
        mc.check_memory(trainer)
    text = str(err.value)
    assert "ran out of memory" in text and "batch 8" in text
    assert all(g["lr"] == 0.0 for g in trainer.optimizer.param_groups)  # never trains after a failed check


def test_gradient_checkpointing_trains_to_the_same_losses(tiny_model_dir, instruction_csv, runs_dir):
    registry = RunRegistry(runs_dir)
    losses = {}
    for gc in (True, False):
        cfg = _cfg(tiny_model_dir, instruction_csv, "lora", gradient_checkpointing=gc, memory_check=False)
        run = registry.create(cfg)
        assert run_training(cfg, run).state == "finished"
        losses[gc] = _losses(run)
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)


def test_out_of_memory_mid_run_fails_cleanly_with_a_retry_and_the_server_goes_on(
    tiny_model_dir, instruction_csv, runs_dir, monkeypatch
):
    from studio.training import JobManager
    from studio.training.trainer import Trainer as T

    calls = {"n": 0}
    real = T.tensors

    def collate_then_oom(self, micro_batch, examples=None):
        calls["n"] += 1
        if calls["n"] == 6:  # a few steps in, the way a long batch would
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.50 GiB")
        return real(self, micro_batch, examples)

    monkeypatch.setattr(T, "tensors", collate_then_oom)
    jobs = JobManager(RunRegistry(runs_dir))
    job = jobs.start(_cfg(tiny_model_dir, instruction_csv, "lora", memory_check=False, max_steps=50))
    job.thread.join(120)
    status = job.run.status()
    assert status.state == "failed"
    assert status.message.startswith("Ran out of memory at step") and "Traceback" not in status.message
    retry = status.retry
    assert retry.changes and retry.text in status.message
    assert set(retry.changes) <= {
        "training.gradient_checkpointing",
        "training.batch_size",
        "training.gradient_accumulation",
        "data.max_length",
        "method",
    }

    monkeypatch.setattr(T, "tensors", real)  # the server keeps serving: the next job runs
    cfg = _cfg(tiny_model_dir, instruction_csv, "lora", memory_check=False, max_steps=3)
    nxt = jobs.start(cfg.with_overrides(retry.changes))  # what the Retry button starts
    nxt.thread.join(120)
    assert nxt.run.status().state == "finished"


@pytest.mark.unit
def test_memory_too_small_for_any_setting_says_what_else_to_do(tiny_model_dir, instruction_csv, runs_dir, monkeypatch):
    monkeypatch.setattr(mc, "available_bytes", lambda device, local_rank=0: 100 * 2**20)
    cfg = _cfg(tiny_model_dir, instruction_csv, "lora")
    run = RunRegistry(runs_dir).create(cfg)
    status = run_training(cfg, run)
    # 100 MiB is less than the runtime alone: no setting fits, and the sentence says what else to do.
    assert status.retry is None and "Choose QLoRA, a smaller model, or shorter rows" in status.message
