"""Training throughput: our trainer vs TRL's SFTTrainer with its defaults, on the same rows.

The default model, LoRA with the studio's defaults (r 16, alpha 32, dropout 0, all linear layers) on both sides, a
variable-length instruction CSV (rows of about 20 to 400 tokens), max length 512. TRL gets a
default SFTConfig with only the output dir, max length and bf16 set (bf16 only where the
device has it natively; this CPU has not, so both sides run fp32) and the same LoRA config.
Measured in one run, after warm-up steps:

    real tokens/s   non-padding tokens trained per second. Ours counts them per batch; for TRL
                    (random batches of 8, its default) it is steps x 8 x the mean row length,
                    the expectation over its sampler
    achieved FLOP/s what each side computes, per second: 4 x the decoder's linear weights x real
                    tokens, plus 4 x the output layer's weights x the positions it runs at
                    (LoRA: forward 2 per weight, backward to the inputs 2; frozen weights get no
                    weight gradient; attention scores and LoRA's own small matmuls left out).
                    Ours runs the output layer only where a label is (studio/training/loss.py);
                    TRL at every position, counted here at the real tokens only (padding not
                    credited to either side)
    matmul peak     a 2048^3 matmul in the training dtype, measured in the same run

Then, on a smaller file, whether the fast path learns the same thing: one epoch (so both see
the same rows, the same tokens) with our trainer, and again with the plain path (the model's
own loss with logits at every position, batches in random order, no length grouping); held-out
loss of the two within 2%.

    .venv/bin/python benchmarks/train_throughput.py [--steps 12] [--trl-steps 6] [--skip-equivalence]
"""

from __future__ import annotations

import argparse
import csv
import functools
import random
import sys
import tempfile
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

WARMUP = 2
WORDS = (
    "the of and to a in is that for it as with on be at by this from or an which one all were "
    "model data train answer question because value number first second result"
).split()


def variable_rows_csv(path: Path, rows: int = 240, seed: int = 0, answer_words: int = 300) -> Path:
    """Prompts of 8-60 words, answers of 10-300 words: about 20-400 tokens a row."""
    rng = random.Random(seed)
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["prompt", "completion"])
        for _ in range(rows):
            w.writerow(
                [
                    " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 60))) + "?",
                    " ".join(rng.choice(WORDS) for _ in range(rng.randint(10, answer_words))) + ".",
                ]
            )
    return path


def matmul_flops(dtype: torch.dtype, n: int = 2048, reps: int = 5) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - start)


def _train(data: Path, max_length: int, training: dict, eval_rows: int = 0) -> tuple[dict, list[dict]]:
    from studio.config import RunConfig
    from studio.runs.records import TrainRecord
    from studio.runs.registry import RunRegistry
    from studio.training import run_training

    cfg = RunConfig.from_dict(
        {
            "model": "default",
            "method": "lora",
            "data": {"path": str(data), "max_length": max_length, "eval_fraction": 0, "eval_rows": eval_rows},
            "training": {"memory_check": False, "save_steps": 10_000, **training},
        }
    ).check()
    records: list = []
    status = run_training(cfg, RunRegistry(tempfile.mkdtemp()).create(cfg), on_metrics=records.append).to_dict()
    assert status["state"] == "finished", status
    return status, [m.to_dict() for m in records if isinstance(m, TrainRecord)]


def ours(data: Path, steps: int, max_length: int, compile_: bool = False, packing: str = "auto") -> dict:
    _, train = _train(data, max_length, {"max_steps": steps, "compile": compile_, "packing": packing})
    timed = train[WARMUP:]
    seconds = sum(m["tokens"] / m["tokens_per_s"] for m in timed)
    warmup = train[:WARMUP]  # with compile, the first steps also compile
    return {
        "tokens": sum(m["tokens"] for m in timed),
        "logit_tokens": sum(m["labeled_tokens"] for m in timed),
        "seconds": seconds,
        "steps": len(timed),
        "warmup_s": sum(m["tokens"] / m["tokens_per_s"] for m in warmup),
        "warmup_tokens": sum(m["tokens"] for m in warmup),
    }


