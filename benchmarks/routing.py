"""What an adapter costs a decode step, on any model shape: the serving engine's per-row routing
(studio/serving/routing.py) against the base, and PEFT's own forward for reference.

A decode step's cost is set by the bytes it reads (every weight, once) and, for small batches, by
per-operation latency. An adapter adds its own weights to the bytes (r x (in + out) per LoRA
layer) and two small matmuls per layer; a mixed batch reads every adapter it holds. So the share
of the base's bytes the adapters add bounds the ratio from above: the table prints that bound
(``1 / (1 + share)``) next to each measured ratio. Tiny models have the largest share (the default
135M model with r 16 on all linear layers: 3.6% per adapter); 1B-8B models have about 1%.

    .venv/bin/python benchmarks/routing.py [--shape default|135m|1b] [--rows 1,8] [--rank 16]
                                           [--steps 32] [--runs 3] [--dtype fp32|bf16]

``default`` is the default model's real weights; ``135m`` and ``1b`` are random-initialised shapes
from benchmarks/configs (the 1.07B Llama shape is what issue 26 asks a GPU to measure). Adapters
have random non-zero weights (as trained ones do; their values do not change the cost). On CUDA the
dtype defaults to bf16, elsewhere to fp32; bf16 runs under the autocast the engine uses for a bf16
run (base weights bf16, adapters fp32 as PEFT keeps them). ``--smoke`` runs the same code on a tiny model in
seconds (tests/test_routing_benchmark.py).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from studio.inference.playground import BASE_ADAPTER  # noqa: E402
from studio.planning import precision  # noqa: E402
from studio.serving.routing import Route  # noqa: E402

CONFIGS = ROOT / "benchmarks" / "configs"
SHAPES = {"135m": "smollm2-135m.json", "1b": "llama-1b.json"}
PROMPT_TOKENS = 32
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}


def load_model(shape: str, dtype: torch.dtype, device: str, smoke: bool):
    from transformers import AutoConfig, AutoModelForCausalLM

    if shape == "default" and not smoke:
        from studio import models

        return AutoModelForCausalLM.from_pretrained(models.resolve("default"), dtype=dtype).to(device).eval()
    config = AutoConfig.from_pretrained(CONFIGS / SHAPES.get(shape, SHAPES["135m"]))
    if smoke:
        config.update(TINY | {"num_key_value_heads": 2, "head_dim": 16})
    torch.manual_seed(0)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()


def with_adapters(model, rank: int, count: int):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear", init_lora_weights=False)
    torch.manual_seed(1)
    peft_model = get_peft_model(model, config, adapter_name="a0")
    for i in range(1, count):
        peft_model.add_adapter(f"a{i}", config)
    return peft_model.eval()


def byte_shares(peft_model) -> tuple[int, float]:
    """(bytes a step reads from the base's weights, one adapter's bytes as a share of them)."""
    seen, base, adapter = set(), 0, 0
    for name, p in peft_model.named_parameters():
        if "lora_" in name:
            adapter += p.numel() * p.element_size() if ".a0." in name else 0
        elif p.data_ptr() not in seen:  # tied embeddings count once (the head reads them every step)
            seen.add(p.data_ptr())
            base += p.numel() * p.element_size()
    return base, adapter / base


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def step_ms(peft_model, rows: int, args, **forward_kwargs) -> float:
    """Median milliseconds of one decode step for ``rows`` rows after a 32-token prefill, under the
    autocast the serving engine uses for a run of that precision (bf16: autocast; fp32: none)."""
    from transformers import DynamicCache

    device = args.device
    torch.manual_seed(2)
    ids = torch.randint(3, 1000, (rows, PROMPT_TOKENS), device=device)
    with torch.inference_mode(), precision.autocast(device, args.dtype_name):
        cache = DynamicCache()
        token = peft_model(input_ids=ids, past_key_values=cache, use_cache=True, **forward_kwargs)
        token = token.logits[:, -1:].argmax(-1)
        times = []
        for _ in range(args.steps + 3):
            sync(device)
            start = time.perf_counter()
            out = peft_model(input_ids=token, past_key_values=cache, use_cache=True, **forward_kwargs)
            token = out.logits[:, -1:].argmax(-1)
            sync(device)
            times.append(time.perf_counter() - start)
    return statistics.median(times[3:]) * 1000  # the first steps warm caches and allocators


def measure(peft_model, rows: int, adapters: int, args) -> dict[str, float]:
    """Median over ``args.runs`` of each case's step time, the cases interleaved within a run so
    that a noisy stretch of the machine falls on all of them."""
    names = [f"a{i}" for i in range(adapters)]
    mixed = [([BASE_ADAPTER] + names)[i % (adapters + 1)] for i in range(rows)]
    route_cases = {"base": [BASE_ADAPTER] * rows, "one adapter": [names[0]] * rows}
    if rows > adapters:  # room for a base row and a row of every adapter
        route_cases[f"mixed (base + {adapters})"] = mixed
    results: dict[str, list[float]] = {}
    for _ in range(args.runs):
        route = Route(peft_model)
        try:
            for label, row_names in route_cases.items():
                route.set_rows(row_names)
                results.setdefault(label, []).append(step_ms(peft_model, rows, args))
        finally:
            route.close()
        peft_model.set_adapter(names[0])  # PEFT's own forward, one adapter: the reference
        results.setdefault("PEFT, one adapter", []).append(step_ms(peft_model, rows, args))
        if rows > adapters:  # and PEFT's own mixed batch: each adapter's rows apart in every layer
            mixed_ms = step_ms(peft_model, rows, args, adapter_names=mixed)
            results.setdefault("PEFT, mixed", []).append(mixed_ms)
    return {label: statistics.median(values) for label, values in results.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="default", choices=["default", *SHAPES])
    ap.add_argument("--rows", default="1,8", help="batch sizes, comma-separated")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--adapters", type=int, default=2, help="adapters in the mixed batch")
    ap.add_argument("--steps", type=int, default=32, help="decode steps timed per case")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default=None)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--smoke", action="store_true", help="a tiny model, a few steps: the code path only")
    args = ap.parse_args()
    if args.smoke:
        args.steps, args.runs = 3, 1
    args.dtype_name = dtype_name = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    dtype = precision.compute_dtype(dtype_name)

    started = time.time()
    model = with_adapters(load_model(args.shape, dtype, args.device, args.smoke), args.rank, args.adapters)
    base_bytes, share = byte_shares(model)
    print(
        f"{args.shape}{' (smoke)' if args.smoke else ''} on {args.device}, {dtype_name}, {torch.get_num_threads()} "
        f"threads; base weights {base_bytes / 2**20:.0f} MiB, one r{args.rank} adapter {100 * share:.1f}% of them "
        f"(built in {time.time() - started:.0f} s)"
    )
    print(f"\n{'rows':>4}  {'case':<22}{'ms/step':>10}{'vs base':>9}{'bytes bound':>13}")
    for rows in (int(r) for r in args.rows.split(",")):
        step = measure(model, rows, args.adapters, args)
        for label, ms in step.items():
            adapters_read = 0 if label == "base" else args.adapters if "mixed" in label else 1
            bound = 1 / (1 + adapters_read * share)
            print(f"{rows:>4}  {label:<22}{ms:>10.2f}{step['base'] / ms:>9.3f}{bound:>13.3f}")
    print(
        "\nvs base: the base's step time over the case's (1.0 = no cost). bytes bound: the ratio if"
        "\nthe adapters' weights were read as fast as the base's and nothing else cost time."
    )


if __name__ == "__main__":
    main()
