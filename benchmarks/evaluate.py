"""Task evaluation on generated answers: base and adapter answer the same held-out rows of the
bundled instructions sample on the default model, batched through the serving engine (issue 23's
target: 50 rows, both sides, in <= 60 s on the 2-core CPU).

Trains a short LoRA run first (not timed), then times ``Studio.evaluate_task`` (the path the page
and ``finetune-studio eval`` take) and prints its metrics, intervals and verdicts.

    .venv/bin/python benchmarks/evaluate.py [--rows 50] [--steps 30]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from studio.config import RunConfig  # noqa: E402
from studio.service import Studio  # noqa: E402
from studio.training import run_training  # noqa: E402

SAMPLE = ROOT / "studio" / "templates" / "samples" / "instructions.csv"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=50)
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args()
    studio = Studio(tempfile.mkdtemp(prefix="eval-bench-"))
    print(f"{studio.hardware.summary()}\n")
    cfg = RunConfig.from_dict(
        {
            "model": "default",
            "method": "lora",
            # 20% held out: the sample's 300 rows leave 60, enough for 50
            "data": {"path": str(SAMPLE), "max_length": 256, "eval_fraction": 0.2},
            "training": {"max_steps": args.steps, "learning_rate": 1e-3, "memory_check": False},
        }
    )
    run = studio.registry.create(cfg)
    started = time.perf_counter()
    status = run_training(cfg, run)
    print(f"trained {status.step} LoRA steps in {time.perf_counter() - started:.0f} s ({status.state})")
    started = time.perf_counter()
    result = studio.evaluate_task(run.id, rows=args.rows)
    seconds = time.perf_counter() - started
    print(f"\n{result['rows']} rows, both sides, {seconds:.1f} s (max_new_tokens {result['max_new_tokens']}; ")
    print(f"answers cut by it: base {result['cut_share']['base']:.0%}, adapter {result['cut_share']['adapter']:.0%})")
    print(f"{result['reason']}\n")
    print(f"{'metric':<12} {'base':>16} {'adapter':>16} {'adapter - base':>22} {'W/T/L':>10}")
    for m in result["metrics"]:
        base = f"{m['base']:.2f} [{m['base_ci95'][0]:.2f}, {m['base_ci95'][1]:.2f}]"
        adapter = f"{m['adapter']:.2f} [{m['adapter_ci95'][0]:.2f}, {m['adapter_ci95'][1]:.2f}]"
        diff = f"{m['diff']:+.2f} [{m['diff_ci95'][0]:+.2f}, {m['diff_ci95'][1]:+.2f}]"
        print(f"{m['name']:<12} {base:>16} {adapter:>16} {diff:>22} {m['wins']:>3}/{m['ties']}/{m['losses']}")
    print()
    for line in result["verdicts"]:
        print(line)
    print(f"\ntarget: {args.rows} rows, both sides, <= 60 s: {'met' if seconds <= 60 else 'NOT met'} ({seconds:.1f} s)")


if __name__ == "__main__":
    main()
