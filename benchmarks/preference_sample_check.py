"""Does the bundled preference sample teach something? Base indifference, then what a default DPO run learns.

    .venv/bin/python benchmarks/preference_sample_check.py              # base only (about 2 min on 2 CPUs)
    .venv/bin/python benchmarks/preference_sample_check.py --train      # + a default DPO LoRA run (+3 min)
    .venv/bin/python benchmarks/preference_sample_check.py --run runs/<id>   # measure an existing run

Preference accuracy: the share of pairs whose chosen answer gets a higher summed log-probability
than the rejected one (answer tokens only, the prompt rendered with the chat template exactly as
training renders it: ``studio.data.tokenize_pairs``; fp32), with a 95% Wilson interval. It is
measured on:

- ``sample``: all the sample's pairs, for the base model (it trained on none of them);
- ``held-out``: the run's own held-out split (``studio.data.prepare`` with the run's config and seed:
  the pairs whose prompts the run did not train on; 30 of 300 by default);
- ``fresh``: new pairs from the sample's generator (``benchmarks/make_samples.py``, another seed),
  none with a prompt in the sample, for a tighter interval than 30 pairs give;
- ``unseen kinds``: 30 pairs of six kinds of question the sample never asks, in units it never uses
  (km/h vs mph, square metres vs square feet, g vs oz, mm vs inches, fridge temperatures, km vs
  miles for trails), in sentences of other shapes: does the adapter learn the rule (metric) or the
  sample's sentences?

``--train`` runs ``finetune-studio train --data <sample> --objective dpo --method lora`` with every
other setting at its default (1 epoch, LoRA r16, lr 2e-4, batch 4, beta 0.1, seed 42). The run's
held-out ``reward_accuracy`` (DPO's implicit reward, relative to the base) is read from its
metrics.jsonl; the table also gives the adapter's plain preference accuracy.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SAMPLE = ROOT / "studio" / "templates" / "samples" / "preferences.csv"


def _make_samples():
    spec = importlib.util.spec_from_file_location("make_samples", ROOT / "benchmarks" / "make_samples.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of k successes in n."""
    if n == 0:
        return 0.0, 1.0
    p, d = k / n, 1 + z * z / n
    centre = (p + z * z / (2 * n)) / d
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return max(0.0, centre - half), min(1.0, centre + half)


def margins(model, examples, pad_id: int, batch_pairs: int = 16) -> list[float]:
    """Per pair: summed log-prob of the chosen answer minus the rejected one's."""
    import torch

    from studio.data.render import collate
    from studio.training.preference import sequence_logps

    out: list[float] = []
    with torch.no_grad():
        for i in range(0, len(examples), batch_pairs):
            rows = [side for pair in examples[i : i + batch_pairs] for side in (pair.chosen, pair.rejected)]
            sums, _ = sequence_logps(model, **collate(rows, pad_id))
            out += (sums[0::2] - sums[1::2]).tolist()
    return out


def pair_examples(rows, tokenizer, max_length: int = 512):
    from studio.data import PreferencePair, tokenize_pairs

    pairs = [PreferencePair([{"role": "user", "content": p}], c, r) for p, c, r in rows]
    return tokenize_pairs(pairs, tokenizer, max_length)


