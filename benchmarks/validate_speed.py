"""Read, validate and count the tokens of a 100k-row CSV (about 300 tokens a row).

    .venv/bin/python benchmarks/validate_speed.py [--rows 100000] [--model default]

Prints the time of each stage, and (on a sample of rows) how our pre-token cache counter
compares with the tokenizer's own batch encode, which it replaces for byte-level BPE models.
Target (issue 3): the whole validate under 15 s on the 2-core CPU machine.
"""

from __future__ import annotations

import argparse
import csv
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from studio.data import detect_format, read_table, validate  # noqa: E402
from studio.data.tokens import TokenCounter  # noqa: E402
from studio.models import load_tokenizer  # noqa: E402


def make_csv(path: Path, rows: int) -> None:
    """English-like text: a Zipf-weighted vocabulary of real-looking words, numbers, punctuation."""
    rng = random.Random(0)
    syllables = [
        "an",
        "ber",
        "co",
        "de",
        "el",
        "for",
        "gu",
        "ha",
        "in",
        "jo",
        "ka",
        "la",
        "men",
        "no",
        "or",
        "pre",
        "qu",
        "ra",
        "st",
        "ti",
        "un",
        "ve",
        "wa",
        "x",
        "yo",
        "ze",
        "th",
        "ing",
        "tion",
        "ly",
    ]
    vocab = ["the", "of", "and", "to", "a", "in", "is", "that", "for", "it", "as", "with", "on", "be", "at"]
    vocab += ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(30_000)]
    cum, total = [], 0.0
    for i in range(len(vocab)):  # cumulative Zipf weights, computed once (choices would redo it per call)
        total += 1 / (i + 1)
        cum.append(total)

    def sentence(n_words: int) -> str:
        words = rng.choices(vocab, cum_weights=cum, k=n_words)
        words[0] = words[0].capitalize()
        if rng.random() < 0.3:
            words.insert(rng.randrange(len(words)), str(rng.randint(1, 5000)))
        return " ".join(words) + rng.choice([".", "?", "!", ","])

    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["instruction", "input", "output"])
        for _ in range(rows):
            w.writerow(
                [
                    sentence(rng.randint(8, 40)),
                    sentence(rng.randint(3, 30)) if rng.random() < 0.4 else "",
                    " ".join(sentence(rng.randint(8, 25)) for _ in range(rng.randint(3, 12))),
                ]
            )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--model", default="default")
    args = ap.parse_args()
    tok = load_tokenizer(args.model)
    path = Path(tempfile.mkdtemp()) / "big.csv"
    t = time.perf_counter()
    make_csv(path, args.rows)
    print(
        f"made {args.rows:,} rows, {path.stat().st_size / 1e6:.0f} MB "
        f"in {time.perf_counter() - t:.1f} s (not timed below)"
    )

    t0 = time.perf_counter()
    table = read_table(path)
    t1 = time.perf_counter()
    mapping = detect_format(table.df)
    report = validate(table, mapping, tok, max_length=512)
    t2 = time.perf_counter()
    s = report.stats.to_dict()
    print(f"\n{'stage':<34}{'seconds':>9}")
    print(f"{'read (decode, sniff, parse)':<34}{t1 - t0:>9.2f}")
    print(f"{'map + validate + count tokens':<34}{t2 - t1:>9.2f}")
    print(f"{'total':<34}{t2 - t0:>9.2f}   target <= 15")
    print(
        f"\nrows {report.rows:,}, usable {report.usable_rows:,}, tokens {int(report.stats.lengths.sum()):,} "
        f"(median row {s['length_median']:.0f}), findings: {', '.join(f.code for f in report.findings) or 'none'}"
    )

    sample = table.df["output"].tolist()[:20_000]
    t = time.perf_counter()
    ours = TokenCounter(tok).count(sample)
    ours_s = time.perf_counter() - t
    t = time.perf_counter()
    enc = tok(sample, add_special_tokens=False, return_attention_mask=False)
    theirs_s = time.perf_counter() - t
    exact = ours.tolist() == [len(x) for x in enc["input_ids"]]
    print(
        f"\ncounting 20,000 cells: pre-token cache {ours_s:.2f} s (cold cache) vs tokenizer batch encode "
        f"{theirs_s:.2f} s ({theirs_s / ours_s:.1f}x); identical counts: {exact}"
    )


if __name__ == "__main__":
    main()