@contextmanager
def plain_path():
    """The trainer with the model's own loss (logits at every position) and random batches."""
    from studio.training import batching, trainer
    from studio.training.loss import LabeledTokenLoss

    saved = trainer.LabeledTokenLoss, batching.POOL_BATCHES
    trainer.LabeledTokenLoss = functools.partial(LabeledTokenLoss, labeled_only=False)
    batching.POOL_BATCHES = 1  # a pool of one batch: batches of random rows, padded to their longest
    try:
        yield
    finally:
        trainer.LabeledTokenLoss, batching.POOL_BATCHES = saved


def equivalence(data: Path, max_length: int, eval_rows: int) -> dict:
    """One epoch each way; held-out loss before and after, and each path's real tokens/s."""
    out = {}
    for name in ("fast", "plain"):
        with plain_path() if name == "plain" else nullcontext():
            status, train = _train(data, max_length, {"epochs": 1}, eval_rows)
        seconds = sum(m["tokens"] / m["tokens_per_s"] for m in train)
        out[name] = {
            "eval_loss": status["eval_loss"],
            "base_eval_loss": status["base_eval_loss"],
            "steps": len(train),
            "tokens": sum(m["tokens"] for m in train),
            "tokens_per_s": sum(m["tokens"] for m in train) / seconds,
        }
    return out


