"""One device call's worth of GPU measurements for issue 13: speed, memory and packing, on one GPU.

Random-initialised models from configs in benchmarks/configs (the default's 135M shape and a
Llama-shaped 1.07B: hidden 2048, 16 layers, 32 heads / 8 kv, intermediate 8192, vocab 49152,
tied embeddings), the default's tokenizer, 480 prompt/completion rows of about 20-400 tokens,
max length 1024, batch 8, the studio's defaults otherwise (LoRA r 16 on all linear layers).
No hub: nothing is downloaded.

    runs        ours LoRA (packed, eager and compiled; padded), QLoRA, full (eager and compiled),
                on the 1.07B shape; LoRA, QLoRA and full on the 135M shape (estimator accuracy on
                both); TRL's SFTTrainer with its defaults and with gradient checkpointing off,
                same rows and LoRA config; ours LoRA with Liger's kernels when liger-kernel is
                importable on CUDA
    tokens/s    real (non-padding) tokens per second over the timed steps, after warm-up steps
                (compiling happens in the memory check and the warm-up)
    % of peak   tokens/s x FLOPs per token (4 x parameters for LoRA and QLoRA, 6 x for full,
                as issue 13 counts) over a bf16 8192^3 matmul measured in the same run
    memory      ours: the pre-run memory check's device peak (max_memory_allocated + context)
                vs the studio's estimate for the same batch; TRL: max_memory_allocated
    packing     loss of one packed micro-batch vs the same examples padded (should be ~0)

It writes JSON (--out) and prints one table and the issue's targets. ``--smoke`` runs the same
code on CPU with a tiny model in well under two minutes (tests/test_gpu_suite.py runs it).

On a device machine (its image has no trl/datasets/bitsandbytes/liger; see the device README),
from the repo root, after ``bash benchmarks/gpu_prepare.sh`` here:

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \\
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:. &&
    PYTHONUNBUFFERED=1 python3 benchmarks/gpu_suite.py --tokenizer .gpu/tokenizer --out $OUT/gpu_suite.json
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.train_throughput import trl_defaults, variable_rows_csv  # noqa: E402

CONFIGS = ROOT / "benchmarks" / "configs"
SHAPES = {"135m": "smollm2-135m.json", "1b": "llama-1b.json"}
GIB = 1024**3


def matmul_peak(device: str, smoke: bool) -> float:
    """FLOP/s of one large square matmul in the training dtype (bf16 on CUDA), best of a few."""
    n, dtype = (256, torch.float32) if smoke else (8192, torch.bfloat16)
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    best = 0.0
    for _ in range(3):
        sync(device)
        start = time.perf_counter()
        for _ in range(10):
            a @ b
        sync(device)
        best = max(best, 2 * n**3 * 10 / (time.perf_counter() - start))
    return best


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def release(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def model_folder(shape: str, tokenizer, out: Path, smoke: bool) -> Path:
    """A randomly initialised model of a shape, saved with the tokenizer (bf16, as checkpoints are)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(CONFIGS / SHAPES[shape])
    if smoke:  # the same family, tiny
        config.update(
            {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}
            | {"num_key_value_heads": 2, "head_dim": 16}
        )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32 if smoke else torch.bfloat16)
    folder = out / shape
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def ours(folder: Path, data: Path, method: str, args, **training) -> dict:
    """Our trainer: the memory check (device peak vs estimate), warm-up steps, then timed steps."""
    from studio.config import RunConfig
    from studio.runs.registry import RunRegistry
    from studio.training import Trainer
    from studio.training.memory_check import check_memory

    cfg = RunConfig.from_dict(
        {
            "model": str(folder),
            "method": method,
            "data": {"path": str(data), "max_length": args.max_length, "eval_fraction": 0},
            "training": {
                "max_steps": args.warmup + args.steps,
                "batch_size": args.batch_size,
                "learning_rate": 2e-5 if method == "full" else 2e-4,
                "memory_check": False,
                "save_steps": 10**6,
                **training,
            },
        }
    ).check()
    trainer = Trainer(cfg, RunRegistry(Path(tempfile.mkdtemp())).create(cfg))
    trainer.setup()
    check = check_memory(trainer)
    records = []
    trainer.on_metrics = records.append
    trainer.total_steps = args.warmup
    warm_start = time.perf_counter()
    trainer.train()
    sync(trainer.device)
    warm_s = time.perf_counter() - warm_start
    trainer.total_steps = args.warmup + args.steps
    start = time.perf_counter()
    trainer.train()
    sync(trainer.device)
    seconds = time.perf_counter() - start
    timed = [r for r in records if getattr(r, "step", 0) > args.warmup and hasattr(r, "tokens")]
    out = {
        "tokens": sum(r.tokens for r in timed),
        "seconds": seconds,
        "steps": len(timed),
        "warmup_s": warm_s + check.seconds,
        "losses": [r.loss for r in timed],
        "peak_bytes": check.measured_bytes,
        "estimate_bytes": check.estimate_bytes,
        "batch": trainer.batching.describe(),
        "optimizer": trainer.optimizer_name,
        "precision": trainer.precision,
        "compiled_layers": trainer.compiled_layers,
    }
    del trainer
    return out


