"""The playground is correct by test: base pane == plain transformers, adapted pane == plain PEFT,
and swapping adapters never reloads the base."""

import pytest
import torch

from studio.config import RunConfig
from studio.inference.playground import Playground, SamplingSettings
from studio.planning.precision import autocast, of_status, weights_dtype
from studio.runs.records import TrainRecord
from studio.runs.registry import RunRegistry
from studio.training import run_training

pytestmark = pytest.mark.numeric  # CI runs these again under the other precision (see conftest.py)

PROMPT = [{"role": "user", "content": "what is 3 plus 4"}]


@pytest.fixture(scope="module")
def two_runs(tiny_model_dir, tmp_path_factory):
    from tests.helpers import write_csv

    root = tmp_path_factory.mktemp("pg")
    reg = RunRegistry(root / "runs")
    runs = []
    for seed, word in ((1, "answer"), (2, "hello world")):  # two adapters taught different replies
        rows = [[f"what is {a} plus {b}", f"{word} {a + b}"] for a in range(1, 8) for b in range(1, 4)]
        data = write_csv(root / f"d{seed}.csv", ["instruction", "output"], rows)
        cfg = RunConfig.from_dict(
            {
                "model": str(tiny_model_dir),
                "data": {"path": str(data), "max_length": 64},
                "training": {"max_steps": 8, "learning_rate": 1e-2, "seed": seed},
            }
        )
        run = reg.create(cfg)
        assert run_training(cfg, run).state == "finished"
        runs.append(run)
    return runs


def _plain(model_dir, run, adapter=None):
    """Plain transformers (+ PEFT), loaded at the run's recorded precision as its trainer did."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=weights_dtype("lora", of_status(run.status())))
    return (PeftModel.from_pretrained(model, adapter) if adapter is not None else model).eval()


def _hf_greedy(model, tokenizer, messages, run, n=20):
    """transformers' own greedy generate under the run's autocast: what the playground must match."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad(), autocast("cpu", of_status(run.status())):
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def test_base_and_adapted_match_plain_transformers_and_peft(two_runs, tiny_model_dir):
    a, _ = two_runs
    pg = Playground()
    pg.activate(a)
    settings = SamplingSettings(max_new_tokens=20)
    *_, (base_text, adapted_text) = pg.stream_pair(PROMPT, PROMPT, settings)

    assert base_text == _hf_greedy(_plain(tiny_model_dir, a), pg.tokenizer, PROMPT, a)
    assert adapted_text == _hf_greedy(_plain(tiny_model_dir, a, a.weights_dir()), pg.tokenizer, PROMPT, a)
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
    pg.activate(b)  # another session switches to B; a request that names A still gets A
    *_, pinned = pg.stream_pair(PROMPT, PROMPT, settings, ref=a.id)
    assert pinned == outputs[0] and pg.active == b.id
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


@pytest.mark.unit
def test_unfinished_run_is_refused(tiny_model_dir, runs_dir):
    run = RunRegistry(runs_dir).create(RunConfig(model=str(tiny_model_dir)))
    with pytest.raises(ValueError, match="no saved weights"):
        Playground().activate(run)


# ---- checkpoints, memory bound, compatibility, evaluation ------------------------------------


@pytest.fixture(scope="module")
def run_with_checkpoints(tiny_model_dir, tmp_path_factory):
    from tests.helpers import write_csv

    root = tmp_path_factory.mktemp("pgc")
    rows = [[f"what is {a} plus {b}", f"sum {a + b}"] for a in range(1, 10) for b in range(1, 4)]
    data = write_csv(root / "d.csv", ["instruction", "output"], rows)
    cfg = RunConfig.from_dict(
        {
            "model": str(tiny_model_dir),
            "data": {"path": str(data), "max_length": 64},
            "training": {"max_steps": 12, "learning_rate": 1e-2, "save_steps": 4, "keep_checkpoints": 3, "seed": 3},
        }
    )
    run = RunRegistry(root / "runs").create(cfg)
    assert run_training(cfg, run).state == "finished"
    return run


def test_checkpoints_are_selectable_and_match_plain_peft(run_with_checkpoints, tiny_model_dir):
    run = run_with_checkpoints
    assert [c.name for c in run.checkpoints()] == ["step-4", "step-8"]
    pg = Playground()
    outputs = {}
    for ckpt in ("step-4", None, "step-8"):
        pg.activate(run, ckpt)
        *_, (_, outputs[ckpt]) = pg.stream_pair(PROMPT, PROMPT, SamplingSettings(max_new_tokens=16))
    assert pg.loaded() == [run.id + "@step-4", run.id, run.id + "@step-8"]
    assert pg.base_loads == 1
    peft_model = _plain(tiny_model_dir, run, run.path / "checkpoints" / "step-4")
    assert outputs["step-4"] == _hf_greedy(peft_model, pg.tokenizer, PROMPT, run, n=16)
    with pytest.raises(ValueError, match="no checkpoint or version 'step-99'"):
        pg.activate(run, "step-99")


