"""The OpenAI-compatible endpoint under load: N concurrent clients over the base and K adapters on
the default model, through the official `openai` client against a real server in this process.

Trains K short LoRA runs on the bundled sample (a few steps each: the weights matter, not their
quality), serves them, then measures:

- one request at a time: decoding tokens/s for the base and for an unmerged adapter (LoRA's
  extra matmuls per layer), and their ratio;
- N clients at once, each sending R requests round robin over base + adapters: requests/s,
  generated tokens/s, p50/p95 latency, and how many models the batches mixed;
- the engine alone (no HTTP): tokens/s of one batch of 8 rows, base only, one adapter, mixed
  through our per-row routing, and mixed through PEFT's own ``adapter_names``.

    .venv/bin/python benchmarks/serve.py [--adapters 2] [--clients 8] [--requests 3] [--max-tokens 48]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import logging
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from studio.config import RunConfig  # noqa: E402
from studio.runs.registry import RunRegistry  # noqa: E402
from studio.training import run_training  # noqa: E402

SAMPLE = ROOT / "studio" / "templates" / "samples" / "instructions.csv"
PROMPTS = [
    "Write one sentence about the sea.",
    "Give me three colours.",
    "What is 12 plus 30?",
    "Name a famous scientist.",
    "Explain what a CPU does in one line.",
]


def train_adapters(root: Path, k: int) -> list[str]:
    registry = RunRegistry(root)
    ids = []
    for seed in range(k):
        cfg = RunConfig.from_dict(
            {
                "model": "default",
                "method": "lora",
                "data": {"path": str(SAMPLE), "max_length": 256, "eval_fraction": 0},
                "training": {"max_steps": 3, "seed": seed, "memory_check": False, "learning_rate": 1e-3},
            }
        ).check()
        run = registry.create(cfg)
        status = run_training(cfg, run)
        assert status.state == "finished", status.message
        ids.append(run.id)
    return ids


def start_server(runs_dir: Path):
    import uvicorn

    from studio.service import Studio
    from studio.serving.server import create_app, serving_context

    ctx = serving_context(Studio(runs_dir))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(ctx), host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    deadline = time.time() + 60
    while not server.started:
        if time.time() > deadline:
            raise SystemExit("the server did not start in 60 s")
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}/v1", ctx


def ask(client, model: str, prompt: str, max_tokens: int) -> tuple[float, int]:
    start = time.perf_counter()
    reply = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=max_tokens,
        temperature=0,
        extra_body={"ignore_eos": True},  # every answer max_tokens long: speeds compare like for like
    )
    return time.perf_counter() - start, reply.usage.completion_tokens


def engine_table(ctx, adapters: list[str], max_tokens: int) -> None:
    """One batch of rows decoded by the engine directly: what batching and routing buy."""
    from studio.inference.playground import SamplingSettings
    from studio.serving import engine
    from studio.serving.engine import Request

    catalog = ctx.catalog
    tokenizer = catalog.tokenizer(catalog.get(catalog.base))
    messages = [{"role": "user", "content": PROMPTS[0]}]
    prompt = tokenizer(
        tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False), add_special_tokens=False
    )["input_ids"]
    mixed = [None, adapters[0], adapters[-1]] * 2 + [adapters[0], adapters[-1]]
    cases = [
        ("1 row, base", [None], True),
        ("1 row, adapter", [adapters[0]], True),
        ("8 rows, base", [None] * 8, True),
        ("8 rows, one adapter", [adapters[0]] * 8, True),
        ("8 rows, mixed (our routing)", mixed, True),
        ("8 rows, mixed (PEFT adapter_names)", mixed, False),
    ]
    print(f"\n{'engine alone, one batch':<38}{'tokens/s':>10}")
    for label, refs, route in cases:
        settings = SamplingSettings(max_new_tokens=max_tokens, temperature=0)
        rows = [Request(f"b{i}", ref, prompt, settings, ignore_eos=True) for i, ref in enumerate(refs)]
        load, _ = catalog.resolve(refs[0])
        saved = engine.can_route
        engine.can_route = saved if route else (lambda model, names: False)
        try:
            with ctx.engine.playground.serving(load) as pg:
                names = [catalog.resolve(ref)[1](pg) for ref in refs]
                start = time.perf_counter()
                engine._decode(pg, rows, names, load.precision)
                seconds = time.perf_counter() - start
        finally:
            engine.can_route = saved
        print(f"{label:<38}{sum(r.completion_tokens for r in rows) / seconds:>10.1f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--adapters", type=int, default=2)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=3, help="requests per client")
    ap.add_argument("--max-tokens", type=int, default=48)
    args = ap.parse_args()

    import openai

    root = Path(tempfile.mkdtemp())
    t0 = time.time()
    adapters = train_adapters(root, args.adapters)
    print(f"trained {len(adapters)} adapters in {time.time() - t0:.0f} s")
    url, ctx = start_server(root)
    client = openai.OpenAI(base_url=url, api_key="local", max_retries=0, timeout=600)
    base = ctx.catalog.base
    ask(client, base, "warm up", 4)

    print(f"\n{'one request at a time':<28}{'tokens/s':>10}{'latency s':>11}")
    single = {}
    for name, model in (("base", base), ("adapter (unmerged LoRA)", adapters[0])):
        times, tokens = zip(*(ask(client, model, p, args.max_tokens) for p in PROMPTS[:3]))
        single[name] = sum(tokens) / sum(times)
        print(f"{name:<28}{single[name]:>10.1f}{statistics.median(times):>11.2f}")
    print(f"adapter / base decoding speed: {single['adapter (unmerged LoRA)'] / single['base']:.2f}")

    models = [base, *adapters]
    jobs = [
        (models[(c + i) % len(models)], PROMPTS[(c + i) % len(PROMPTS)])
        for c in range(args.clients)
        for i in range(args.requests)
    ]
    batch_models: list[int] = []

    class Count(logging.Handler):
        def emit(self, record):
            text = record.getMessage()
            if "batch_models=" in text:
                batch_models.append(len(text.split("batch_models=")[1].split()[0].split(",")))

    logging.getLogger("studio.serving").addHandler(Count())
    logging.getLogger("studio.serving").setLevel(logging.INFO)
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(args.clients) as pool:
        results = list(pool.map(lambda j: ask(client, j[0], j[1], args.max_tokens), jobs))
    wall = time.perf_counter() - start
    latencies = sorted(r[0] for r in results)
    tokens = sum(r[1] for r in results)
    p95 = latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))]
    print(f"\n{args.clients} clients x {args.requests} requests over base + {len(adapters)} adapters")
    print(f"{'requests/s':<28}{len(jobs) / wall:>10.2f}")
    print(f"{'generated tokens/s':<28}{tokens / wall:>10.1f}   (one at a time: {single['base']:.1f})")
    print(f"{'latency p50 / p95 s':<28}{statistics.median(latencies):>10.2f} / {p95:.2f}")
    print(f"{'requests in a mixed batch':<28}{sum(n > 1 for n in batch_models):>10} of {len(batch_models)}")
    engine_table(ctx, adapters, args.max_tokens)


if __name__ == "__main__":
    main()
