"""General regression on the default model: how KL(base || adapter) per token relates to the share
of general answers an adapter changes, over LoRA checkpoints at growing distances from the base
(where studio/evaluation/regression.py's thresholds come from), and what the measurement costs.

Trains short LoRA runs on the bundled samples (not timed), saving checkpoints, then measures each
checkpoint on the bundled general prompts and prints one line per checkpoint.

    .venv/bin/python benchmarks/regression.py [--prompts 40]
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
from studio.evaluation import regression, task  # noqa: E402
from studio.service import Studio  # noqa: E402
from studio.training import run_training  # noqa: E402

SAMPLES = ROOT / "studio" / "templates" / "samples"
# (sample, learning rate, steps, save every): a gentle run seen at four distances, a typical one at two
PLANS = [("instructions.csv", 1e-4, 20, 5), ("chat.jsonl", 1e-3, 20, 10)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=40)
    args = ap.parse_args()
    studio = Studio(tempfile.mkdtemp(prefix="regression-bench-"))
    print(f"{studio.hardware.summary()}\n")
    runs = []
    for sample, lr, steps, save in PLANS:
        cfg = RunConfig.from_dict(
            {
                "model": "default",
                "method": "lora",
                "data": {"path": str(SAMPLES / sample), "max_length": 256, "eval_fraction": 0.2},
                "training": {
                    "max_steps": steps,
                    "learning_rate": lr,
                    "memory_check": False,
                    "save_steps": save,
                    "keep_checkpoints": steps // save,
                },
            }
        )
        run = studio.registry.create(cfg)
        started = time.perf_counter()
        status = run_training(cfg, run)
        seconds = time.perf_counter() - started
        print(f"trained {sample} lr {lr}: {status.step} steps in {seconds:.0f} s ({status.state})")
        runs.append((sample, lr, run))
    print(f"\n{'adapter':<34}{'KL/token [95%]':>26}{'changed [95%]':>22}{'seconds':>10}")
    for sample, lr, run in runs:
        for checkpoint in [c.name for c in run.checkpoints()] + [None]:
            sides = task._sides(studio.playground, run, checkpoint)
            try:
                tokenizer = studio.playground.tokenizer
                r = regression.measure_regression(sides, tokenizer, task.generate, prompts=args.prompts)
            finally:
                for engine, _ in sides:
                    engine.close()
            name = f"{sample} lr {lr} {checkpoint or 'final'}"
            kl = f"{r['kl_per_token']:.4f} [{r['kl_ci95'][0]:.4f}, {r['kl_ci95'][1]:.4f}]"
            changed = f"{r['changed_share']:.0%} [{r['changed_ci95'][0]:.0%}, {r['changed_ci95'][1]:.0%}]"
            print(f"{name:<34}{kl:>26}{changed:>22}{r['seconds']:>10.1f}")
    print(f"\nthresholds: KL below {regression.KL_SMALL} small, above {regression.KL_LARGE} large")


if __name__ == "__main__":
    main()