def trl_defaults(
    data: Path,
    steps: int,
    max_length: int,
    bf16: bool,
    model_ref: str = "default",
    gradient_checkpointing: bool | None = None,
) -> dict:
    """TRL's SFTTrainer with its defaults on the same rows and LoRA config (``gradient_checkpointing``
    None keeps TRL's default); real tokens/s after the warm-up steps, and the CUDA peak."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from studio import models

    rows = list(csv.DictReader(data.open(encoding="utf-8")))
    dataset = Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": r["prompt"]}],
                "completion": [{"role": "assistant", "content": r["completion"]}],
            }
            for r in rows
        ]
    )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = models.load_tokenizer(model_ref)
    model = models.load_model(model_ref, "lora", device, "bf16" if bf16 else "fp32")

    class Clock(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter())

    clock = Clock()
    args = SFTConfig(
        output_dir=tempfile.mkdtemp(),
        max_length=max_length,
        bf16=bf16,
        max_steps=steps,
        report_to=[],
        save_strategy="no",
        **({} if gradient_checkpointing is None else {"gradient_checkpointing": gradient_checkpointing}),
    )  # max_steps/report/save: to run a timed slice only
    from studio.config import LoraConfig as Ours

    d = Ours()  # the same LoRA config as our side
    lora = LoraConfig(
        r=d.r, lora_alpha=d.alpha, lora_dropout=d.dropout, target_modules=d.target_modules(), task_type="CAUSAL_LM"
    )
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=lora, callbacks=[clock]
    )
    lengths = [min(len(x), max_length) for x in trainer.train_dataset["input_ids"]]
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    trainer.train()
    times = [start] + clock.times
    timed = len(times) - 1 - WARMUP
    seconds = times[-1] - times[WARMUP]
    per_batch = args.per_device_train_batch_size * sum(lengths) / len(lengths)
    return {
        "tokens": per_batch * timed,
        "logit_tokens": per_batch * timed,
        "seconds": seconds,
        "steps": timed,
        "batch": args.per_device_train_batch_size,
        "gradient_checkpointing": args.gradient_checkpointing,
        "peak_bytes": torch.cuda.max_memory_allocated() if device == "cuda" else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=12, help="our optimizer steps (batch 4)")
    ap.add_argument("--trl-steps", type=int, default=6, help="TRL optimizer steps (its default batch is 8)")
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--skip-equivalence", action="store_true", help="only the throughput table")
    args = ap.parse_args()
    from studio.planning import hardware
    from studio.planning.memory import shape_for_model

    hw = hardware.detect()
    dtype = torch.bfloat16 if hw.bf16 else torch.float32
    tmp = Path(tempfile.mkdtemp())
    data = variable_rows_csv(tmp / "variable.csv")
    shape = shape_for_model("default")
    head = shape.lm_head.d_in * shape.lm_head.d_out
    body = sum(lin.d_in * lin.d_out for lin in shape.linears) - head
    peak = matmul_flops(dtype)
    a = ours(data, args.steps, args.max_length)
    c = ours(data, args.steps, args.max_length, compile_=True)
    # Packed rows (the GPU layout) on this CPU: auto leaves CPUs padded, this says whether that holds.
    p = ours(data, max(6, args.steps // 2), args.max_length, packing="on")  # steps of ~2.4x the tokens
    b = trl_defaults(data, args.trl_steps, args.max_length, hw.bf16)
    peak_after = matmul_flops(dtype)  # the machine is noisy: bracket the run
    peak = max(peak, peak_after)
    print(
        f"\nmatmul peak ({str(dtype).split('.')[-1]}, 2048^3): {peak / 1e9:.1f} GFLOP/s; "
        f"FLOPs per token: {4 * body / 1e6:.0f}M decoder + {4 * head / 1e6:.0f}M output layer where it runs"
    )
    print(f"{'trainer':<26}{'steps':>6}{'real tok/s':>12}{'logits at':>11}{'GFLOP/s':>10}{'% of peak':>11}")
    rates = {}
    runs = (
        ("ours (batch 4)", a),
        ("ours, compiled (batch 4)", c),
        (f"TRL defaults (batch {b['batch']})", b),
        ("ours, packed (4 x 512)", p),
    )
    for name, r in runs:
        tps = r["tokens"] / r["seconds"]
        rates[name] = tps
        flops = (4 * body * r["tokens"] + 4 * head * r["logit_tokens"]) / r["seconds"]
        print(
            f"{name:<26}{r['steps']:>6}{tps:>12.0f}{r['logit_tokens'] / r['tokens']:>11.0%}"
            f"{flops / 1e9:>10.1f}{flops / peak:>11.0%}"
        )
    ours_tps, compiled_tps, trl_tps, packed_tps = rates.values()
    print(f"packed rows vs padded batches on this CPU: {packed_tps / ours_tps:.2f}x real tokens/s")
    print(
        f"\nours / TRL defaults: {ours_tps / trl_tps:.2f}x real tokens/s; compiled: {compiled_tps / trl_tps:.2f}x "
        f"(target 3.0x); TRL gradient checkpointing by default: {b['gradient_checkpointing']}"
    )
    # What compiling costs up front, and after how many tokens it has paid for itself.
    extra = c["warmup_s"] - c["warmup_tokens"] / ours_tps
    saved_per_token = 1 / ours_tps - 1 / compiled_tps
    even = (
        f"{extra / saved_per_token:,.0f} tokens ({extra / saved_per_token / ours_tps / 60:.1f} min)"
        if saved_per_token > 0
        else "never"
    )
    print(
        f"compile: {compiled_tps / ours_tps - 1:+.1%} tokens/s once compiled; first {WARMUP} steps took "
        f"{c['warmup_s']:.0f} s ({extra:.0f} s of compiling); pays for itself after {even}"
    )
    if args.skip_equivalence:
        return
    eq = equivalence(variable_rows_csv(tmp / "small.csv", rows=72, seed=1), args.max_length, eval_rows=16)
    print(f"\nlearns the same (one epoch of 56 rows, 16 held out; base eval loss {eq['fast']['base_eval_loss']:.4f}):")
    print(f"{'path':<44}{'steps':>6}{'tokens':>8}{'real tok/s':>12}{'eval loss':>11}")
    for name, label in (
        ("fast", "ours (labeled logits, length-grouped)"),
        ("plain", "plain (logits everywhere, random batches)"),
    ):
        r = eq[name]
        print(f"{label:<44}{r['steps']:>6}{r['tokens']:>8}{r['tokens_per_s']:>12.0f}{r['eval_loss']:>11.4f}")
    gap = eq["fast"]["eval_loss"] / eq["plain"]["eval_loss"] - 1
    print(f"eval loss, fast vs plain: {gap:+.2%} (target within 2%)")


if __name__ == "__main__":
    main()
