"""Packed batches (studio/training/batching.py): the same loss and gradients as padded ones, no
document sees another, every step the same shape; the stream; adapters computing in bf16."""

from __future__ import annotations

import random

import pytest
import torch

from studio.data.render import IGNORE_INDEX, Example
from studio.runs.registry import RunRegistry
from studio.training import Trainer, batching
from studio.training.batching import Batching
from tests.helpers import tiny_run_config
from tests.test_training import _loss_and_grads, _tiny

pytestmark = pytest.mark.numeric


def _examples(lengths, vocab=300, seed=0, prompt=3):
    rng = random.Random(seed)
    out = []
    for n in lengths:
        ids = [rng.randrange(3, vocab) for _ in range(n)]
        out.append(Example(ids, [IGNORE_INDEX] * min(prompt, n - 1) + ids[min(prompt, n - 1) :]))
    return out


def _packed(examples, micro_batch, layout, sdpa):
    """Model inputs for a packed micro-batch, as the trainer makes them (the mask for SDPA)."""
    t = batching.tensors(examples, micro_batch, layout, pad_id=0)
    document = t.pop("document")
    if sdpa:
        t["attention_mask"] = batching.sdpa_mask(document)
    return t


# ---- the stream --------------------------------------------------------------------------------
@pytest.mark.unit
def test_best_fit_fills_rows_and_keeps_every_example_once():
    rng = random.Random(0)
    lengths = [rng.randint(20, 400) for _ in range(480)]
    rows = batching.best_fit(lengths, range(len(lengths)), 1024)
    assert sorted(j for row in rows for j in row) == list(range(480))
    assert all(sum(lengths[j] for j in row) <= 1024 for row in rows)
    fill = sum(lengths) / (len(rows) * 1024)
    assert fill > 0.95, fill  # almost no padding: 480 rows of 20-400 tokens


@pytest.mark.unit
@pytest.mark.parametrize("packed", [False, True])
def test_an_epoch_uses_every_example_once_and_processes_split_the_stream(packed):
    from itertools import islice

    rng = random.Random(1)
    lengths = [rng.randint(5, 60) for _ in range(200)]
    layout = Batching(4, 64 if packed else None)
    epoch = batching.epoch(lengths, layout, random.Random(42))
    assert sorted(j for mb in epoch for row in mb for j in row) == list(range(200))
    assert all(len(mb) <= 4 for mb in epoch)
    single = list(islice(batching.stream(lengths, layout, 42), 20))
    assert single[: len(epoch)] == epoch[:20]  # the stream's first epoch is that epoch
    rank0 = list(islice(batching.stream(lengths, layout, 42, rank=0, world=2), 10))
    rank1 = list(islice(batching.stream(lengths, layout, 42, rank=1, world=2), 10))
    assert rank0 == single[0::2] and rank1 == single[1::2]


