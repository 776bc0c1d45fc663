"""Scale-out: the CLI trainer runs unchanged under `accelerate launch` with two processes (gloo
on CPU) and produces one run with one adapter that loads in plain PEFT."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from studio.runs.registry import RunRegistry

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE = Path(sys.executable).with_name("accelerate")


@pytest.mark.process
def test_accelerate_launch_two_processes_one_run(tiny_model_dir, instruction_csv, tmp_path):
    runs = tmp_path / "runs"
    # --multi_gpu selects accelerate's torchrun launcher; with no GPU each process gets gloo on CPU.
    cmd = [
        str(ACCELERATE),
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "studio.cli",
        "train",
        "--data",
        str(instruction_csv),
        "--model",
        str(tiny_model_dir),
        "--max-steps",
        "12",
        "--batch-size",
        "2",
        "--max-length",
        "64",
        "--learning-rate",
        "1e-2",
        "--runs-dir",
        str(runs),
    ]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "(2 processes)" in out.stdout

    [run] = RunRegistry(runs).list()  # one run folder, not one per process
    status = run.status()
    assert status.state == "finished" and status.step == 12 and run.is_trained()
    train = run.train_metrics()
    assert [m.step for m in train] == list(range(1, 13))  # one process wrote the metrics
    losses = [m.loss for m in train]
    assert all(torch.isfinite(torch.tensor(losses))) and sum(losses[-3:]) < sum(losses[:3])

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), run.weights_dir())
    assert json.loads((run.weights_dir() / "adapter_config.json").read_text())["r"] == 16
    assert model.active_adapter == "default"


@pytest.mark.unit
def test_each_process_takes_every_other_batch_of_the_same_stream():
    """Rank r trains on batches r, r + world, ...: together the ranks cover the single-process
    stream exactly once, so two processes see an epoch in half the steps."""
    from itertools import islice

    from studio.training import batching
    from studio.training.distributed import Dist

    lengths = [5 + i % 17 for i in range(64)]

    def stream(dist, n):
        micro_batches = batching.stream(lengths, batching.Batching(4), seed=42, rank=dist.rank, world=dist.world)
        return [[row[0] for row in mb] for mb in islice(micro_batches, n)]

    single = stream(Dist(), 16)  # one epoch: 64 rows / batch 4
    rank0, rank1 = stream(Dist(0, 2, 0), 8), stream(Dist(1, 2, 1), 8)
    assert rank0 == single[0::2] and rank1 == single[1::2]
    assert sorted(i for b in rank0 + rank1 for i in b) == list(range(64))


@pytest.mark.unit
def test_a_sharding_launch_config_the_run_does_not_follow_is_refused(
    monkeypatch, tiny_model_dir, instruction_csv, tmp_path, capsys
):
    import pytest

    from studio.cli import main
    from studio.config import ConfigError
    from studio.training import distributed

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert distributed.from_env() == distributed.Dist(1, 2, 0)
    for var, name in distributed.SHARDING_ENV.items():
        monkeypatch.setenv(var, "true")
        with pytest.raises(ConfigError, match=name):
            distributed.from_env()
        monkeypatch.delenv(var)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert (
        main(
            [
                "train",
                "--data",
                str(instruction_csv),
                "--model",
                str(tiny_model_dir),
                "--runs-dir",
                str(tmp_path / "runs"),
            ]
        )
        == 2
    )
    assert "does not read; add `--distributed fsdp`" in capsys.readouterr().err and not (tmp_path / "runs").exists()
    assert distributed.from_env("fsdp") == distributed.Dist(1, 2, 0)  # an FSDP launch for an fsdp run


def test_gradient_accumulation_all_reduces_once_per_step(tiny_model_dir, instruction_csv, tmp_path):
    """Under DDP the micro-batches before a step's last run inside no_sync: one all-reduce per
    optimizer step instead of one per micro-batch (the gradients still sum over all of them)."""
    from contextlib import contextmanager

    from studio.training import Trainer
    from tests.helpers import tiny_run_config

    cfg = tiny_run_config(tiny_model_dir, instruction_csv, max_steps=3, gradient_accumulation=3, memory_check=False)
    trainer = Trainer(cfg, RunRegistry(tmp_path / "runs").create(cfg))
    trainer.setup()

    class CountingDDP:  # stands in for DistributedDataParallel around the loss
        def __init__(self, loss_fn):
            self.loss_fn, self.calls, self.unsynced, self.in_no_sync = loss_fn, 0, 0, False

        def __call__(self, **batch):
            self.calls += 1
            self.unsynced += self.in_no_sync
            return self.loss_fn(**batch)

        @contextmanager
        def no_sync(self):
            self.in_no_sync = True
            try:
                yield
            finally:
                self.in_no_sync = False

    trainer.forward_loss = ddp = CountingDDP(trainer.loss_fn)
    trainer.train()
    assert (ddp.calls, ddp.unsynced) == (9, 6)  # 3 steps x 3 micro-batches; the last of each syncs
