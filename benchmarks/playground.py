"""Playground speed on the default model: adapter swaps, adapter loads, generation, memory.

Three LoRA adapters (r 16, alpha 32, all linear layers: the studio's defaults) with random
weights are written as finished runs, then the playground is timed:

    switch          activate() between two loaded adapters (median of 20)   target <= 50 ms
    load            activate() of an adapter not loaded yet (median of 3)   target <= 1 s
    tokens/s        greedy decoding of 64 tokens, base pane vs adapted pane  target >= 0.9x
    memory / adapter   process RSS growth when one more adapter is loaded, vs its file size

    .venv/bin/python benchmarks/playground.py [--tokens 64]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402
import torch  # noqa: E402

from studio import models  # noqa: E402
from studio.config import RunConfig  # noqa: E402
from studio.inference.playground import Playground, SamplingSettings, _Side  # noqa: E402
from studio.runs import fingerprint  # noqa: E402
from studio.runs.registry import RunRegistry  # noqa: E402

PROMPT = [{"role": "user", "content": "Write a short paragraph about why the sky is blue."}]


def make_runs(root: Path, n: int) -> list:
    """n finished LoRA runs on the default model, each with random (non-zero) adapter weights."""
    from peft import LoraConfig, get_peft_model

    registry = RunRegistry(root / "runs")
    tokenizer = models.load_tokenizer(models.DEFAULT_MODEL)
    base = models.load_model(models.DEFAULT_MODEL, "lora")
    fp = fingerprint.fingerprint(base.config, tokenizer, models.DEFAULT_MODEL)
    cfg = RunConfig()
    lora = LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        target_modules=cfg.lora.target_modules(),
        task_type="CAUSAL_LM",
        init_lora_weights=False,
    )
    runs = []
    for i in range(n):
        torch.manual_seed(i)
        peft_model = get_peft_model(base, lora)
        run = registry.create(cfg)
        number, folder = run.next_version_dir()
        peft_model.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)
        fingerprint.write(run.path, fp)
        run.commit_version(number, "trained")
        run.set_status("finished", version=number)
        base = peft_model.unload()  # take the LoRA layers out again for the next adapter
        runs.append(run)
    return runs


def tokens_per_s(pg: Playground, adapted: bool, n: int) -> float:
    ids = pg.encode(PROMPT)
    settings = SamplingSettings(max_new_tokens=n)
    side = (
        _Side(pg._use(None)[0], lambda: torch.no_grad(), ids, settings)
        if adapted
        else _Side(pg.model, pg._base_context, ids, settings)
    )
    start = time.perf_counter()
    for _ in range(n):
        side.advance(eos=set())  # no early stop: both sides decode exactly n tokens
    return n / (time.perf_counter() - start)


def rss() -> int:
    return psutil.Process().memory_info().rss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    with tempfile.TemporaryDirectory() as tmp:
        a, b, c = make_runs(Path(tmp), 3)
        pg = Playground()
        t0 = time.perf_counter()
        pg.activate(a)
        first = time.perf_counter() - t0  # base model + first adapter

        loads = []
        for run in (b, c):
            before = rss()
            t0 = time.perf_counter()
            pg.activate(run)
            loads.append(time.perf_counter() - t0)
            grew = rss() - before
        file_bytes = sum(f.stat().st_size for f in c.weights_dir().glob("*.safetensors"))
        # One more load after evicting: the steady-state cost of loading a new adapter.
        pg.unload(c.id)
        t0 = time.perf_counter()
        pg.activate(c)
        loads.append(time.perf_counter() - t0)

        switches = []
        for i in range(20):
            t0 = time.perf_counter()
            pg.activate((a, b)[i % 2])
            switches.append(time.perf_counter() - t0)

        pg.activate(a)
        tokens_per_s(pg, True, 8)  # warm-up
        rounds = [(tokens_per_s(pg, False, args.tokens), tokens_per_s(pg, True, args.tokens)) for _ in range(3)]
        base_tps = statistics.median(r[0] for r in rounds)
        adapted_tps = statistics.median(r[1] for r in rounds)
        base_loads = pg.base_loads

    print(f"default model, 3 LoRA adapters (r 16, all linear), {torch.get_num_threads()} threads\n")
    print(f"{'measure':<34}{'result':>14}{'target':>12}")
    print(f"{'first activate (base + adapter)':<34}{first * 1000:>11.0f} ms{'':>12}")
    print(f"{'load a new adapter (median)':<34}{statistics.median(loads) * 1000:>11.0f} ms{'<= 1000 ms':>12}")
    print(f"{'switch loaded adapters (median)':<34}{statistics.median(switches) * 1000:>11.1f} ms{'<= 50 ms':>12}")
    print(f"{'base tokens/s':<34}{base_tps:>14.1f}")
    print(f"{'adapted tokens/s':<34}{adapted_tps:>14.1f}")
    print(f"{'adapted / base':<34}{adapted_tps / base_tps:>13.2f}x{'>= 0.9x':>12}")
    print(f"{'RSS growth, one more adapter':<34}{grew / 2**20:>11.1f} MiB")
    print(f"{'adapter file size':<34}{file_bytes / 2**20:>11.1f} MiB")
    print(f"{'base model loads':<34}{base_loads:>14}")


if __name__ == "__main__":
    main()