def unseen_pairs() -> list[tuple[str, str, str]]:
    """Pairs of kinds and units the sample does not have (written here, deterministic)."""
    rng = random.Random(7)
    rows = []
    for item in ["e-bike", "electric scooter", "kids' bike", "treadmill", "rowing machine"]:
        v = rng.randint(15, 30)
        rows.append(
            (
                f"What is the top speed of the {item}?",
                f"The {item} reaches {v} km/h.",
                f"The {item} reaches {round(v * 0.6214)} mph.",
            )
        )
    for item in ["rug", "garden shed", "tent", "paddling pool", "tablecloth"]:
        v = round(rng.uniform(1.5, 9), 1)
        rows.append(
            (
                f"How much floor does the {item} cover?",
                f"It covers about {v} square metres.",
                f"It covers about {round(v * 10.764)} square feet.",
            )
        )
    for item in ["coffee beans", "tea", "dried pasta", "porridge oats", "chocolate"]:
        v = rng.choice([250, 500, 200, 400])
        rows.append(
            (
                f"How big is a bag of your {item}?",
                f"A bag of our {item} holds {v} g.",
                f"A bag of our {item} holds {round(v / 28.35)} oz.",
            )
        )
    for item in ["screen protector", "phone case", "picture frame glass", "cutting board", "mattress topper"]:
        v = rng.choice([3, 5, 8, 10, 12])
        rows.append(
            (
                f"How thick is the {item}?",
                f"The {item} is {v} mm thick.",
                f"The {item} is {round(v / 25.4, 2)} inches thick.",
            )
        )
    for item in ["fridge", "freezer", "wine cooler", "cool box", "mini fridge"]:
        v = rng.choice([-18, 4, 8, 12, 5])
        rows.append(
            (
                f"How cold does the {item} get?",
                f"The {item} cools down to {v} °C.",
                f"The {item} cools down to {round(v * 9 / 5 + 32)} °F.",
            )
        )
    for item in ["hiking trail", "cycle route", "canal walk", "river path", "coastal path"]:
        v = rng.randint(5, 40)
        rows.append(
            (
                f"How long is the {item} near the Leeds shop?",
                f"The {item} is {v} km long.",
                f"The {item} is {round(v * 0.6214)} miles long.",
            )
        )
    return rows


def accuracy_cell(m: list[float]) -> str:
    k, n = sum(x > 0 for x in m), len(m)
    lo, hi = wilson(k, n)
    return f"{k / n:6.1%}  [{lo:5.1%}, {hi:5.1%}]  n={n:<3d}  median margin {sorted(m)[n // 2]:+6.2f}"


