"""The OpenAI-compatible endpoint under load: N concurrent clients over the base and K adapters on
the default model, through the official `openai` client against a real server in this process.

Trains K short LoRA runs on the bundled sample (a few steps each: the weights matter, not their
quality), serves them, then measures, ``--runs`` times (the table shows medians):

- the engine alone (no HTTP), one batch decoded start to end: tokens/s of 1 row and of 8 rows,
  base, one adapter, mixed through our per-row routing, and mixed through PEFT's own ``adapter_names``;
- one request at a time over HTTP: base and adapter;
- N clients at once, each sending R requests round robin over base + adapters: generated tokens/s,
  p50/p95 latency, requests that shared a batch with another model, the prefix cache's hit rate.

It ends with the ratios issue 26 sets targets for: adapter / base (1 row, 8 rows, >= 0.95), mixed /
base (8 rows, >= 0.9), the server under N clients / the engine's 8-row batch (>= 0.9), and p95
latency / the time an 8-row batch takes for the same answer (<= 1.2).

    .venv/bin/python benchmarks/serve.py [--adapters 2] [--clients 8] [--requests 3] [--max-tokens 48] [--runs 3]
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


def engine_table(ctx, adapters: list[str], max_tokens: int) -> dict[str, tuple[float, float]]:
    """One batch of rows submitted to the engine at once (no HTTP), decoded start to end on the
    engine's own thread: what batching and routing buy. Returns {case: (tokens/s, seconds)}."""
    from studio.inference.playground import SamplingSettings
    from studio.serving import batch as batching
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
    out, previous_batch = {}, None
    for label, refs, route in cases:
        settings = SamplingSettings(max_new_tokens=max_tokens, temperature=0)
        rows = [Request(f"b{i}", ref, prompt, settings, ignore_eos=True) for i, ref in enumerate(refs)]
        # Let the last case's batch end first: rows sent while it is still open would join it, and
        # a batch decides once per set of adapters whether to route (the PEFT case would be routed).
        time.sleep(0.2)
        saved = batching.can_route
        batching.can_route = saved if route else (lambda model, names: False)
        try:
            start = time.perf_counter()
            for r in rows:
                ctx.engine.submit(r)
            for r in rows:
                while (event := r.events.get(timeout=600))[0] not in ("done", "error"):
                    pass
                assert event[0] == "done", event
            seconds = time.perf_counter() - start
        finally:
            batching.can_route = saved
        assert len({r.batch_id for r in rows}) == 1, "the rows did not share one batch"
        assert rows[0].batch_id != previous_batch, f"{label}: the rows joined the previous case's batch"
        previous_batch = rows[0].batch_id
        out[label] = (sum(r.completion_tokens for r in rows) / seconds, seconds)
    return out


def http_load(client, models: list[str], args, batch_models: list[int]) -> dict:
    jobs = [
        (models[(c + i) % len(models)], PROMPTS[(c + i) % len(PROMPTS)])
        for c in range(args.clients)
        for i in range(args.requests)
    ]
    per_client = [jobs[c * args.requests : (c + 1) * args.requests] for c in range(args.clients)]
    del batch_models[:]
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(args.clients) as pool:  # each client waits for its answer
        done = pool.map(lambda mine: [ask(client, m, p, args.max_tokens) for m, p in mine], per_client)
        results = [r for mine in done for r in mine]
    wall = time.perf_counter() - start
    latencies = sorted(r[0] for r in results)
    return {
        "tokens/s": sum(r[1] for r in results) / wall,
        "p50": statistics.median(latencies),
        "p95": latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))],
        "mixed": sum(n > 1 for n in batch_models),
        "of": len(batch_models),
    }