def packed_vs_padded(folder: Path, data: Path, args) -> dict:
    """One packed micro-batch's loss against the same examples padded, one per row."""
    from studio.config import RunConfig
    from studio.runs.registry import RunRegistry
    from studio.training import Trainer, batching

    cfg = RunConfig.from_dict(
        {
            "model": str(folder),
            "data": {"path": str(data), "max_length": args.max_length, "eval_fraction": 0},
            "training": {"batch_size": args.batch_size, "packing": "on", "memory_check": False},
        }
    ).check()
    trainer = Trainer(cfg, RunRegistry(Path(tempfile.mkdtemp())).create(cfg))
    trainer.setup()
    micro_batch = max(batching.epoch(trainer.lengths, trainer.batching, None), key=len)
    examples = [trainer.train_examples[j] for row in micro_batch for j in row]
    with torch.no_grad(), trainer.autocast():
        packed = trainer.loss_fn(**trainer.tensors(micro_batch)).item()
        padded = sum(
            trainer.loss_fn(**trainer.collate_rows(examples[k : k + args.batch_size])).item()
            * sum(e.targets for e in examples[k : k + args.batch_size])
            for k in range(0, len(examples), args.batch_size)
        ) / sum(e.targets for e in examples)
    del trainer
    return {"examples": len(examples), "packed_loss": packed, "padded_loss": padded, "rel": packed / padded - 1}


def liger_applied() -> bool:
    """Patch transformers' Llama modules with Liger's RMSNorm, RoPE and SwiGLU (not its
    cross-entropy: our loss runs the output layer at labeled positions only)."""
    from liger_kernel.transformers import apply_liger_kernel_to_llama

    apply_liger_kernel_to_llama(
        rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False
    )
    return True