def train(csv: Path, runs_dir: Path) -> tuple[Path, float]:
    cmd = [
        str(ROOT / ".venv" / "bin" / "finetune-studio"),
        "train",
        "--runs-dir",
        str(runs_dir),
        "--data",
        str(csv),
        "--objective",
        "dpo",
        "--method",
        "lora",
    ]
    print("$", " ".join(cmd), flush=True)
    start = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    seconds = time.time() - start
    found = re.search(r"Saved: (\S+)", proc.stdout + proc.stderr)
    if proc.returncode != 0 or not found:
        sys.exit(f"training failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return Path(found.group(1)).parents[1], seconds


def run_records(run: Path) -> tuple[dict, dict]:
    """The run's last eval record and its status."""
    evals = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r.get("kind") == "eval"]
    return evals[-1], json.loads((run / "status.json").read_text())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--csv", type=Path, default=SAMPLE)
    ap.add_argument("--train", action="store_true", help="train a default DPO LoRA run first")
    ap.add_argument("--run", type=Path, help="an existing run folder to measure (its latest version)")
    ap.add_argument("--runs-dir", type=Path, help="where --train puts its run (default: a temporary folder)")
    ap.add_argument("--fresh", type=int, default=200, help="fresh pairs from the generator (0: none)")
    ap.add_argument("--by-kind", action="store_true", help="also the base's accuracy per kind of question")
    args = ap.parse_args(argv)

    import pandas as pd
    import torch
    from transformers import AutoModelForCausalLM

    from studio import models

    torch.manual_seed(0)
    make_samples = _make_samples()
    df = pd.read_csv(args.csv, keep_default_na=False)
    rows = list(df[["prompt", "chosen", "rejected"]].itertuples(index=False, name=None))
    fresh = [
        r[:3]
        for r in make_samples.preference_rows(make_samples.random.Random(2025), args.fresh, {p for p, _, _ in rows})
    ]

    run, train_seconds = args.run, None
    if args.train:
        runs_dir = args.runs_dir or Path(tempfile.mkdtemp(prefix="pref-check-"))
        run, train_seconds = train(args.csv, runs_dir)

    tok = models.load_tokenizer("default")
    base = AutoModelForCausalLM.from_pretrained(models.resolve("default"), dtype=torch.float32).eval()
    table: list[tuple[str, str]] = []
    sample_ex, fresh_ex, unseen_ex = (
        pair_examples(rows, tok),
        pair_examples(fresh, tok),
        pair_examples(unseen_pairs(), tok),
    )
    start = time.time()
    sample_margins = margins(base, sample_ex, tok.pad_token_id)
    table.append(("base, sample (all pairs)", accuracy_cell(sample_margins)))
    base_seconds = time.time() - start
    if args.by_kind:  # the base leans metric on some kinds and imperial on others; the sample balances them
        kinds = {r[0]: r[3] for r in make_samples.preference_rows(make_samples.random.Random(25))}
        by_kind: dict[str, list[float]] = {}
        for (prompt, _, _), m in zip(rows, sample_margins):
            by_kind.setdefault(kinds.get(prompt, "other"), []).append(m)
        table += [(f"  base, sample, {kind}", accuracy_cell(m)) for kind, m in sorted(by_kind.items())]
    if fresh:
        table.append(("base, fresh pairs", accuracy_cell(margins(base, fresh_ex, tok.pad_token_id))))
    table.append(("base, unseen kinds", accuracy_cell(margins(base, unseen_ex, tok.pad_token_id))))

    if run is not None:
        from peft import PeftModel

        from studio.config import RunConfig
        from studio.data import prepare

        cfg = RunConfig.from_yaml(run / "config.yaml")
        held_out = prepare(cfg.data, tok, cfg.training.seed).eval
        version = max((run / "versions").glob("v*"), key=lambda p: int(p.name[1:]))
        table.append(("base, run's held-out", accuracy_cell(margins(base, held_out, tok.pad_token_id))))
        adapted = PeftModel.from_pretrained(base, str(version)).eval()
        table.append(
            (f"adapter {version.name}, run's held-out", accuracy_cell(margins(adapted, held_out, tok.pad_token_id)))
        )
        if fresh:
            table.append(
                (f"adapter {version.name}, fresh pairs", accuracy_cell(margins(adapted, fresh_ex, tok.pad_token_id)))
            )
        table.append(
            (f"adapter {version.name}, unseen kinds", accuracy_cell(margins(adapted, unseen_ex, tok.pad_token_id)))
        )
        last_eval, status = run_records(run)
        table.append(
            (
                "run: held-out reward_accuracy",
                f"{last_eval['reward_accuracy']:6.1%}  at step {last_eval['step']}, reward margin "
                f"{last_eval['reward_margin']:.2f}, eval loss {last_eval['eval_loss']:.4f}",
            )
        )
        took = status["finished_at"] - status["started_at"]
        table.append(
            (
                "run: steps, time",
                f"{status['step']} steps on {status['train_rows']} train / {status['eval_rows']} held-out pairs, "
                f"{took:.0f} s training ({status['device']}, {status['precision']})"
                + (f", {train_seconds:.0f} s for the whole command" if train_seconds else ""),
            )
        )

    balance = make_samples.length_balance(rows)
    table.append(
        (
            "length chosen vs rejected",
            f"mean {balance['mean_chosen']:.1f} vs {balance['mean_rejected']:.1f} characters "
            f"({balance['mean_difference_share']:+.1%}); chosen longer in {balance['chosen_longer']:.0%}, "
            f"shorter in {balance['chosen_shorter']:.0%}",
        )
    )
    print(
        f"\n{args.csv.relative_to(ROOT) if args.csv.is_relative_to(ROOT) else args.csv}: {len(rows)} pairs"
        + (f"; run {run}" if run else "")
        + f"; base scoring took {base_seconds:.0f} s"
    )
    width = max(len(name) for name, _ in table)
    for name, value in table:
        print(f"{name:<{width}}  {value}")


if __name__ == "__main__":
    main()
