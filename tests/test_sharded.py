"""Sharded training (FSDP2) on CPU: two gloo processes under torchrun against one process with
gradient accumulation on the same seeded stream, for full fine-tuning and LoRA; the same for DDP;
a sharded run killed after a checkpoint resumes to its final step; what it saves loads in plain
PEFT / transformers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from studio.runs.registry import RunRegistry
from tests.helpers import wait_until

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).with_name("torchrun")
ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
STEPS = {
    "lora": 12,  # enough after the step-4 checkpoint for the kill test to strike mid-run
    # Full fine-tuning: summation-order noise grows step by step through Adam (the losses differed
    # by 2.7e-3 after 12 steps, under 1e-3 after 6); 6 steps test the semantics, not that noise.
    "full": 6,
}


def _args(model_dir, data, runs, method, *extra) -> list[str]:
    return [
        "-m",
        "studio.cli",
        "train",
        "--data",
        str(data),
        "--model",
        str(model_dir),
        "--method",
        method,
        "--max-steps",
        str(STEPS[method]),
        "--batch-size",
        "2",
        "--max-length",
        "64",
        "--learning-rate",
        "1e-2" if method == "lora" else "1e-3",
        "--precision",
        "fp32",
        "--memory-check",
        "false",
        "--save-steps",
        "4",
        "--runs-dir",
        str(runs),
        *extra,
    ]


def _run(cmd: list[str]):
    out = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def _train(model_dir, data, runs: Path, method: str, processes: int, *extra):
    if processes == 1:
        _run([sys.executable, *_args(model_dir, data, runs, method, "--gradient-accumulation", "2", *extra)])
    else:
        _run([str(TORCHRUN), "--nproc_per_node", str(processes), *_args(model_dir, data, runs, method, *extra)])
    [run] = RunRegistry(runs).list()
    assert run.status().state == "finished" and run.status().step == STEPS[method]
    return run


def _weights(run) -> dict[str, torch.Tensor]:
    folder = run.weights_dir()
    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


def _same_direction(a: dict, b: dict, base: dict | None = None) -> None:
    """Every tensor (or, given ``base``, every tensor's change from it) points the same way, and the
    whole update has the same direction and size: Adam turns sign noise on near-zero gradients into
    whole steps (rarely seen embedding rows), so elementwise tolerances would test that noise."""
    assert a.keys() == b.keys()
    xs, ys = [], []
    for k in a:
        x, y = a[k].double().flatten(), b[k].double().flatten()
        if base is not None and k in base:
            x, y = x - base[k].double().flatten(), y - base[k].double().flatten()
        assert torch.nn.functional.cosine_similarity(x, y, dim=0) > 0.99, k
        xs.append(x)
        ys.append(y)
    x, y = torch.cat(xs), torch.cat(ys)
    assert torch.nn.functional.cosine_similarity(x, y, dim=0) > 0.9995
    assert abs(x.norm() - y.norm()) <= 1e-3 * y.norm()


def _losses(run) -> list[float]:
    return [m.loss for m in run.train_metrics()]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    import random

    from tests.helpers import write_csv

    rng = random.Random(1)
    rows = [
        [f"what is {a} plus {b}", f"answer {a + b} why {a} plus {b} equals {a + b}"]
        for a, b in ((rng.randint(1, 9), rng.randint(1, 9)) for _ in range(40))
    ]
    # 36 training rows in batches of 2: 18 batches, so the two processes split every step's pair.
    return write_csv(tmp_path_factory.mktemp("sharded") / "train.csv", ["instruction", "output"], rows)


@pytest.fixture(scope="module")
def trained(tiny_model_dir, data, tmp_path_factory):
    """Runs trained once per module: ``trained("one", "lora")`` is the reference (one process,
    batch 2, gradient accumulation 2); ``trained("fsdp", method)`` two sharded processes with the
    memory check on (each process checks itself, and the check must leave no trace)."""
    runs = {}

    def get(kind: str, method: str):
        if (kind, method) not in runs:
            root = tmp_path_factory.mktemp(f"{kind}-{method}")
            extra = ("--distributed", "fsdp", "--memory-check", "true") if kind == "fsdp" else ()
            runs[kind, method] = _train(tiny_model_dir, data, root, method, 1 if kind == "one" else 2, *extra)
        return runs[kind, method]

    return get


@pytest.mark.process
@pytest.mark.parametrize("method", ["lora", "full"])
def test_two_sharded_processes_train_like_one_with_accumulation(method, tiny_model_dir, trained):
    one, fsdp = trained("one", method), trained("fsdp", method)
    assert fsdp.config().training.distributed == "fsdp"
    check = fsdp.status().memory_check
    assert check and check["measured_bytes"] > 0 and check["estimate_bytes"] > 0, check
    # The logged loss is the mean over both processes' batches, so it matches one process's.
    assert [m.step for m in fsdp.train_metrics()] == list(range(1, STEPS[method] + 1))
    assert max(abs(a - b) for a, b in zip(_losses(one), _losses(fsdp))) < 1e-3, (_losses(one), _losses(fsdp))
    base = load_file(tiny_model_dir / "model.safetensors") if method == "full" else None
    _same_direction(_weights(fsdp), _weights(one), base)
    # Saved like a single run: the same files, gathered (not shards), loadable as usual.
    folder = fsdp.weights_dir()
    assert sorted(p.name for p in folder.iterdir() if p.suffix in (".json", ".safetensors")) == sorted(
        p.name for p in one.weights_dir().iterdir() if p.suffix in (".json", ".safetensors")
    )
    # Sharded checkpoints: one file per process, plus the gathered weights.
    last = fsdp.checkpoints()[-1]
    assert sorted(p.name for p in (last / "sharded").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]


@pytest.mark.process
def test_ddp_trains_like_one_process_with_accumulation(tiny_model_dir, data, tmp_path, trained):
    one = trained("one", "lora")
    ddp = _train(tiny_model_dir, data, tmp_path / "ddp", "lora", 2, "--memory-check", "true")
    assert ddp.status().memory_check["measured_bytes"] > 0
    assert max(abs(a - b) for a, b in zip(_losses(one), _losses(ddp))) < 1e-3
    _same_direction(_weights(ddp), _weights(one))


@pytest.mark.process
def test_a_killed_sharded_run_resumes_to_its_final_step(tiny_model_dir, data, tmp_path, trained):
    """Kill both processes (SIGKILL, no clean-up) after a checkpoint; `resume` under the same
    launcher continues from the sharded checkpoint and lands where an unbroken run lands."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    unbroken = trained("fsdp", "lora")
    runs = tmp_path / "killed"
    cmd = [
        str(TORCHRUN),
        "--nproc_per_node",
        "2",
        *_args(tiny_model_dir, data, runs, "lora", "--distributed", "fsdp", "--memory-check", "true"),
    ]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        wait_until(
            lambda: list(runs.glob("*/checkpoints/step-4/trainer_state.pt")), 300, "the step-4 checkpoint", poll=0.02
        )
    finally:  # the launcher and its workers (torchrun starts them in sessions of their own)
        for p in [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]:
            p.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    [run] = RunRegistry(runs).list()
    assert run.status().step < STEPS["lora"]  # killed mid-run, not finished
    _run([str(TORCHRUN), "--nproc_per_node", "2", "-m", "studio.cli", "resume", str(run.path)])
    status = run.status()
    assert status.state == "finished" and status.step == STEPS["lora"]
    resumed = _losses(run)
    assert [m.step for m in run.train_metrics()] == list(range(1, STEPS["lora"] + 1))
    assert max(abs(a - b) for a, b in zip(resumed, _losses(unbroken))) < 1e-3
    _same_direction(_weights(run), _weights(unbroken))

    # The adapter a sharded run saved loads in plain PEFT and gives the unbroken run's logits.
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(run.weights_dir())).eval()
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    with torch.no_grad():
        logits = model(ids).logits
        model.load_adapter(str(unbroken.weights_dir()), adapter_name="unbroken")
        model.set_adapter("unbroken")
        reference = model(ids).logits
    assert (logits - reference).abs().max() < 1e-3 * reference.abs().max()