def plan(args, device: str) -> list[tuple[str, str, dict]]:
    """(shape, run name, what to run) in order; the 1.07B shape carries the speed targets."""
    big = "1b"
    runs = [
        (big, "ours LoRA", {"method": "lora", "packing": "on"}),
        (big, "ours LoRA padded", {"method": "lora", "packing": "off"}),
        (big, "ours LoRA compiled", {"method": "lora", "packing": "on", "compile": True}),
        (big, "ours QLoRA", {"method": "qlora", "packing": "on"}),
        (big, "ours full", {"method": "full", "packing": "on"}),
        (big, "ours full compiled", {"method": "full", "packing": "on", "compile": True}),
        (big, "TRL defaults", {"trl": None}),
        (big, "TRL checkpointing off", {"trl": False}),
        ("135m", "ours LoRA", {"method": "lora", "packing": "on"}),
        ("135m", "ours QLoRA", {"method": "qlora", "packing": "on"}),
        ("135m", "ours full", {"method": "full", "packing": "on"}),
    ]
    if device == "cuda":
        try:
            import liger_kernel  # noqa: F401

            runs.append((big, "ours LoRA + Liger", {"method": "lora", "packing": "on", "liger": True}))
        except ImportError:
            pass
    if args.skip_trl:
        runs = [r for r in runs if "trl" not in r[2]]
    if args.shapes:
        runs = [r for r in runs if r[0] in args.shapes]
    return runs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny models on CPU: the same code in about a minute")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gpu_suite.json")
    ap.add_argument("--tokenizer", default="default", help="a tokenizer folder (default: the bundled model's)")
    ap.add_argument("--shapes", nargs="*", choices=sorted(SHAPES), help="only these shapes")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per run (20; smoke 2)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (3; smoke 1)")
    ap.add_argument("--skip-trl", action="store_true")
    args = ap.parse_args(argv)
    args.steps = args.steps or (2 if args.smoke else 20)
    args.warmup = args.warmup or (1 if args.smoke else 3)
    args.max_length, args.batch_size = (256, 4) if args.smoke else (1024, 8)

    from studio import models
    from studio.planning import hardware

    device = hardware.detect().device
    if device != "cuda" and not args.smoke:
        print("No CUDA GPU here: run with --smoke for the CPU check of the same code.", file=sys.stderr)
        return 2
    started = time.time()
    tmp = Path(tempfile.mkdtemp())
    tokenizer = models.load_tokenizer(args.tokenizer)
    # Smoke: rows of about 20-120 tokens, so that several share a 256-token row.
    rows = {"rows": 48, "answer_words": 30} if args.smoke else {"rows": 480}
    data = variable_rows_csv(tmp / "rows.csv", **rows)
    peak = matmul_peak(device, args.smoke)
    result = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "versions": {name: _version(name) for name in ("torch", "transformers", "peft", "trl", "bitsandbytes")},
        "matmul_peak_flops": peak,
        "smoke": args.smoke,
        "runs": [],
    }
    folders, shapes = {}, {}
    for shape, name, what in plan(args, device):
        if shape not in folders:
            folders[shape] = model_folder(shape, tokenizer, tmp, args.smoke)
            shapes[shape] = _shape(folders[shape])
        row = {"shape": shape, "run": name, **{k: v for k, v in what.items() if k != "trl"}}
        print(f"[{time.time() - started:5.0f} s] {shape} {name} ...", flush=True)
        release(device)
        try:
            if "trl" in what:
                r = trl_defaults(
                    data,
                    args.warmup + args.steps + 1,
                    args.max_length,
                    device == "cuda",
                    str(folders[shape]),
                    what["trl"],
                )
                row.update(tokens=r["tokens"], seconds=r["seconds"], peak_bytes=r["peak_bytes"], steps=r["steps"])
                row["gradient_checkpointing"] = r["gradient_checkpointing"]
                row["flops_per_token"] = 4 * shapes[shape].total_params
            else:
                training = {k: v for k, v in what.items() if k not in ("method", "liger")}
                if what.get("liger"):
                    liger_applied()
                row.update(ours(folders[shape], data, what["method"], args, **training))
                row["flops_per_token"] = (6 if what["method"] == "full" else 4) * shapes[shape].total_params
                row["quantized_params"] = sum(lin.d_in * lin.d_out for lin in shapes[shape].lora_targets("all-linear"))
            row["tokens_per_s"] = row["tokens"] / row["seconds"]
            row["peak_share"] = row["tokens_per_s"] * row["flops_per_token"] / peak
        except Exception as exc:  # noqa: BLE001 - one failed run is reported, the rest still run
            row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            traceback.print_exc()
        result["runs"].append(row)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))  # what finished survives a timeout
    release(device)
    first = "1b" if "1b" in folders else next(iter(folders))
    try:
        result["packing"] = packed_vs_padded(folders[first], data, args)
    except Exception as exc:  # noqa: BLE001
        result["packing"] = {"error": f"{type(exc).__name__}: {exc}"}
    result["targets"] = targets(result)
    result["seconds"] = time.time() - started
    args.out.write_text(json.dumps(result, indent=2))
    print_table(result)
    return 0 if not any("error" in r for r in result["runs"]) else 1


