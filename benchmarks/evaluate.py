"""Task evaluation on generated answers: base and adapter answer the same held-out rows of a
bundled sample on the default model, batched through the serving engine (issue 23's target: 50
rows, both sides, in <= 60 s on the 2-core CPU), then the general-regression prompts.

Trains a short LoRA run per sample first (not timed), then times ``Studio.evaluate_task`` (the
path the page and ``finetune-studio eval`` take) and prints the metrics it picked for that
sample's references, their intervals and verdicts, and the regression sentence; the task's time
and the regression's are printed apart.

    .venv/bin/python benchmarks/evaluate.py [--sample instructions|chat|text|all] [--rows 50]
        [--steps 30] [--regression-prompts 30]
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

SAMPLES = ROOT / "studio" / "templates" / "samples"
FILES = {"instructions": "instructions.csv", "chat": "chat.jsonl", "text": "text.csv"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sample", choices=[*FILES, "all"], default="instructions")
    ap.add_argument("--rows", type=int, default=50)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--regression-prompts", type=int, default=30)
    args = ap.parse_args()
    studio = Studio(tempfile.mkdtemp(prefix="eval-bench-"))
    print(f"{studio.hardware.summary()}\n")
    for sample in FILES if args.sample == "all" else [args.sample]:
        bench(studio, sample, args)


def bench(studio: Studio, sample: str, args) -> None:
    cfg = RunConfig.from_dict(
        {
            "model": "default",
            "method": "lora",
            # 20% held out: the instructions sample's 300 rows leave 60, enough for 50
            "data": {"path": str(SAMPLES / FILES[sample]), "max_length": 256, "eval_fraction": 0.2},
            "training": {"max_steps": args.steps, "learning_rate": 1e-3, "memory_check": False},
        }
    )
    run = studio.registry.create(cfg)
    started = time.perf_counter()
    status = run_training(cfg, run)
    print(f"== {sample}: trained {status.step} LoRA steps in {time.perf_counter() - started:.0f} s ({status.state})")
    started = time.perf_counter()
    result = studio.evaluate_task(run.id, rows=args.rows, regression_prompts=args.regression_prompts)
    seconds = time.perf_counter() - started
    regression = result.get("regression") or {}
    task_s = seconds - regression.get("seconds", 0.0)
    print(f"{result['rows']} rows, both sides: task {task_s:.1f} s, then {regression.get('prompts', 0)} general ")
    print(f"prompts {regression.get('seconds', 0.0):.1f} s (max_new_tokens {result['max_new_tokens']}; answers cut: ")
    print(f"base {result['cut_share']['base']:.0%}, adapter {result['cut_share']['adapter']:.0%})")
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
    if regression:
        print(regression["sentence"])
    if result["rows"] < args.rows:  # the sample holds out fewer rows than the target counts
        print(f"target ({args.rows} rows <= 60 s): not applicable, {result['rows']} rows in {task_s:.1f} s\n")
    else:
        met = "met" if task_s <= 60 else "NOT met"
        print(f"target: {args.rows} rows, both sides, <= 60 s: {met} ({task_s:.1f} s)\n")


if __name__ == "__main__":
    main()
