"""Do the UI's defaults teach the default model a new answer format within minutes on this CPU?

Trains the default model on the bundled sample (300 arithmetic questions answered as
"ANSWER: ...\\nWHY: ...") with the Train tab's defaults (LoRA r16 all-linear, 1 epoch, batch 4,
learning rate 2e-4, 10% held out by prompt), then asks base and adapted model the held-out
questions (greedy, the same prompts) and reports how many answers follow the format, and how
many give the right number, plus the wall time.

    .venv/bin/python benchmarks/learns_format.py [--prompts 30] [--method lora]
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from studio import models  # noqa: E402
from studio.config import RunConfig  # noqa: E402
from studio.data import inspect  # noqa: E402
from studio.data.split import split_by_prompt  # noqa: E402
from studio.data.validate import prompt_key  # noqa: E402
from studio.runs.registry import RunRegistry  # noqa: E402
from studio.training import run_training  # noqa: E402

SAMPLE = ROOT / "studio" / "templates" / "samples" / "instructions.csv"
FORMAT = re.compile(r"^\s*ANSWER:\s*(-?\d+)\s*\n\s*WHY:", re.S)


def held_out(cfg: RunConfig, tokenizer) -> list[list[dict]]:
    """The eval split's conversations, exactly as training split them (same seed and rule)."""
    report = inspect(cfg.data, tokenizer)
    convs = [c for c in report.convs if c is not None]
    _, eval_idx = split_by_prompt(
        [prompt_key(c) for c in convs], cfg.data.eval_fraction, cfg.data.eval_rows, cfg.training.seed
    )
    return [convs[i] for i in eval_idx]


@torch.no_grad()
def answer(model, tokenizer, messages: list[dict], max_new_tokens: int = 40) -> str:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)


def score(replies: list[str], expected: list[str]) -> tuple[float, float]:
    fmt = [FORMAT.match(r) for r in replies]
    right = [m is not None and m.group(1) == FORMAT.match(e).group(1) for m, e in zip(fmt, expected)]
    return sum(m is not None for m in fmt) / len(replies), sum(right) / len(replies)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=30)
    ap.add_argument("--method", default="lora", choices=("lora", "qlora", "full"))
    args = ap.parse_args()
    cfg = RunConfig.from_dict(
        {
            "model": "default",
            "method": args.method,
            "data": {"path": str(SAMPLE)},
            "training": {"learning_rate": 2e-5 if args.method == "full" else 2e-4},
        }
    ).check()
    tokenizer = models.load_tokenizer("default")
    convs = held_out(cfg, tokenizer)[: args.prompts]
    prompts = [[m for m in c if m["role"] != "assistant"] for c in convs]
    expected = [next(m["content"] for m in c if m["role"] == "assistant") for c in convs]

    run = RunRegistry(tempfile.mkdtemp()).create(cfg)
    start = time.time()
    status = run_training(cfg, run).to_dict()
    train_s = time.time() - start
    assert status["state"] == "finished", status
    from peft import PeftModel

    base = models.load_model("default", "lora").eval()
    adapted = PeftModel.from_pretrained(base, run.weights_dir()).eval() if args.method != "full" else None
    with adapted.disable_adapter() if adapted is not None else torch.no_grad():
        base_replies = [answer(base, tokenizer, p) for p in prompts]
    tuned = adapted if adapted is not None else models.load_model(str(run.weights_dir()), "full").eval()
    tuned_replies = [answer(tuned, tokenizer, p) for p in prompts]
    total_s = time.time() - start

    base_fmt, base_right = score(base_replies, expected)
    tuned_fmt, tuned_right = score(tuned_replies, expected)
    print(f"\n{status['step']} steps ({args.method}, UI defaults), {len(prompts)} held-out prompts")
    print(f"{'model':<10}{'format':>10}{'right number':>15}")
    print(f"{'base':<10}{base_fmt:>10.0%}{base_right:>15.0%}")
    print(f"{'adapted':<10}{tuned_fmt:>10.0%}{tuned_right:>15.0%}")
    print(f"\ntraining {train_s:.0f} s, training + evaluation {total_s:.0f} s; eval loss {status.get('eval_loss'):.3f}")
    print(
        f"\nexample prompt: {prompts[0][-1]['content']!r}\n  base:    {base_replies[0]!r}"
        f"\n  adapted: {tuned_replies[0]!r}"
    )


if __name__ == "__main__":
    main()
