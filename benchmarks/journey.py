"""Time from Train to the first loss point (and each phase before it), training tokens/s and
peak memory, per method.

Runs the same path as the Train button (Studio.start_training -> background thread -> in-memory
metrics the page polls) on the default model and the bundled sample CSV, after the server's own
preload (studio/inference/warmup.py: a server imports its libraries before the first click). The
phases are the ones the run records in ``status.json`` (``startup``).

    .venv/bin/python benchmarks/journey.py [--steps 12] [--methods lora,qlora,full]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from studio.config import RunConfig  # noqa: E402
from studio.inference.warmup import preload  # noqa: E402
from studio.runs.records import TrainRecord  # noqa: E402
from studio.service import Studio  # noqa: E402

SAMPLE = ROOT / "studio" / "templates" / "samples" / "instructions.csv"


def measure(studio: Studio, method: str, steps: int) -> dict:
    cfg = RunConfig.from_dict(
        {
            "model": "default",
            "method": method,
            "data": {"path": str(SAMPLE)},
            "training": {"max_steps": steps, "learning_rate": 2e-5 if method == "full" else 2e-4},
        }
    )
    clicked = time.time()
    job = studio.start_training(cfg)
    first_point = None
    while job.alive:
        if first_point is None and any(isinstance(m, TrainRecord) for m in job.snapshot()):
            first_point = time.time() - clicked
        time.sleep(0.05)
    status = job.run.status().to_dict()
    train = [m.to_dict() for m in job.snapshot() if isinstance(m, TrainRecord)]
    steady = train[1:] or train  # the first step includes one-off warm-up
    return {
        "method": method,
        "state": status["state"],
        "first_point_s": first_point,
        "tokens_per_s": sum(m["tokens"] for m in steady) / sum(m["tokens"] / m["tokens_per_s"] for m in steady),
        "step_s": statistics.median(m["tokens"] / m["tokens_per_s"] for m in steady),
        "peak_rss_mib": max(m["rss_mib"] for m in train),
        "trainable": status.get("trainable_params"),
        "startup": status.get("startup") or {},
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--methods", default="lora,qlora,full")
    args = ap.parse_args()
    print(f"server start-up (once, before any click): preload {preload():.1f}s")
    studio = Studio(tempfile.mkdtemp(prefix="journey-runs-"))
    print(f"{studio.hardware.summary()}\n")
    print(
        f"{'method':<7} {'state':<9} {'Train->1st point':>17} {'real tok/s':>11} {'s/step':>7} "
        f"{'peak RSS MiB':>13} {'trainable':>11}"
    )
    results = [measure(studio, method, args.steps) for method in args.methods.split(",")]
    for r in results:
        print(
            f"{r['method']:<7} {r['state']:<9} {r['first_point_s']:>16.1f}s {r['tokens_per_s']:>11.0f} "
            f"{r['step_s']:>7.2f} {r['peak_rss_mib']:>13.0f} {r['trainable']:>11,}"
        )
    phases = list(dict.fromkeys(name for r in results for name in r["startup"]))
    print("\nTrain -> first loss point, by phase (seconds; `base score` after the first point for adapters):")
    print(f"{'phase':<20}" + "".join(f"{r['method']:>8}" for r in results))
    for name in phases:
        cells = "".join(f"{r['startup'][name]:>8.2f}" if name in r["startup"] else f"{'-':>8}" for r in results)
        print(f"{name:<20}{cells}")
    print("\nPeak RSS is the whole process (the studio's own imports included), sampled once per step.")


if __name__ == "__main__":
    main()
