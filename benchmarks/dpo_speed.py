"""DPO step time: the studio's trainer against TRL's DPOTrainer (defaults), on the same pairs.

Both train a LoRA adapter on the same model with the same LoRA settings (r, alpha, targets,
dropout), batch of pairs, max length, learning rate and precision, for the same number of steps;
the first steps are warm-up and not timed. TRL runs with its defaults otherwise (reference
log-probs computed in the step, as the studio does; its own data collator and padding). Also the
studio's SFT step on the chosen answers alone, for the issue's "a DPO step costs about one SFT step
on chosen + rejected (plus a no-grad reference pass)".

    .venv/bin/python benchmarks/dpo_speed.py [--model default] [--steps 12] [--batch 4] [--max-length 128]

Prints seconds per step for each and the ratios, measured in one run (the machine is noisy:
compare the ratios, not the absolute times).
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WARMUP = 2


def pairs(n: int = 96) -> list[dict[str, str]]:
    """Sums with a right and a wrong answer of the same shape."""
    out = []
    for i in range(n):
        a, b = 3 + i % 17, 5 + i % 11
        right, wrong = a + b, a + b + (1 if i % 2 else -1)
        prompt = f"Add {a} and {b}, then explain the result in one short sentence."
        out.append(
            {
                "prompt": prompt,
                "chosen": f"{a} plus {b} is {right}, because adding {b} to {a} gives {right}.",
                "rejected": f"{a} plus {b} is {wrong}, because adding {b} to {a} gives {wrong}.",
            }
        )
    return out


def studio_seconds_per_step(data: Path, args, objective: str) -> float:
    from studio.config import RunConfig
    from studio.runs.registry import RunRegistry
    from studio.training import run_training

    cfg = RunConfig.from_dict(
        {
            "model": args.model,
            "method": "lora",
            "data": {"path": str(data), "max_length": args.max_length, "eval_fraction": 0.0, "eval_rows": 0},
            "training": {
                "objective": objective,
                "max_steps": args.steps,
                "batch_size": args.batch,
                "learning_rate": 5e-5,
                "precision": "fp32",
                "memory_check": False,
                "seed": 0,
            },
        }
    )
    with tempfile.TemporaryDirectory() as runs:
        run = RunRegistry(runs).create(cfg)
        status = run_training(cfg, run)
        assert status.state == "finished", status.message
        train = run.train_metrics()
    times = [b.elapsed_s - a.elapsed_s for a, b in zip(train, train[1:])][WARMUP:]
    return statistics.median(times)


def trl_seconds_per_step(rows: list[dict[str, str]], args) -> float:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from studio import models
    from studio.config import RunConfig

    cfg = RunConfig()
    folder = models.resolve(args.model)
    tokenizer = models.load_tokenizer(args.model)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    stamps: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, *_, **__):
            stamps.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as out:
        trainer = DPOTrainer(
            model=model,
            args=DPOConfig(
                output_dir=out,
                per_device_train_batch_size=args.batch,
                max_steps=args.steps,
                max_length=args.max_length,
                learning_rate=5e-5,
                logging_steps=1000,
                save_strategy="no",
                report_to=[],
                use_cpu=True,
                bf16=False,
                seed=0,
            ),
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
            peft_config=LoraConfig(
                r=cfg.lora.r,
                lora_alpha=cfg.lora.alpha,
                lora_dropout=cfg.lora.dropout,
                target_modules=cfg.lora.target_modules(),
                task_type="CAUSAL_LM",
            ),
            callbacks=[Clock()],
        )
        trainer.train()
    times = [b - a for a, b in zip(stamps, stamps[1:])][WARMUP:]
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=128)
    args = parser.parse_args()

    rows = pairs()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "pairs.csv"
        with data.open("w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=["prompt", "chosen", "rejected"])
            w.writeheader()
            w.writerows(rows)
        sft = Path(tmp) / "chosen.csv"
        with sft.open("w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["instruction", "output"])
            w.writerows([[r["prompt"], r["chosen"]] for r in rows])
        ours = studio_seconds_per_step(data, args, "dpo")
        sft_step = studio_seconds_per_step(sft, args, "sft")
    theirs = trl_seconds_per_step(rows, args)
    print(f"model {args.model}, LoRA, batch {args.batch} pairs, max length {args.max_length}, fp32, CPU")
    print(f"{'':<34}{'s/step':>8}")
    print(f"{'studio DPO':<34}{ours:>8.3f}")
    print(f"{'TRL DPOTrainer (defaults)':<34}{theirs:>8.3f}")
    print(f"{'studio SFT, chosen answers only':<34}{sft_step:>8.3f}")
    print(f"studio DPO / TRL DPO: {ours / theirs:.2f}x the time (TRL / studio: {theirs / ours:.2f}x)")
    print(f"studio DPO / studio SFT on chosen: {ours / sft_step:.2f}x")


if __name__ == "__main__":
    main()
