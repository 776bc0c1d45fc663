"""Memory estimate vs measurement on this machine's CPU.

For the default model, {full, LoRA, QLoRA} x {seq 128, 512} x {batch 1, 4}: each configuration
runs `finetune-studio train` (two optimizer steps on rows at least seq tokens long, so every
batch is exactly batch x seq) in a fresh process, and its peak resident set size is read from
the kernel's accounting for that child (os.wait4: what `/usr/bin/time -v` reports as "Maximum
resident set size"). Prints estimate vs measured and the worst relative error, and next to them
what the run's own pre-training memory check measured in-process (VmHWM), which should agree with
the kernel's number.

    .venv/bin/python benchmarks/estimator_accuracy.py [--measure-only] [--json OUT] [--objective dpo]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GRID = [(m, s, b) for m in ("full", "lora", "qlora") for s in (128, 512) for b in (1, 4)]


def long_rows_csv(path: Path, rows: int = 32) -> Path:
    rng = random.Random(0)
    words = "the of and to a in is that for it as with on be at model data train memory token".split()
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text"])
        for _ in range(rows):
            w.writerow([" ".join(rng.choice(words) for _ in range(900))])  # > 512 tokens: cut to seq
    return path


def long_pairs_csv(path: Path, rows: int = 32) -> Path:
    """Preference pairs whose both sides are over 512 tokens: cut to seq, so each pair is two full rows."""
    rng = random.Random(0)
    words = "the of and to a in is that for it as with on be at model data train memory token".split()
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["prompt", "chosen", "rejected"])
        for _ in range(rows):
            w.writerow(["Say something.", *(" ".join(rng.choice(words) for _ in range(900)) for _ in range(2))])
    return path


def measure(method: str, seq: int, batch: int, data: Path, runs: Path, objective: str = "sft") -> dict:
    cmd = [
        sys.executable,
        "-m",
        "studio.cli",
        "train",
        "--data",
        str(data),
        "--model",
        "default",
        "--method",
        method,
        "--max-length",
        str(seq),
        "--batch-size",
        str(batch),
        "--max-steps",
        "2",
        "--eval-fraction",
        "0",
        "--runs-dir",
        str(runs),
        "--learning-rate",
        "1e-5",
        "--objective",
        objective,
    ]
    t = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{method} {seq} {batch} failed:\n{out[-2000:]}")
    run_dir = next(line.split(": ", 1)[1] for line in out.splitlines() if line.startswith("Run folder: "))
    check = json.loads((Path(run_dir) / "status.json").read_text()).get("memory_check", {})
    from studio.config import RunConfig

    return {
        "method": method,
        "seq": seq,
        "batch": batch,
        "lora_dropout": RunConfig().lora.dropout,
        "objective": objective,
        "precision": json.loads((Path(run_dir) / "status.json").read_text()).get("precision"),
        "peak_rss_bytes": usage.ru_maxrss * 1024,
        "check_bytes": check.get("peak_bytes"),
        "seconds": round(time.time() - t, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--measure-only", action="store_true")
    ap.add_argument("--methods", default="full,lora,qlora", help="comma list, e.g. lora,qlora")
    ap.add_argument("--json", help="append measurements to this JSONL file")
    ap.add_argument("--objective", default="sft", help="sft, or dpo/orpo on pairs of long answers")
    ap.add_argument(
        "--from",
        dest="recorded",
        help="compare against measurements recorded earlier (JSONL) "
        "instead of measuring, e.g. benchmarks/results/cpu_memory.jsonl",
    )
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp())
    data = long_rows_csv(work / "long.csv") if args.objective == "sft" else long_pairs_csv(work / "pairs.csv")
    rows = []
    recorded = [json.loads(line) for line in open(args.recorded)] if args.recorded else None
    grid = [g for g in GRID if g[0] in args.methods.split(",")]
    for n, (method, seq, batch) in enumerate(
        recorded and [(r["method"], r["seq"], r["batch"]) for r in recorded] or grid
    ):
        rec = recorded[n] if recorded else measure(method, seq, batch, data, work / "runs", args.objective)
        if not args.measure_only:
            from studio.config import RunConfig
            from studio.planning import hardware
            from studio.planning.memory import estimate, shape_for_model
            from studio.planning.planner import settings_for

            # The run `measure` trains (older files recorded no dropout: it was 0.05 then).
            cfg = RunConfig(method=method).with_overrides(
                {
                    "data.max_length": seq,
                    "training.batch_size": batch,
                    "lora.dropout": rec.get("lora_dropout", 0.05),
                    "training.objective": rec.get("objective", "sft"),
                }
            )
            settings = settings_for(cfg, hardware.detect(), "cpu")
            est = estimate(shape_for_model("default"), method, settings, "cpu")
            rec["estimate_bytes"] = est.total_bytes
            rec["error"] = est.total_bytes / rec["peak_rss_bytes"] - 1
        rows.append(rec)
        print(json.dumps(rec), flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(rec) + "\n")
    if args.measure_only:
        return
    mib = 2**20
    print(
        f"\n{'method':<7}{'seq':>5}{'batch':>6}{'estimate MiB':>14}{'measured MiB':>14}{'error':>8}"
        f"{'in-run check MiB':>18}"
    )
    for r in rows:
        check = f"{r['check_bytes'] / mib:>18.0f}" if r.get("check_bytes") else f"{'-':>18}"
        print(
            f"{r['method']:<7}{r['seq']:>5}{r['batch']:>6}{r['estimate_bytes'] / mib:>14.0f}"
            f"{r['peak_rss_bytes'] / mib:>14.0f}{r['error']:>+8.1%}{check}"
        )
    worst = max(rows, key=lambda r: abs(r["error"]))
    print(
        f"\nworst relative error: {worst['error']:+.1%} "
        f"({worst['method']}, seq {worst['seq']}, batch {worst['batch']}); "
        "target: every row within 10%"
    )


if __name__ == "__main__":
    main()
