"""Measure peak CUDA memory of two training steps for full / LoRA / QLoRA across model shapes,
sequence lengths and micro-batch sizes: the ground truth the memory estimator is checked against.

Weights are random (memory does not depend on their values), built from config.json files, so
nothing is downloaded. Each configuration runs in a fresh subprocess so allocator caches and
cuBLAS workspaces of one do not leak into the next.

    python benchmarks/cuda_memory.py --configs DIR [--out results.jsonl]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def one(model_dir: str, method: str, seq: int, batch: int, gc: bool) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model

    from studio import models

    free0, total = torch.cuda.mem_get_info()
    model = models.load_model(model_dir, method, "cuda", "bf16")
    model.train()  # from_pretrained returns eval mode, where gradient checkpointing is a no-op
    if gc:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    # QLoRA as the trainer runs it: the unquantized parts stay bf16 (no prepare_model_for_kbit_training).
    if method != "full":
        model = get_peft_model(
            model,
            LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM"),
        )
    if gc:
        model.enable_input_require_grads()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    after_load = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    vocab = model.config.vocab_size
    for _ in range(2):
        ids = torch.randint(0, vocab, (batch, seq), device="cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    free1, _ = torch.cuda.mem_get_info()
    return {
        "weights_and_state_mib": after_load / 2**20,
        "peak_allocated_mib": torch.cuda.max_memory_allocated() / 2**20,
        "peak_reserved_mib": torch.cuda.max_memory_reserved() / 2**20,
        "device_used_mib": (total - free1) / 2**20,
        "context_mib": (total - free0) / 2**20,
        "trainable": sum(p.numel() for p in params),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", required=True, help="folder of <name>.json model configs (+ optional tokenizer)")
    ap.add_argument("--out", default="cuda_memory.jsonl")
    ap.add_argument("--one", nargs=5, metavar=("MODEL_DIR", "METHOD", "SEQ", "BATCH", "GC"))
    ap.add_argument("--methods", default="full,lora,qlora")
    ap.add_argument("--grid", default="128x1x0,512x1x0,512x4x0,512x4x1", help="seq x batch x checkpointing, comma list")
    args = ap.parse_args()
    if args.one:
        d, method, seq, batch, gc = args.one
        print(json.dumps(one(d, method, int(seq), int(batch), gc == "1")))
        return
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    work = Path(tempfile.mkdtemp())
    rows = []
    for cfg_file in sorted(Path(args.configs).glob("*.json")):
        d = work / cfg_file.stem
        config = AutoConfig.from_pretrained(cfg_file)
        with torch.device("cuda"):
            AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(d)
        torch.cuda.empty_cache()  # the children measure the device: hold nothing here
        for method in args.methods.split(","):
            for seq, batch, gc in (tuple(map(int, g.split("x"))) for g in args.grid.split(",")):
                t = time.time()
                proc = subprocess.run(
                    [
                        sys.executable,
                        __file__,
                        "--configs",
                        args.configs,
                        "--one",
                        str(d),
                        method,
                        str(seq),
                        str(batch),
                        str(gc),
                    ],
                    capture_output=True,
                    text=True,
                )
                line = proc.stdout.strip().splitlines()[-1] if proc.returncode == 0 else None
                rec = {
                    "model": cfg_file.stem,
                    "method": method,
                    "seq": seq,
                    "batch": batch,
                    "gc": gc,
                    **(json.loads(line) if line else {"error": proc.stderr[-400:]}),
                    "seconds": round(time.time() - t, 1),
                }
                rows.append(rec)
                print(json.dumps(rec), flush=True)
                with open(args.out, "a") as f:  # as we go: a cut-off run keeps what it measured
                    f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
