"""GGUF export of the default model: file sizes, export time and the parity numbers per type, and
(optionally) the same prompts answered by llama.cpp itself.

Trains a short LoRA run on the bundled sample (enough steps that the adapter has learned the
ANSWER/WHY format, so the answers mean something), exports it as GGUF for each type, and prints one
row per type from the zip's parity.json.

With ``--llama-cpp-python PY`` (a Python that has ``llama_cpp``, e.g. a separate venv with
``pip install llama-cpp-python``; it is not a dependency of the studio), each GGUF is also loaded
by llama.cpp: the prompts must tokenize to the same ids, and llama.cpp's greedy chat completion,
rendered from the chat template stored in the file, must stop at the end-of-turn token with the
same answer transformers gave.

    .venv/bin/python benchmarks/gguf_export.py [--types f16 q8_0 q4_0] [--steps 30] \
        [--llama-cpp-python /tmp/llama-venv/bin/python]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from studio.config import RunConfig  # noqa: E402
from studio.export.gguf_export import export_gguf, read_parity  # noqa: E402
from studio.runs.registry import RunRegistry  # noqa: E402
from studio.training import run_training  # noqa: E402

SAMPLE = ROOT / "studio" / "templates" / "samples" / "instructions.csv"

LLAMA_CPP_CHECK = r"""
import json, sys
from llama_cpp import Llama
path, cases = sys.argv[1], json.loads(sys.stdin.read())
llm = Llama(model_path=path, n_ctx=512, n_threads=2, verbose=False)
out = []
for case in cases:
    ids = llm.tokenize(case["text"].encode(), add_bos=False, special=True)
    chat = llm.create_chat_completion(messages=case["messages"], temperature=0, top_k=1, max_tokens=case["max_tokens"])
    choice = chat["choices"][0]
    out.append({"ids": ids, "answer": choice["message"]["content"], "finish": choice["finish_reason"]})
print(json.dumps({"pre": llm.metadata.get("tokenizer.ggml.pre"), "results": out}))
"""


def train(root: Path, steps: int):
    cfg = RunConfig.from_dict(
        {
            "model": "default",
            "method": "lora",
            "data": {"path": str(SAMPLE), "max_length": 256, "eval_fraction": 0.1},
            "training": {"max_steps": steps, "memory_check": False, "learning_rate": 1e-3},
        }
    ).check()
    run = RunRegistry(root).create(cfg)
    status = run_training(cfg, run)
    assert status.state == "finished", status.message
    return run


def llama_cpp_check(python: str, gguf: Path, parity: dict) -> str:
    """Run the parity prompts through llama.cpp; a short verdict for the table."""
    from transformers import AutoTokenizer

    from studio import models

    tokenizer = AutoTokenizer.from_pretrained(models.resolve("default"))
    cases = []
    for p in parity["prompts"]:
        user = p["prompt"].split("<|im_start|>user\n", 1)[1].split("<|im_end|>", 1)[0]
        cases.append(
            {
                "text": p["prompt"],
                "messages": [{"role": "user", "content": user}],
                "max_tokens": 24,
                "hf_ids": tokenizer(p["prompt"], add_special_tokens=False)["input_ids"],
                "hf_answer": p["gguf_answer"],
            }
        )
    result = subprocess.run(
        [python, "-c", LLAMA_CPP_CHECK, str(gguf)],
        input=json.dumps(cases),
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    got = json.loads(result.stdout.strip().splitlines()[-1])
    same_ids = sum(c["hf_ids"] == r["ids"] for c, r in zip(cases, got["results"]))
    same_answer = sum(c["hf_answer"].strip() == r["answer"].strip() for c, r in zip(cases, got["results"]))
    stopped = sum(r["finish"] == "stop" for r in got["results"])
    for c, r in zip(cases, got["results"]):
        print(f"    llama.cpp {r['answer']!r} ({r['finish']}) | transformers {c['hf_answer']!r}")
    n = len(cases)
    return f"pre {got['pre']}; ids {same_ids}/{n}; answers {same_answer}/{n}; stopped {stopped}/{n}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--types", nargs="+", default=["f16", "q8_0", "q4_0"])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--llama-cpp-python", help="a Python with llama_cpp installed, to run the GGUF in llama.cpp")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        started = time.monotonic()
        run = train(Path(tmp) / "runs", args.steps)
        print(f"trained {args.steps} LoRA steps on the default model in {time.monotonic() - started:.0f} s")
        rows = []
        for quant in args.types:
            started = time.monotonic()
            path = export_gguf(run, quant)
            total = time.monotonic() - started
            parity = read_parity(path)
            verdict = ""
            if args.llama_cpp_python:
                with zipfile.ZipFile(path) as zf:
                    name = next(n for n in zf.namelist() if n.endswith(".gguf"))
                    zf.extract(name, tmp)
                verdict = llama_cpp_check(args.llama_cpp_python, Path(tmp) / name, parity)
            rows.append(
                (
                    quant,
                    f"{parity['bytes'] / 2**20:.0f}",
                    f"{total:.0f} ({parity['convert_s']:.0f} + {parity['parity_s']:.0f})",
                    f"{parity['greedy_same']}/{len(parity['prompts'])}",
                    f"{parity['top1_agreement']:.1%}",
                    f"{parity['mean_kl']:.2g}",
                    f"{parity['max_logit_diff']:.3g}",
                    f"{parity['layout_diff']:.1e}",
                    verdict,
                )
            )
    header = (
        "type",
        "GGUF MiB",
        "export s (merge+convert + check)",
        "greedy same",
        "top-1",
        "mean KL",
        "max |dlogit|",
        "layout",
        "llama.cpp",
    )
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
