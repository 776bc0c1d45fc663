"""training.compile (studio/training/compiling.py): compiled layers train to the losses eager ones
do, and a compiler that fails is reported, never counted. Not `numeric`: each test pins the
precision it compares in, or compares no numbers, so a rerun under the other `auto` would repeat it."""

import os

import pytest

from studio.runs.records import RunStatus
from studio.runs.registry import RunRegistry
from studio.training import run_training
from tests.helpers import tiny_run_config


@pytest.mark.process
@pytest.mark.parametrize("precision, rel", [("fp32", 1e-4), ("bf16", 1e-2)])
def test_compiled_layers_train_to_the_same_losses(tiny_model_dir, instruction_csv, runs_dir, precision, rel):
    """training.compile compiles each decoder layer in place: same losses (to the rounding of
    the precision: fused bf16 kernels round differently), and the adapter saves under the usual
    names and loads in plain PEFT."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    registry = RunRegistry(runs_dir)
    losses = {}
    for compile_ in (False, True):
        cfg = tiny_run_config(
            tiny_model_dir, instruction_csv, max_steps=4, compile=compile_, memory_check=False, precision=precision
        )
        run = registry.create(cfg)
        status = run_training(cfg, run)
        assert status.state == "finished", status.message
        assert status.compiled_layers == (2 if compile_ else 0) and status.compile_note is None
        losses[compile_] = [m.loss for m in run.train_metrics()]
    assert losses[True] == pytest.approx(losses[False], rel=rel)
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), run.weights_dir())


@pytest.mark.process
@pytest.mark.parametrize("probe_sees_it", [True, False])
def test_a_failed_compile_is_reported_not_counted(tiny_model_dir, instruction_csv, tmp_path, probe_sees_it):
    """With a C++ compiler that always fails and a cold inductor cache: the probe catches it up
    front and the run trains uncompiled and says so; if the probe is fooled, the layers' own
    backward compile fails (dynamo does not suppress that) and the run fails with a sentence
    and a one-click retry without Compile, never a traceback or a false "compiled"."""
    import json
    import subprocess
    import sys

    cfg = tiny_run_config(tiny_model_dir, instruction_csv, max_steps=2, compile=True, memory_check=False)
    config_path = tmp_path / "run.yaml"
    config_path.write_text(cfg.to_yaml())
    script = f"""
import sys, torch._inductor.config as inductor
inductor.cpp.cxx = ("/bin/false",)  # every C++ compile fails
import studio.training.trainer as trainer
if not {probe_sees_it}:
    trainer.inductor_problem = lambda: None  # the probe passes; the layers' own compile fails
from studio.cli import main
sys.exit(main(["train", "--config", {str(config_path)!r}, "--runs-dir", {str(tmp_path / "runs")!r}]))
"""
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor-cache")}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    status = RunStatus.from_dict(json.loads(next((tmp_path / "runs").glob("*/status.json")).read_text()))
    if probe_sees_it:
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert status.state == "finished" and status.compiled_layers == 0
        assert status.compile_note.startswith("Not compiled: torch.compile does not work on this machine")
        assert "Not compiled" in proc.stdout
    else:
        assert proc.returncode == 1 and status.state == "failed"
        assert status.message.startswith("torch.compile failed on this model") and "Turn Compile off" in status.message
        assert status.retry.changes == {"training.compile": False}