def _version(name: str) -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _shape(folder: Path):
    from transformers import AutoConfig

    from studio.planning.memory import shape_from_config

    return shape_from_config(AutoConfig.from_pretrained(folder))


def targets(result: dict) -> dict:
    """Issue 13's targets on the 1.07B shape, each with its measured value (None: not run)."""
    runs = {(r["shape"], r["run"]): r for r in result["runs"] if "error" not in r}

    def rate(name, shape="1b"):
        r = runs.get((shape, name))
        return r["tokens_per_s"] if r else None

    def ratio(a, b):
        return a / b if a and b else None

    lora, qlora, full = rate("ours LoRA"), rate("ours QLoRA"), rate("ours full")
    out = {
        "LoRA / TRL checkpointing off >= 3": ratio(lora, rate("TRL checkpointing off")),
        "LoRA % of bf16 peak >= 30%": runs[("1b", "ours LoRA")]["peak_share"] if lora else None,
        "LoRA / full >= 1.2": ratio(lora, full),
        "QLoRA / LoRA >= 0.7": ratio(qlora, lora),
    }
    lq, ll = runs.get(("1b", "ours QLoRA")), runs.get(("1b", "ours LoRA"))
    if lq and ll and not result["smoke"]:
        from studio.planning.memory import NF4_BYTES_PER_PARAM

        # The weight bytes the 4-bit base saves: the decoder's linear layers at 2 B each vs NF4.
        saved = (2 - NF4_BYTES_PER_PARAM) * ll["quantized_params"]
        out["QLoRA peak <= LoRA peak - 0.7 x saved weights (GiB: QLoRA, bound)"] = (
            lq["peak_bytes"] / GIB,
            (ll["peak_bytes"] - 0.7 * saved) / GIB,
        )
    out["estimate error per run"] = {
        f"{r['shape']} {r['run']}": r["estimate_bytes"] / r["peak_bytes"] - 1
        for r in result["runs"]
        if "estimate_bytes" in r and r.get("peak_bytes")
    }
    return out


def print_table(result: dict) -> None:
    what = "fp32 256^3" if result["smoke"] else "bf16 8192^3"
    print(f"\n{result['device']}: {what} matmul {result['matmul_peak_flops'] / 1e12:.2f} TFLOP/s; {result['versions']}")
    print(f"{'shape':<6}{'run':<24}{'batch':<44}{'tok/s':>9}{'% peak':>8}{'peak GiB':>10}{'est GiB':>9}{'est err':>8}")
    for r in result["runs"]:
        if "error" in r:
            print(f"{r['shape']:<6}{r['run']:<24}failed: {r['error']}")
            continue
        est, peak = r.get("estimate_bytes"), r.get("peak_bytes")
        memory = f"{peak / GIB:>10.2f}" if peak else f"{'-':>10}"
        memory += f"{est / GIB:>9.2f}{est / peak - 1:>+8.1%}" if est and peak else f"{'-':>9}{'-':>8}"
        print(
            f"{r['shape']:<6}{r['run']:<24}{r.get('batch', 'TRL: batch 8, padded'):<44}{r['tokens_per_s']:>9.0f}"
            f"{r['peak_share']:>8.1%}{memory}"
        )
    p = result.get("packing", {})
    if "rel" in p:
        print(
            f"packed vs padded loss ({p['examples']} examples): "
            f"{p['packed_loss']:.5f} vs {p['padded_loss']:.5f} ({p['rel']:+.2e})"
        )
    for name, value in result["targets"].items():
        if name != "estimate error per run":
            print(f"target {name}: {value if not isinstance(value, float) else round(value, 3)}")
    print(f"done in {result['seconds']:.0f} s")


if __name__ == "__main__":
    raise SystemExit(main())