def test_least_recently_used_adapter_is_dropped_first(run_with_checkpoints, two_runs):
    a, b = two_runs
    pg = Playground(max_adapters=2)
    settings = SamplingSettings(max_new_tokens=12)
    pg.activate(a)
    *_, (_, a_first) = pg.stream_pair(PROMPT, PROMPT, settings)
    pg.activate(b)
    pg.activate(a)  # a is now the most recent: loading a third must evict b
    pg.activate(run_with_checkpoints)
    assert pg.loaded() == [a.id, run_with_checkpoints.id]
    assert set(pg.model.peft_config) == {a.id, run_with_checkpoints.id}  # b's weights are gone too
    pg.activate(b)  # evicted adapters load again on demand
    pg.activate(a)
    *_, (_, a_again) = pg.stream_pair(PROMPT, PROMPT, settings)
    assert a_again == a_first and pg.base_loads == 1


def test_adapter_from_another_base_is_refused_naming_both(two_runs, tmp_path):
    import json
    import shutil

    a, _ = two_runs
    clone = tmp_path / a.id
    shutil.copytree(a.path, clone)
    fp = json.loads((clone / "fingerprint.json").read_text())
    assert fp["hidden_size"] and fp["tokenizer_sha256"]  # recorded at training time
    fp.update(model="some-org/bigger-model", hidden_size=fp["hidden_size"] * 2)
    from studio.runs.registry import Run
    from tests.helpers import write_fingerprint

    write_fingerprint(Run(clone), fp)

    pg = Playground()
    with pytest.raises(ValueError, match="bigger-model.*but the base here is") as err:
        pg.activate(Run(clone))
    assert "hidden_size" in str(err.value)
    assert pg.active is None and pg.loaded() == []

    fp.update(hidden_size=fp["hidden_size"] // 2, chat_template_sha256="0" * 16)  # same shapes, other template
    write_fingerprint(Run(clone), fp)
    warnings = pg.activate(Run(clone))
    assert len(warnings) == 1 and "chat template differs" in warnings[0]


def test_an_adapter_on_a_base_whose_weights_changed_is_refused_naming_both_digests(two_runs, tiny_model_dir, tmp_path):
    """Issue 24: the base re-saved with other weights under the same path (same shapes, so the
    structural check passes) is caught by the weights digest, in chat and in serving."""
    import json
    import shutil

    from transformers import AutoModelForCausalLM

    from studio.inference.playground import BaseLoad
    from studio.runs import fingerprint
    from studio.runs.registry import Run
    from tests.helpers import write_fingerprint

    a, _ = two_runs
    digest = fingerprint.weights_digest(tiny_model_dir)
    assert digest and a.fingerprint()["weights"] == digest  # recorded at training time
    base = shutil.copytree(tiny_model_dir, tmp_path / "base")  # the same bytes: the same digest
    clone = Run(shutil.copytree(a.path, tmp_path / "runs" / a.id))
    clone.config_path.write_text(a.config().with_overrides({"model": str(base)}).to_yaml())
    status = json.loads((clone.path / "status.json").read_text())
    (clone.path / "status.json").write_text(json.dumps({**status, "model": str(base)}))
    assert Playground().activate(clone) == []  # the untouched base loads, no warning

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    model.save_pretrained(tmp_path / "updated")  # the same shapes and names: only the values differ
    shutil.copyfile(tmp_path / "updated" / "model.safetensors", base / "model.safetensors")
    changed = fingerprint.weights_digest(base)
    assert changed != digest
    pg = Playground()
    with pytest.raises(ValueError, match="changed since this adapter was trained") as err:
        pg.activate(clone)
    assert digest[:12] in str(err.value) and changed[:12] in str(err.value)
    assert f"finetune-studio train --config {clone.config_path}" in str(err.value)
    with pg.serving(BaseLoad(str(base), *pg.base_load)), pytest.raises(ValueError, match=changed[:12]):
        pg.serve_adapter(clone)
    from studio.ui.views import run_label  # the run lists say so before anyone picks it

    assert "trained on another base" in run_label(clone) and "another base" not in run_label(a)

    old_style = {k: v for k, v in clone.fingerprint().items() if k != "weights"}  # written before the digest
    write_fingerprint(clone, old_style)
    warnings = pg.activate(clone)
    assert len(warnings) == 1 and "could not be compared" in warnings[0]


def test_unloading_a_deleted_run_leaves_an_honest_base(two_runs, tiny_model_dir):
    a, b = two_runs
    pg = Playground()
    pg.activate(a)
    pg.activate(b)
    pg.unload(b.id)
    assert pg.loaded() == [a.id] and pg.active is None
    pg.unload(a.id)  # the last adapter: PEFT cannot delete it, so the LoRA layers come out
    assert pg.loaded() == [] and not hasattr(pg.model, "peft_config")
    pg.activate(a)
    *_, (base_text, _) = pg.stream_pair(PROMPT, PROMPT, SamplingSettings(max_new_tokens=12))
    assert base_text == _hf_greedy(_plain(tiny_model_dir, a), pg.tokenizer, PROMPT, a, n=12) and pg.base_loads == 1


def test_chat_and_serving_notice_a_resaved_adapter(two_runs, tiny_model_dir, tmp_path):
    """Issue 24: a run that saves a new version is chatted with, under its id, as the new weights
    (as plain PEFT loads them), never a cached copy; a batch already running keeps the weights it
    began with; ``RUN@v1`` stays the first version."""
    import shutil

    from studio.inference.playground import BaseLoad, _adapter_name
    from studio.runs.registry import Run
    from tests.helpers import add_version

    a, b = two_runs
    clone = Run(shutil.copytree(a.path, tmp_path / a.id))
    pg = Playground()
    pg.activate(clone)
    settings = SamplingSettings(max_new_tokens=20)
    *_, (_, before) = pg.stream_pair(PROMPT, PROMPT, settings, clone.id)
    add_version(clone, b.weights_dir())
    *_, (_, after) = pg.stream_pair(PROMPT, PROMPT, settings, clone.id)  # no activate: the Chat tab's next message
    assert before == _hf_greedy(_plain(tiny_model_dir, a, a.weights_dir()), pg.tokenizer, PROMPT, a)
    assert after == _hf_greedy(_plain(tiny_model_dir, b, b.weights_dir()), pg.tokenizer, PROMPT, b) != before
    assert list(pg.model.peft_config) == [_adapter_name(clone.id) + "_r1"] and pg.base_loads == 1
    pg.activate(clone)  # unchanged files: nothing reloads
    assert list(pg.model.peft_config) == [_adapter_name(clone.id) + "_r1"]

    load = BaseLoad(str(tiny_model_dir), *pg.base_load)
    with pg.serving(load):
        name = pg.serve_adapter(clone)
        add_version(clone, a.weights_dir())  # mid-batch: its rows keep what they started with
        assert pg.serve_adapter(clone) == name
    with pg.serving(load):
        assert pg.serve_adapter(clone) == _adapter_name(clone.id) + "_r2"  # the next batch has the new weights
        first = pg.serve_adapter(clone, "v1")
    *_, (_, again) = pg.stream_pair(PROMPT, PROMPT, settings, f"{clone.id}@v1")
    assert first == _adapter_name(f"{clone.id}@v1") and again == before and pg.base_loads == 1


def test_bad_sampling_settings_are_refused(two_runs):
    pg = Playground()
    pg.activate(two_runs[0])
    with pytest.raises(ValueError, match="Top-p must be above 0"):
        list(pg.stream_pair(PROMPT, PROMPT, SamplingSettings(top_p=0)))


def test_evaluation_scores_base_and_adapter_on_the_held_out_rows(run_with_checkpoints):
    from studio.evaluation import heldout

    run = run_with_checkpoints
    status = run.status()
    assert status.eval_rows > 0 and status.base_eval_loss > status.eval_loss
    pg = Playground()
    result = heldout.evaluate(pg, run, samples=2, max_new_tokens=8)
    # The same rows and the same loss as the trainer computed: base at step 0, adapter at the end.
    assert result["rows"] == status.eval_rows
    assert result["base"]["loss"] == pytest.approx(status.base_eval_loss, rel=1e-4)
    assert result["adapter"]["loss"] == pytest.approx(status.eval_loss, rel=1e-4)
    assert len(result["samples"]) == 2 and all(s["reference"].startswith("sum") for s in result["samples"])
    assert run.evaluation()["adapter"] == result["adapter"]
    table = heldout.table_rows(run)
    assert [r[0] for r in table] == ["base", "adapter"] and table[1][2] < table[0][2]  # perplexity fell


@pytest.mark.parametrize("method", ["full", "qlora"])
def test_evaluation_matches_the_training_log_for_every_method(method, tiny_model_dir, tmp_path):
    """The Chat tab's Evaluate loads the base as the trainer did (fp32 master weights for full,
    4-bit NF4 for QLoRA, the run's precision for both), so its losses are the training log's."""
    from studio.evaluation import heldout
    from tests.helpers import write_csv

    rows = [[f"what is {a} plus {b}", f"sum {a + b}"] for a in range(1, 10) for b in range(1, 4)]
    data = write_csv(tmp_path / "d.csv", ["instruction", "output"], rows)
    cfg = RunConfig.from_dict(
        {
            "model": str(tiny_model_dir),
            "method": method,
            "data": {"path": str(data), "max_length": 64},
            "training": {"max_steps": 4, "learning_rate": 1e-3 if method == "full" else 1e-2, "memory_check": False},
        }
    )
    run = RunRegistry(tmp_path / "runs").create(cfg)
    status = run_training(cfg, run)
    assert status.state == "finished" and status.precision in ("bf16", "fp32")
    result = heldout.evaluate(Playground(), run, samples=1, max_new_tokens=4)
    assert result["base"]["loss"] == pytest.approx(status.base_eval_loss, rel=1e-4)
    assert result["adapter"]["loss"] == pytest.approx(status.eval_loss, rel=1e-4)
    assert result["adapter"]["loss"] != pytest.approx(result["base"]["loss"], rel=1e-3)  # it trained


def test_chat_works_while_a_job_trains(two_runs, tiny_model_dir, instruction_csv, tmp_path):
    """The server's training thread and a chat request share the machine, not a lock."""
    import shutil

    from studio.service import Studio
    from tests.helpers import tiny_run_config, wait_until

    studio = Studio(tmp_path / "runs")
    finished = two_runs[0]
    shutil.copytree(finished.path, studio.registry.root / finished.id)
    job = studio.start_training(tiny_run_config(tiny_model_dir, instruction_csv, max_steps=2000, memory_check=False))
    try:
        # Step 2: past the first step and the base's score that follows it (an adapter's base is
        # scored right after the first loss point), so the loop is stepping while we chat.
        second_step = lambda: any(isinstance(m, TrainRecord) and m.step >= 2 for m in job.snapshot())  # noqa: E731
        wait_until(second_step, 120, "the second training step", 0.05)
        studio.activate_run(finished.id)
        steps_before = len(job.snapshot())
        *_, (base_text, adapted_text) = studio.chat(PROMPT, PROMPT, SamplingSettings(max_new_tokens=12), finished.id)
        assert base_text and adapted_text != base_text
        # Training kept going: a chat shorter than one step may overlap none, so wait (with a
        # deadline) for the next point rather than assuming it landed during the chat.
        assert job.alive
        wait_until(lambda: len(job.snapshot()) > steps_before, 60, "a training step after the chat", 0.05)
        assert studio.chat_memory_note().startswith("Training is running")
    finally:
        studio.stop_training()
        job.thread.join(60)


@pytest.mark.unit
def test_base_is_loaded_as_each_method_trained_it(monkeypatch):
    """fp32 master weights for full, the run's dtype for LoRA, 4-bit for QLoRA where bitsandbytes
    runs; without it a QLoRA adapter still chats, on the full-precision base."""
    from studio.inference.playground import base_load_for
    from studio.planning import hardware

    assert base_load_for("full", "bf16", "cpu") == ("lora", "fp32")
    assert base_load_for("lora", "bf16", "cpu") == ("lora", "bf16")
    assert base_load_for("qlora", "bf16", "cpu") == ("qlora", "bf16")
    monkeypatch.setattr(hardware, "bnb_4bit_support", lambda cuda, mps: {"cpu": "bitsandbytes is not installed"})
    assert base_load_for("qlora", "bf16", "cpu") == ("lora", "bf16")


def test_a_run_id_and_its_latest_version_share_one_loaded_copy(two_runs, tiny_model_dir):
    """The Chat tab names the latest as the run's id, the API as RUN@vN: one copy in memory."""
    from studio.inference.playground import BaseLoad

    a, b = two_runs
    pg = Playground()
    pg.activate(a)
    with pg.serving(BaseLoad(str(tiny_model_dir), *pg.base_load)):
        shared = pg.serve_adapter(a, "v1")
        other = pg.serve_adapter(b, "v1")
    assert shared == pg.adapters[a.id].name != other and pg.copies() == 2 and len(pg.loaded()) == 3
    pg.unload(b.id)
    assert pg.copies() == 1 and list(pg.model.peft_config) == [shared]
    *_, (_, text) = pg.stream_pair(PROMPT, PROMPT, SamplingSettings(max_new_tokens=12), f"{a.id}@v1")
    assert text == _hf_greedy(_plain(tiny_model_dir, a, a.weights_dir()), pg.tokenizer, PROMPT, a, n=12)
    pg.unload(a.id)
    assert pg.loaded() == [] and not hasattr(pg.model, "peft_config")