@pytest.mark.unit
def test_packed_tensors_have_one_shape_positions_per_document_and_no_cross_document_target():
    examples = _examples([5, 7, 3, 9])
    layout = Batching(rows=3, width=16)
    t = _packed(examples, [[0, 1, 2], [3]], layout, sdpa=True)
    assert t["input_ids"].shape == t["labels"].shape == t["position_ids"].shape == (3, 16)
    assert t["attention_mask"].shape == (3, 1, 16, 16) and t["attention_mask"].dtype == torch.bool
    assert t["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 0]
    assert (t["labels"][2] == IGNORE_INDEX).all()  # an empty row keeps the shape
    for start in (5, 12):  # the first token of the 2nd and 3rd example is never a target
        assert t["labels"][0, start] == IGNORE_INDEX
    tokens, scored = batching.counts(examples, [[0, 1, 2], [3]])
    assert tokens == 24 and scored == int((t["labels"][:, 1:] != IGNORE_INDEX).sum())
    mask = t["attention_mask"][0, 0]
    assert mask[6, 5] and not mask[6, 4] and not mask[5, 6]  # own document, causal, nothing across


@pytest.mark.unit
def test_our_mask_is_the_one_transformers_builds_from_the_position_ids():
    from transformers.masking_utils import create_causal_mask

    model = _tiny("LlamaConfig")
    model.config._attn_implementation = "sdpa"
    t = _packed(_examples([5, 7, 3, 9, 2]), [[0, 1, 2], [3, 4]], Batching(2, 16), sdpa=True)
    embeds = model.get_input_embeddings()(t["input_ids"])
    theirs = create_causal_mask(
        config=model.config,
        inputs_embeds=embeds,
        attention_mask=None,
        past_key_values=None,
        position_ids=t["position_ids"],
    )
    assert torch.equal(t["attention_mask"], theirs.expand_as(t["attention_mask"]))


# ---- the model sees each document alone --------------------------------------------------------
@pytest.mark.unit
@pytest.mark.parametrize("model_type", sorted(batching.PACKED_MODEL_TYPES))
@pytest.mark.parametrize("sdpa", [True, False])
def test_a_packed_document_has_the_logits_it_has_alone(model_type, sdpa):
    """Each listed family: a document's logits in a packed row equal its logits alone, whether the
    mask is ours (SDPA) or built by transformers from the position ids; changing one document never
    changes another's."""
    from transformers import AutoConfig

    config_cls = type(AutoConfig.for_model(model_type)).__name__
    model = _tiny(config_cls).eval()
    model.config._attn_implementation = "sdpa"
    examples = _examples([6, 9, 4])
    layout = Batching(1, 24)
    t = _packed(examples, [[0, 1, 2]], layout, sdpa)
    inputs = {"use_cache": False, **{k: v for k, v in t.items() if k != "labels"}}
    with torch.no_grad():
        packed = model(**inputs).logits[0]
        at = 0
        for e in examples:
            n = len(e.input_ids)
            alone = model(input_ids=torch.tensor([e.input_ids])).logits[0]
            torch.testing.assert_close(packed[at : at + n], alone, rtol=1e-4, atol=1e-5)
            at += n
        changed = [examples[0], Example([7] * 9, examples[1].labels), examples[2]]
        t2 = _packed(changed, [[0, 1, 2]], layout, sdpa)
        other = model(use_cache=False, **{k: v for k, v in t2.items() if k != "labels"}).logits[0]
    assert torch.equal(other[:6], packed[:6]) and torch.equal(other[15:19], packed[15:19])
    assert not torch.equal(other[6:15], packed[6:15])


def _trainer(tiny_model_dir, csv, runs_dir, method="lora", max_length=64, **training):
    cfg = tiny_run_config(tiny_model_dir, csv, method=method, max_steps=4, precision="fp32", **training)
    cfg = cfg.with_overrides({"data.max_length": max_length})
    trainer = Trainer(cfg, RunRegistry(runs_dir).create(cfg))
    trainer.setup()
    return trainer


@pytest.mark.parametrize("method", ["full", "lora"])
def test_packed_loss_and_gradients_equal_the_padded_ones(method, tiny_model_dir, instruction_csv, runs_dir):
    trainer = _trainer(tiny_model_dir, instruction_csv, runs_dir, method, max_length=128, packing="on")
    assert trainer.batching == Batching(4, 128)
    micro_batch = max(batching.epoch(trainer.lengths, trainer.batching, None), key=len)
    assert len(micro_batch) == 4 and len([j for row in micro_batch for j in row]) > 4  # examples share rows
    packed = trainer.tensors(micro_batch)
    padded = trainer.collate_rows([trainer.train_examples[j] for row in micro_batch for j in row])
    assert packed["input_ids"].shape == (4, 128)
    trainer.model.train()
    ours, ours_grads = _loss_and_grads(trainer.model, trainer.loss_fn(**packed))
    theirs, their_grads = _loss_and_grads(trainer.model, trainer.loss_fn(**padded))
    assert ours == pytest.approx(theirs, rel=1e-5)
    assert ours_grads.keys() == their_grads.keys() and ours_grads
    for name, grad in ours_grads.items():
        torch.testing.assert_close(grad, their_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_a_packed_run_trains_evaluates_and_counts_tokens(tiny_model_dir, instruction_csv, runs_dir):
    from studio.training import run_training

    cfg = tiny_run_config(tiny_model_dir, instruction_csv, max_steps=6, packing="on", eval_steps=3)
    run = RunRegistry(runs_dir).create(cfg)
    assert run_training(cfg, run).state == "finished"
    steps = run.train_metrics()
    assert [m.step for m in steps] == list(range(1, 7))
    assert steps[-1].loss < steps[0].loss
    assert all(0 < m.labeled_tokens < m.tokens <= 4 * 64 for m in steps)
    assert [e.step for e in run.eval_metrics()] == [0, 3, 6]  # 0: before training


@pytest.mark.unit
def test_packing_on_refuses_a_model_it_has_not_checked(tiny_model_dir, instruction_csv, runs_dir, monkeypatch):
    from studio.models import ModelError

    monkeypatch.setattr(batching, "PACKED_MODEL_TYPES", frozenset({"qwen2"}))
    with pytest.raises(ModelError, match="cannot train packed.*'llama'.*auto or off"):
        _trainer(tiny_model_dir, instruction_csv, runs_dir, packing="on")
    # auto packs on CUDA only, and only the families checked; on trains packed anywhere.
    assert batching.layout("auto", "cuda", 4, 64, "qwen2") == Batching(4, 64)
    assert batching.layout("auto", "cuda", 4, 64, "llama") == Batching(4)
    assert batching.layout("auto", "cpu", 4, 64, "qwen2") == Batching(4)
    assert batching.layout("on", "cpu", 4, 64, "qwen2") == Batching(4, 64)
    assert batching.layout("off", "cuda", 4, 64, "qwen2") == Batching(4)


# ---- the step reads the device only now and then -----------------------------------------------
def test_steps_read_together_log_every_step_with_the_same_numbers(tiny_model_dir, instruction_csv, runs_dir):
    """The losses of steps read back in one go (as on a GPU, every READ_EVERY_S) are the numbers a
    run reading every step logs, step by step."""

    def losses(read_every_s, name):
        trainer = _trainer(tiny_model_dir, instruction_csv, runs_dir / name)
        trainer.read_every_s = read_every_s
        seen = []
        trainer.on_metrics = lambda record: seen.append(record)
        trainer.train()
        return [(r.step, r.loss, r.grad_norm, r.tokens, r.labeled_tokens) for r in seen]

    each, together = losses(0.0, "each"), losses(3600.0, "together")
    assert [s[0] for s in together] == [1, 2, 3, 4]
    assert together == each


def test_a_non_finite_loss_names_its_step_even_when_read_later(tiny_model_dir, instruction_csv, runs_dir):
    trainer = _trainer(tiny_model_dir, instruction_csv, runs_dir)
    trainer.read_every_s = 3600.0
    real, calls = trainer.forward_loss, {"n": 0}

    def nan_at_second(**batch):
        calls["n"] += 1
        loss = real(**batch)
        return loss * float("nan") if calls["n"] == 2 else loss

    trainer.forward_loss = nan_at_second
    with pytest.raises(FloatingPointError, match="nan at step 2; lower the learning rate"):
        trainer.train()


# ---- adapters compute in bf16 without casting their inputs to fp32 -----------------------------
def test_adapters_skip_the_fp32_input_cast_under_bf16_with_the_same_numbers(tiny_model_dir, instruction_csv, runs_dir):
    from peft.tuners.tuners_utils import BaseTunerLayer

    cfg = tiny_run_config(tiny_model_dir, instruction_csv, max_steps=2, precision="bf16")
    trainer = Trainer(cfg, RunRegistry(runs_dir).create(cfg))
    trainer.setup()
    layers = [m for m in trainer.model.modules() if isinstance(m, BaseTunerLayer)]
    assert layers and not any(m.cast_input_dtype_enabled for m in layers)
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters() if p.requires_grad)
    batch = trainer.collate_rows(trainer.train_examples[:4])
    trainer.model.train()
    with trainer.autocast():
        ours, ours_grads = _loss_and_grads(trainer.model, trainer.loss_fn(**batch))
    for m in layers:
        m.cast_input_dtype_enabled = True  # PEFT's default
    with trainer.autocast():
        theirs, their_grads = _loss_and_grads(trainer.model, trainer.loss_fn(**batch))
    assert ours == theirs
    for name, grad in ours_grads.items():
        torch.testing.assert_close(grad, their_grads[name], rtol=0, atol=0, msg=name)


def test_a_checkpoint_resumes_in_the_layout_it_was_trained_in(tiny_model_dir, instruction_csv, tmp_path):
    """A run packed on a GPU and resumed where `auto` means padded (or the reverse) replays the same
    stream: the checkpoint's layout wins, so the resumed steps see the batches the straight run saw."""
    cfg = tiny_run_config(tiny_model_dir, instruction_csv, max_steps=6, precision="fp32", packing="on")
    straight = Trainer(cfg, RunRegistry(tmp_path / "straight").create(cfg))
    straight.setup()
    straight.train()
    first = Trainer(cfg, RunRegistry(tmp_path / "resumed").create(cfg))
    first.setup()
    first.total_steps = 3
    first.train()
    first.save_checkpoint()
    elsewhere = Trainer(cfg.with_overrides({"training.packing": "off"}), first.run)
    elsewhere.setup()
    assert not elsewhere.batching.packed
    elsewhere.restore(first.run.checkpoints()[-1])
    assert elsewhere.batching == first.batching and elsewhere.batches_per_epoch == first.batches_per_epoch
    elsewhere.train()
    resumed = [r.loss for r in first.run.train_metrics()]
    assert resumed == pytest.approx([r.loss for r in straight.run.train_metrics()], rel=1e-5)