def median(values):
    return statistics.median(values)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--adapters", type=int, default=2)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=3, help="requests per client")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--runs", type=int, default=1, help="repeat every measurement; the table shows medians")
    args = ap.parse_args()

    import openai

    root = Path(tempfile.mkdtemp())
    t0 = time.time()
    # Trained on a thread that then ends: with GNU OpenMP, while a second long-lived thread holds
    # its own OpenMP team, every parallel region in the process runs ~1.5x slower on CPU. All
    # decoding below runs on the engine's thread, as in `finetune-studio serve`.
    trained: list[str] = []
    trainer = threading.Thread(target=lambda: trained.extend(train_adapters(root, args.adapters)))
    trainer.start()
    trainer.join()
    adapters = trained
    print(f"trained {len(adapters)} adapters in {time.time() - t0:.0f} s")
    url, ctx = start_server(root)
    client = openai.OpenAI(base_url=url, api_key="local", max_retries=0, timeout=600)
    base = ctx.catalog.base
    models = [base, *adapters]
    for m in models:  # loads every adapter once
        ask(client, m, "warm up", 4)

    batch_models: list[int] = []

    class Count(logging.Handler):
        def emit(self, record):
            text = record.getMessage()
            if "batch_models=" in text:
                batch_models.append(len(text.split("batch_models=")[1].split()[0].split(",")))

    logging.getLogger("studio.serving").addHandler(Count())
    logging.getLogger("studio.serving").setLevel(logging.INFO)
    logging.getLogger("studio.serving").propagate = False  # the table, not a line per request
    for handler in list(logging.getLogger("studio.serving").handlers):
        if isinstance(handler, logging.StreamHandler):
            logging.getLogger("studio.serving").removeHandler(handler)

    engine_runs, single_runs, load_runs = [], [], []
    for _ in range(args.runs):
        engine_runs.append(engine_table(ctx, adapters, args.max_tokens))
        single = {}
        for name, model in (("base", base), ("adapter", adapters[0])):
            times, tokens = zip(*(ask(client, model, p, args.max_tokens) for p in PROMPTS[:3]))
            single[name] = sum(tokens) / sum(times)
        single_runs.append(single)
        load_runs.append(http_load(client, models, args, batch_models))

    print(f"\n{'engine alone, one batch':<38}{'tokens/s':>10}")
    engine = {label: median([run[label][0] for run in engine_runs]) for label in engine_runs[0]}
    for label, tps in engine.items():
        print(f"{label:<38}{tps:>10.1f}")
    batch_s = median([run["8 rows, mixed (our routing)"][1] for run in engine_runs])

    print(f"\n{'HTTP, one request at a time':<38}{'tokens/s':>10}")
    for name in ("base", "adapter"):
        print(f"{name:<38}{median([s[name] for s in single_runs]):>10.1f}")

    load = {key: median([run[key] for run in load_runs]) for key in load_runs[0]}
    print(f"\nHTTP, {args.clients} clients x {args.requests} requests over base + {len(adapters)} adapters")
    print(f"{'generated tokens/s':<38}{load['tokens/s']:>10.1f}")
    print(f"{'latency p50 / p95 s':<38}{load['p50']:>10.2f} / {load['p95']:.2f}")
    print(f"{'requests sharing a batch with another model':<38}{load['mixed']:>6.0f} of {load['of']:.0f}")
    prefix = {
        line.split()[0]: float(line.split()[1])
        for line in ctx.engine.prometheus().splitlines()
        if line.startswith("finetune_studio_prefix_cache_")
    }
    if prefix:
        print(
            f"{'prefix cache hit rate':<38}{prefix['finetune_studio_prefix_cache_hit_rate']:>10.2f}   "
            f"({prefix['finetune_studio_prefix_cache_reused_tokens_total']:.0f} prompt tokens reused, "
            f"{prefix['finetune_studio_prefix_cache_computed_tokens_total']:.0f} computed)"
        )

    ratios = [
        ("adapter / base, 1 row (engine)", engine["1 row, adapter"] / engine["1 row, base"], ">= 0.95"),
        ("adapter / base, 8 rows (engine)", engine["8 rows, one adapter"] / engine["8 rows, base"], ">= 0.95"),
        ("mixed / base, 8 rows (engine)", engine["8 rows, mixed (our routing)"] / engine["8 rows, base"], ">= 0.90"),
        (
            f"HTTP {args.clients} clients / engine 8-row mixed",
            load["tokens/s"] / engine["8 rows, mixed (our routing)"],
            ">= 0.90",
        ),
        (f"HTTP {args.clients} clients / engine 8-row base", load["tokens/s"] / engine["8 rows, base"], ""),
        ("p95 latency / 8-row mixed batch time", load["p95"] / batch_s, "<= 1.20"),
        (
            "HTTP adapter / base, one at a time",
            median([s["adapter"] / s["base"] for s in single_runs]),
            "",
        ),
    ]
    print(f"\n{'ratio (median of ' + str(args.runs) + ' runs)':<48}{'value':>7}  target")
    for label, value, target in ratios:
        print(f"{label:<48}{value:>7.2f}  {target}")
    ctx.engine.close()  # a thread that ran torch still alive at exit aborts the process


if __name__ == "__main__":
    main()
