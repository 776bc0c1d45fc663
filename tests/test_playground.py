"""The playground is correct by test: base pane == plain transformers, adapted pane == plain PEFT,
and swapping adapters never reloads the base."""

import pytest
import torch

from studio.config import RunConfig
from studio.playground import Playground, SamplingSettings
from studio.runs import RunRegistry
from studio.training import run_training

PROMPT = [{"role": "user", "content": "what is 3 plus 4"}]


@pytest.fixture(scope="module")
def two_runs(tiny_model_dir, tmp_path_factory):
    from tests.conftest import write_csv

    root = tmp_path_factory.mktemp("pg")
    reg = RunRegistry(root / "runs")
    runs = []
    for seed, word in ((1, "answer"), (2, "hello world")):  # two adapters taught different replies
        rows = [[f"what is {a} plus {b}", f"{word} {a + b}"] for a in range(1, 8) for b in range(1, 4)]
        data = write_csv(root / f"d{seed}.csv", ["instruction", "output"], rows)
        cfg = RunConfig.from_dict({"model": str(tiny_model_dir), "data": {"path": str(data), "max_length": 64},
                                   "training": {"max_steps": 8, "learning_rate": 1e-2, "seed": seed}})
        run = reg.create(cfg)
        assert run_training(cfg, run)["state"] == "finished"
        runs.append(run)
    return runs


def _hf_greedy(model, tokenizer, messages, n=20):
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                             do_sample=False, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_base_and_adapted_match_plain_transformers_and_peft(two_runs, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    a, _ = two_runs
    pg = Playground()
    pg.activate(a)
    settings = SamplingSettings(max_new_tokens=20)
    *_, (base_text, adapted_text) = pg.stream_pair(PROMPT, PROMPT, settings)

    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    assert base_text == _hf_greedy(plain, pg.tokenizer, PROMPT)
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), a.adapter_dir).eval()
    assert adapted_text == _hf_greedy(peft_model, pg.tokenizer, PROMPT)
    assert base_text != adapted_text  # otherwise the comparison proves nothing


def test_swapping_adapters_never_reloads_the_base(two_runs):
    a, b = two_runs
    pg = Playground()
    settings = SamplingSettings(max_new_tokens=12)
    outputs = []
    for run in (a, b, a):
        pg.activate(run)
        *_, (base_text, adapted_text) = pg.stream_pair(PROMPT, PROMPT, settings)
        outputs.append((base_text, adapted_text))
    assert pg.base_loads == 1
    assert outputs[0] == outputs[2]  # A -> B -> A gives A's output again
    assert outputs[0][0] == outputs[1][0]  # the base pane does not depend on the adapter
    assert outputs[0][1] != outputs[1][1]


def test_streams_token_by_token_with_the_same_seeded_sampling(two_runs):
    a, _ = two_runs
    pg = Playground()
    pg.activate(a)
    settings = SamplingSettings(max_new_tokens=10, temperature=0.9, top_p=0.9, repetition_penalty=1.1, seed=5)
    steps = list(pg.stream_pair(PROMPT, PROMPT, settings))
    assert len(steps) >= 2 and all(isinstance(t, str) for pair in steps for t in pair)
    again = list(pg.stream_pair(PROMPT, PROMPT, settings))
    assert steps[-1] == again[-1]  # same seed, same sample


def test_unfinished_run_is_refused(tiny_model_dir, runs_dir):
    run = RunRegistry(runs_dir).create(RunConfig(model=str(tiny_model_dir)))
    with pytest.raises(ValueError, match="no saved adapter"):
        Playground().activate(run)
