"""lm-evaluation-harness, the real one (pinned in requirements-dev.txt), offline against a
`finetune-studio serve` process: a multiple-choice task (loglikelihood) through its
`local-completions` model and a generate_until task through `local-chat-completions`, each for
the base and for an adapter by its model id. lm-eval's per-choice loglikelihoods must equal plain
transformers / PEFT on the same tokens; the run and the server are pinned to fp32, so the
tolerance is fp32's (only the batch's left padding and summation order differ)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import free_port, tiny_run_config, wait_until, write_csv

pytestmark = pytest.mark.process

MC_ROWS = [  # MMLU-shaped: a question, choices scored by loglikelihood, the index of the answer
    {"question": "the capital of france is", "choices": ["paris", "blue", "seven", "green grass"], "answer": 0},
    {"question": "what colour is the sky", "choices": ["two", "blue", "hello world", "paris"], "answer": 1},
    {"question": "what is one plus one", "choices": ["three", "sky", "two", "model data"], "answer": 2},
]
GEN_ROWS = [{"question": f"what is {a} plus {b}", "answer": f"answer {a + b}"} for a, b in ((1, 2), (2, 3))]

MC_TASK = """task: fs_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {cache}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: choices
doc_to_target: answer
metric_list:
  - metric: acc
"""
GEN_TASK = """task: fs_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {cache}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match
"""


@pytest.fixture(scope="module")
def fp32_server(tiny_model_dir, tmp_path_factory):
    """`finetune-studio serve` on the tiny model with one fp32 LoRA run (trained here: the shared
    run's precision is whatever `auto` means on this machine), the base pinned to fp32 too."""
    from studio.runs.registry import RunRegistry
    from studio.training import run_training

    root = tmp_path_factory.mktemp("lm-eval")
    rows = [[f"what is {a} plus {b}", f"answer {a + b}"] for a in range(1, 7) for b in range(1, 6)]
    cfg = tiny_run_config(tiny_model_dir, write_csv(root / "train.csv", ["instruction", "output"], rows),
                          max_steps=8, memory_check=False, precision="fp32")  # fmt: skip
    run = RunRegistry(root / "runs").create(cfg)
    assert run_training(cfg, run).state == "finished"
    port, log = free_port(), root / "serve.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "FINETUNE_STUDIO_AUTO_PRECISION": "fp32"}
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "studio.cli", "serve", "--port", str(port), "--model", str(tiny_model_dir),
             "--runs-dir", str(root / "runs")],
            stdout=out, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: _answers(url) or proc.poll() is not None, 180, "serve to answer")
        assert proc.poll() is None, log.read_text()
        yield url, run, root
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _answers(url: str) -> bool:
    import httpx

    try:
        return httpx.get(url + "/tokenizer_info", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def _tasks(root):
    from lm_eval.tasks import TaskManager

    tasks = root / "tasks"
    tasks.mkdir(exist_ok=True)
    for name, template, rows in (("fs_mc", MC_TASK, MC_ROWS), ("fs_gen", GEN_TASK, GEN_ROWS)):
        data = tasks / f"{name}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        (tasks / f"{name}.yaml").write_text(template.format(data=data, cache=root / "datasets"), encoding="utf-8")
    return TaskManager(include_path=str(tasks))


def _reference(model_dir, weights, pairs):
    """Plain transformers (PEFT for the adapter), fp32, one pair at a time: lm-eval's own split of
    context and continuation into tokens (TemplateLM._encode_pair), summed continuation logprobs."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if weights is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(weights))
    model.eval()
    out = []
    for context, continuation in pairs:
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
        ids = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
        out.append(sum(float(logp[i - 1, ids[i]]) for i in range(len(context_ids), len(ids))))
    return out


def test_lm_eval_scores_the_base_and_an_adapter_through_the_api(fp32_server, tiny_model_dir):
    import lm_eval

    url, run, root = fp32_server
    manager = _tasks(root)
    scores = {}
    for model, weights in ((str(tiny_model_dir), None), (run.id, run.weights_dir())):
        mc = lm_eval.simple_evaluate(
            model="local-completions",
            model_args={"model": model, "base_url": f"{url}/v1/completions", "batch_size": 4, "max_retries": 1},
            tasks=["fs_mc"],
            task_manager=manager,
            log_samples=True,
        )
        samples = mc["samples"]["fs_mc"]
        assert len(samples) == len(MC_ROWS) and 0 <= mc["results"]["fs_mc"]["acc,none"] <= 1
        pairs = [tuple(args) for s in samples for args in s["arguments"]]
        served = [float(r[0]) for s in samples for r in s["filtered_resps"]]
        assert len(served) == sum(len(r["choices"]) for r in MC_ROWS)
        assert served == pytest.approx(_reference(tiny_model_dir, weights, pairs), abs=1e-4), model
        scores[model] = served

        gen = lm_eval.simple_evaluate(
            model="local-chat-completions",
            model_args={"model": model, "base_url": f"{url}/v1/chat/completions", "max_retries": 1},
            tasks=["fs_gen"],
            task_manager=manager,
            apply_chat_template=True,
            log_samples=True,
        )
        answers = [s["filtered_resps"][0] for s in gen["samples"]["fs_gen"]]
        assert len(answers) == len(GEN_ROWS) and all(isinstance(a, str) for a in answers), answers
        assert "exact_match,none" in gen["results"]["fs_gen"]
    base, adapted = scores.values()  # the adapter really answered: its numbers are not the base's
    assert max(abs(a - b) for a, b in zip(base, adapted)) > 1e-2