def _agree_worker(rank: int, port: int, out: str) -> None:
    import json

    from studio.training.distributed import Dist
    from studio.training.memory_check import MemoryCheckFailed, _agree

    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    failure = MemoryCheckFailed("Two steps needed 9 GiB more RAM than the 1 GiB that was free.") if rank == 1 else None
    try:
        _agree(failure, Dist(rank, 2, rank))
        verdict = "trained on"
    except MemoryCheckFailed as exc:
        verdict = str(exc)
    Path(out, f"{rank}.json").write_text(json.dumps(verdict))
    torch.distributed.destroy_process_group()


@pytest.mark.process
def test_processes_agree_on_one_memory_verdict(tmp_path):
    """One process that would not fit stops every process, with its sentence."""
    import json

    import torch.multiprocessing as mp

    from tests.helpers import free_port

    mp.spawn(_agree_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    verdicts = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(2)]
    assert verdicts == ["Process 1 of 2: Two steps needed 9 GiB more RAM than the 1 GiB that was free."] * 2


@pytest.mark.unit
def test_a_checkpoint_resumes_only_with_the_process_count_and_sharding_it_was_saved_with(
    tiny_model_dir, data, tmp_path
):
    """Each process replays its own share of the data stream, and a sharded checkpoint holds the
    optimizer in shards: resuming another way is refused with a sentence, not trained wrong."""
    from studio.models import ModelError
    from studio.training import Trainer
    from studio.training.checkpoint import STATE_FILE
    from tests.helpers import tiny_run_config

    cfg = tiny_run_config(tiny_model_dir, data, max_steps=2, memory_check=False)
    trainer = Trainer(cfg, RunRegistry(tmp_path / "runs").create(cfg))
    trainer.setup()
    checkpoint = tmp_path / "step-4"
    trainer.save(checkpoint, with_state=True)
    state = torch.load(checkpoint / STATE_FILE, weights_only=True)
    assert state["processes"] == 1
    torch.save({**state, "processes": 2}, checkpoint / STATE_FILE)
    with pytest.raises(ModelError, match="saved by a run of 2 process.* resume it with 2"):
        trainer.restore(checkpoint)
    torch.save(state, checkpoint / STATE_FILE)
    (checkpoint / "sharded").mkdir()
    with pytest.raises(ModelError, match="was sharded .*--distributed fsdp.*; resume it the way it was launched"):
        trainer.restore(checkpoint)


@pytest.mark.process
@pytest.mark.parametrize("distributed", ["ddp", "fsdp"])
def test_dpo_under_two_processes_trains_like_one_with_accumulation(distributed, tiny_model_dir, tmp_path):
    """Issue 25: a preference objective under torchrun: the reference is each process's base with
    its adapter off, and the step's loss is the mean over both processes' pairs."""
    from tests.test_preference_training import _pairs

    pairs = _pairs(tmp_path / "pairs.csv")
    dpo = ("--objective", "dpo", "--eval-fraction", "0", "--eval-rows", "0")
    one = _train(tiny_model_dir, pairs, tmp_path / "one", "lora", 1, *dpo)
    two = _train(tiny_model_dir, pairs, tmp_path / "two", "lora", 2, "--distributed", distributed, *dpo)
    assert max(abs(a - b) for a, b in zip(_losses(one), _losses(two))) < 1e-3, (_losses(one), _losses(two))
    assert all("reward_accuracy" in m.extra for m in two.train_metrics())
    _same_direction(_weights(two), _weights(one))
