"""benchmarks/routing.py --smoke: the decode-step benchmark that a GPU session runs on the 1.07B shape
(issue 26) must not rot between the sessions that have one."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.process

ROOT = Path(__file__).resolve().parents[1]


def test_the_routing_benchmark_times_every_case_on_cpu():
    proc = subprocess.run(
        [sys.executable, "benchmarks/routing.py", "--smoke", "--shape", "1b"],
        cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = re.findall(r"^\s+(\d+)\s+(.+?)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)$", proc.stdout, re.M)
    cases = {(int(n), label) for n, label, *_ in rows}
    assert cases == {
        (1, "base"),
        (1, "one adapter"),
        (1, "PEFT, one adapter"),
        (8, "base"),
        (8, "one adapter"),
        (8, "mixed (base + 2)"),
        (8, "PEFT, one adapter"),
        (8, "PEFT, mixed"),
    }
    for n, label, ms, ratio, bound in rows:
        assert float(ms) > 0 and float(ratio) > 0, (n, label)
        # The bytes bound: 1 for the base, below 1 for every case that reads an adapter, lower for two.
        assert (float(bound) == 1.0) == (label == "base"), (n, label, bound)
    share = float(re.search(r"one r16 adapter ([\d.]+)% of them", proc.stdout).group(1))
    assert 0 < share < 10
