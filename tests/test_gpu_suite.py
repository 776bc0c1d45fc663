"""benchmarks/gpu_suite.py --smoke: the GPU suite's own code, run on CPU with tiny models, so that
it cannot rot between sessions that have a GPU (issue 13)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.process

ROOT = Path(__file__).resolve().parents[1]


def test_the_gpu_suite_runs_every_measurement_on_cpu(tmp_path):
    out = tmp_path / "suite.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [sys.executable, "benchmarks/gpu_suite.py", "--smoke", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    runs = {(r["shape"], r["run"]): r for r in result["runs"]}
    assert not [r for r in result["runs"] if "error" in r]
    for name in ("ours LoRA", "ours LoRA padded", "ours LoRA compiled", "ours QLoRA", "ours full", "TRL defaults"):
        assert runs[("1b", name)]["tokens_per_s"] > 0, name
    assert runs[("1b", "TRL defaults")]["gradient_checkpointing"] is True
    assert runs[("1b", "TRL checkpointing off")]["gradient_checkpointing"] is False
    ours = runs[("1b", "ours LoRA")]
    assert ours["batch"].startswith("packed: 4 rows x 256 tokens") and ours["estimate_bytes"] > 0
    assert runs[("1b", "ours LoRA padded")]["batch"].endswith("padded to the longest")
    assert runs[("1b", "ours LoRA compiled")]["compiled_layers"] == 2
    packing = result["packing"]
    assert packing["examples"] > 4 and abs(packing["rel"]) < 1e-4  # several examples shared rows
    assert set(result["targets"]) >= {"LoRA / TRL checkpointing off >= 3", "QLoRA / LoRA >= 0.7"}
    assert "packed vs padded loss" in proc.stdout and "target LoRA / full >= 1.2" in proc.stdout
