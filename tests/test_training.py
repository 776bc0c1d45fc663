"""Integration: train the tiny model for real, save, reload with plain PEFT."""

import threading

import pytest
import torch

from studio.config import RunConfig
from studio.runs.records import EvalRecord, TrainRecord
from studio.runs.registry import RunRegistry
from studio.training import Trainer, run_training
from studio.ui.views import progress_markdown
from tests.helpers import tiny_run_config

pytestmark = pytest.mark.numeric  # CI runs these again under the other precision (see conftest.py)


_cfg = tiny_run_config


def test_lora_training_learns_saves_and_reloads_in_plain_peft(tiny_model_dir, instruction_csv, runs_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = _cfg(tiny_model_dir, instruction_csv, save_steps=10, eval_steps=10)
    run = RunRegistry(runs_dir).create(cfg)
    status = run_training(cfg, run)
    assert status.state == "finished", status
    train = run.train_metrics()
    evals = run.eval_metrics()
    assert [m.step for m in train] == list(range(1, 31))
    assert all({"loss", "lr", "grad_norm", "tokens_per_s", "rss_mib", "time"} <= m.to_dict().keys() for m in train)
    first, last = sum(m.loss for m in train[:3]) / 3, sum(m.loss for m in train[-3:]) / 3
    assert last < 0.7 * first, (first, last)
    assert [m.step for m in evals] == [0, 10, 20, 30]  # step 0: the base model's held-out loss
    assert (run.path / "checkpoints" / "step-10" / "adapter_model.safetensors").exists()
    assert (run.weights_dir() / "adapter_model.safetensors").exists()
    assert run.is_trained()

    # Plain PEFT reload gives the same logits as the model the studio's playground serves.
    from studio.inference.playground import Playground

    # Both at the run's recorded precision: the playground serves a bf16 run the way it trained.
    from studio.planning.precision import autocast, of_status, weights_dtype

    ids = torch.tensor([[1, 5, 9, 14, 3]])
    run_precision = of_status(run.status())
    plain_base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=weights_dtype("lora", run_precision))
    peft_model = PeftModel.from_pretrained(plain_base, run.weights_dir()).eval()
    pg = Playground()
    pg.activate(run)
    with torch.no_grad(), autocast("cpu", run_precision):
        ours, theirs = pg.model(input_ids=ids).logits, peft_model(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)(input_ids=ids).logits
    torch.testing.assert_close(ours, theirs)
    assert not torch.allclose(ours.float(), base.float(), atol=1e-2)  # the adapter really changes the model


def test_stop_saves_adapter_and_reports_stopped(tiny_model_dir, instruction_csv, runs_dir):
    cfg = _cfg(tiny_model_dir, instruction_csv, max_steps=10_000)
    run = RunRegistry(runs_dir).create(cfg)
    stop = threading.Event()

    def on_metrics(m):
        if isinstance(m, TrainRecord) and m.step == 3:
            stop.set()

    status = run_training(cfg, run, stop, on_metrics)
    assert status.state == "finished" and status.stopped is True
    assert status.step == 3 and "Stopped at step 3" in status.message
    assert run.is_trained()


def test_full_fine_tuning_saves_a_model(tiny_model_dir, instruction_csv, runs_dir):
    cfg = _cfg(tiny_model_dir, instruction_csv, method="full", max_steps=3, learning_rate=1e-4)
    run = RunRegistry(runs_dir).create(cfg)
    assert run_training(cfg, run).state == "finished"
    assert (run.weights_dir() / "model.safetensors").exists() and run.weights_dir().name == "v1"


def test_qlora_trains_and_keeps_gradients_after_an_inference_pass(tiny_model_dir, instruction_csv, runs_dir):
    """Guards the bitsandbytes CPU trap: after eval/generate, LoRA grads silently became None."""
    import bitsandbytes as bnb

    cfg = _cfg(tiny_model_dir, instruction_csv, method="qlora", max_steps=2)
    trainer = Trainer(cfg, RunRegistry(runs_dir).create(cfg))
    trainer.setup()
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in trainer.model.modules())
    trainer.evaluate()  # an inference pass
    batch = trainer.collate_rows(trainer.train_examples[:2])
    with trainer.autocast():  # every forward of the trainer's model runs under the run's autocast
        loss = trainer.model(**batch).loss
    loss.backward()
    lora = [p for n, p in trainer.model.named_parameters() if "lora_" in n and p.requires_grad]
    assert lora and all(p.grad is not None for p in lora)
    assert sum(float(p.grad.abs().sum()) for p in lora) > 0


@pytest.mark.unit
def test_bad_data_fails_with_a_sentence(tiny_model_dir, tmp_path, runs_dir):
    bad = tmp_path / "bad.csv"
    bad.write_text("name,age\nann,3\n")
    cfg = _cfg(tiny_model_dir, bad)
    run = RunRegistry(runs_dir).create(cfg)
    status = run_training(cfg, run)
    assert status.state == "failed"
    assert "No usable columns found" in status.message and "Traceback" not in status.message
    assert "Traceback" in run.log_path.read_text()


def test_server_job_runs_in_background_queues_the_next_and_stops(tiny_model_dir, instruction_csv, runs_dir):
    import time

    import pytest

    from studio.service import Studio

    studio = Studio(runs_dir)
    job = studio.start_training(_cfg(tiny_model_dir, instruction_csv, max_steps=100_000))
    deadline = time.time() + 60
    while not studio.job_view().train and time.time() < deadline:
        time.sleep(0.05)
    view = studio.job_view()
    assert view.state == "running" and view.step >= 1 and view.eta_s is not None and view.tokens_per_s > 0

    # A second Train waits its turn; a third is cancelled before it starts; a resume is refused.
    second = studio.start_training(_cfg(tiny_model_dir, instruction_csv, max_steps=3))
    third = studio.start_training(_cfg(tiny_model_dir, instruction_csv, max_steps=3))
    assert [studio.jobs.queue_position(j) for j in (job, second, third)] == [None, 1, 2]
    assert second.run.status().state == "queued" and "Queued" in second.run.status().message
    assert studio.job_view().queued == [second.run.id, third.run.id]
    assert "Waiting to start: 1." in progress_markdown(studio.job_view())
    with pytest.raises(RuntimeError, match="still training"):
        studio.resume_training(job.run.id)
    assert studio.delete_run(third.run.id) == third.run.id and not third.run.path.exists()

    assert studio.stop_training()
    job.thread.join(60)
    assert job.run.status().state == "finished" and "Stopped at step" in job.run.status().message
    assert job.run.is_trained()
    second.thread.join(120)  # started by itself when the first ended
    assert studio.jobs.current is second and second.run.status().state == "finished"
    assert studio.job_view().queued == [] and {r.id for r in studio.registry.list()} == {job.run.id, second.run.id}


def test_early_stopping_ends_the_run_when_eval_loss_stops_improving(
    tiny_model_dir, instruction_csv, runs_dir, monkeypatch
):
    losses = iter([1.0, 0.9, 0.95, 0.97, 0.5, 0.4])  # best at the 2nd evaluation, then two without gain

    def fake_evaluate(self, at_step=None):
        step = self.step if at_step is None else at_step
        loss = 2.0 if step == 0 else next(losses, 0.3)  # step 0 scores the base model, not watched
        self._emit(EvalRecord(step, loss))
        return loss

    monkeypatch.setattr(Trainer, "evaluate", fake_evaluate)
    cfg = _cfg(tiny_model_dir, instruction_csv, max_steps=40, eval_steps=2, early_stopping=2, memory_check=False)
    run = RunRegistry(runs_dir).create(cfg)
    status = run_training(cfg, run)
    assert status.state == "finished" and status.early_stopped and not status.stopped
    assert status.step == 8 and "Stopped early at step 8" in status.message
    assert run.is_trained()  # the adapter is saved as for any finished run


@pytest.mark.unit
def test_early_stopping_needs_evaluations():
    problems = RunConfig.from_dict({"training": {"early_stopping": 2}}).validate(check_data_file=False)
    assert any("needs `training.eval_steps`" in p for p in problems)


def _loss_and_grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.item(), grads


@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_labeled_token_loss_equals_the_transformers_loss_and_gradients(
    method, tiny_model_dir, instruction_csv, runs_dir
):
    """The trainer's loss computes logits only where a label is; same number and gradients as
    model(**batch).loss on a padded batch with masked prompts."""
    cfg = _cfg(tiny_model_dir, instruction_csv, method=method, gradient_checkpointing=method == "qlora")
    trainer = Trainer(cfg, RunRegistry(runs_dir).create(cfg))
    trainer.setup()
    assert trainer.loss_fn.labeled_only, trainer.loss_fn.plain_reason
    rows = sorted(trainer.train_examples, key=lambda e: len(e.input_ids))
    batch = trainer.collate_rows([rows[0], rows[len(rows) // 2], rows[-1]])
    labels = batch["labels"][:, 1:]
    assert (labels == -100).any() and (labels != -100).any() and (batch["attention_mask"] == 0).any()
    trainer.model.train()
    with trainer.autocast():  # as training runs it (a bf16 run's adapters expect autocast)
        ours, ours_grads = _loss_and_grads(trainer.model, trainer.loss_fn(**batch))
        theirs, their_grads = _loss_and_grads(trainer.model, trainer.model(**batch).loss)
    assert ours == pytest.approx(theirs, rel=1e-5)
    assert ours_grads.keys() == their_grads.keys() and ours_grads
    for name, grad in ours_grads.items():
        torch.testing.assert_close(grad, their_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def _tiny(config_cls: str, **extra):
    import transformers
    from transformers import AutoModelForCausalLM

    cls = getattr(transformers, config_cls)
    extra = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, **extra}
    if config_cls == "GPTNeoXConfig":
        config = cls(
            vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, **extra
        )
    else:
        config = cls(
            vocab_size=300,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            **extra,
        )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


def _masked_batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 300, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 9:] = 0
    mask[1, 5:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :4] = -100  # a prompt
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.mark.parametrize(
    "config_cls", ["Qwen2Config", "MistralConfig", "GemmaConfig", "Phi3Config", "Qwen3Config", "GPTNeoXConfig"]
)
def test_labeled_token_loss_matches_other_model_families(config_cls):
    from studio.training.loss import LabeledTokenLoss

    model = _tiny(config_cls).train()
    loss_fn = LabeledTokenLoss(model)
    assert loss_fn.labeled_only, loss_fn.plain_reason
    batch = _masked_batch()
    ours, ours_grads = _loss_and_grads(model, loss_fn(**batch))
    theirs, their_grads = _loss_and_grads(model, model(**batch).loss)
    assert ours == pytest.approx(theirs, rel=1e-5)
    for name, grad in ours_grads.items():
        torch.testing.assert_close(grad, their_grads[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.unit
def test_soft_capped_and_unknown_heads_take_the_models_own_loss():
    from studio.training.loss import LabeledTokenLoss

    capped = _tiny("Gemma2Config", final_logit_softcapping=30.0)
    loss_fn = LabeledTokenLoss(capped)
    assert not loss_fn.labeled_only and "final_logit_softcapping" in loss_fn.plain_reason
    batch = _masked_batch()
    assert loss_fn(**batch).item() == pytest.approx(capped(**batch).loss.item(), rel=1e-6)
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = LabeledTokenLoss(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=300)))
    assert not gpt2.labeled_only and "gpt2" in gpt2.plain_reason


@pytest.mark.unit
@pytest.mark.parametrize("schedule, last_lr", [("cosine", 0.0), ("linear", 0.0), ("constant", 1e-2)])
def test_lr_scheduler_shapes_the_learning_rate_after_warmup(
    tiny_model_dir, instruction_csv, runs_dir, schedule, last_lr
):
    cfg = tiny_run_config(tiny_model_dir, instruction_csv, max_steps=10, warmup_ratio=0.2, lr_scheduler=schedule)
    trainer = Trainer(cfg, RunRegistry(runs_dir).create(cfg))
    trainer.setup()
    lrs = []
    for _ in range(10):
        lrs.append(trainer.scheduler.get_last_lr()[0])
        trainer.optimizer.step()
        trainer.scheduler.step()
    assert lrs[0] == 0.0 and lrs[2] == pytest.approx(1e-2)  # two warmup steps, then the peak
    assert trainer.scheduler.get_last_lr()[0] == pytest.approx(last_lr, abs=1e-9)
    if schedule == "linear":
        assert lrs[6] == pytest.approx(1e-2 * 4 / 8)  # halfway down a straight line


@pytest.mark.unit
def test_lr_scheduler_is_validated():
    problems = RunConfig.from_dict({"training": {"lr_scheduler": "step"}}).validate(check_data_file=False)
    assert "`training.lr_scheduler` must be one of cosine, linear, constant (got 'step')." in problems


@pytest.mark.parametrize("max_norm", [0.0, 1e-3])
def test_gradients_are_clipped_to_the_configured_norm(tiny_model_dir, instruction_csv, runs_dir, max_norm):
    cfg = _cfg(tiny_model_dir, instruction_csv, max_grad_norm=max_norm, memory_check=False)
    trainer = Trainer(cfg, RunRegistry(runs_dir).create(cfg))
    trainer.setup()
    with trainer.autocast():
        loss = trainer.loss_fn(**trainer.collate_rows(trainer.train_examples[:4]))
    loss.backward()
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    before = trainer.clip_gradients(params).item()
    after = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])).item()
    assert before > 1e-2  # a real gradient, well above the tight limit
    assert after == pytest.approx(before if max_norm == 0 else max_norm, rel=1e-3)  # 0: measured, not clipped
    problems = RunConfig().with_overrides({"training.max_grad_norm": -1}).validate(check_data_file=False)
    assert "`training.max_grad_norm` must be 0 (no clipping) or more (got -1.0)." in problems


@pytest.mark.parametrize("method", ["lora", "full"])
def test_the_first_loss_point_comes_before_the_adapters_base_score(method, tiny_model_dir, instruction_csv, runs_dir):
    """An adapter's base is scored with the adapter switched off right after step 1 (the first
    loss point waits for nothing); full fine-tuning scores it before step 1. Either way the score
    is the base's: equal to the model's held-out loss before any step (fp32: exact to 1e-6)."""
    cfg = _cfg(tiny_model_dir, instruction_csv, method, max_steps=3, memory_check=False, precision="fp32")
    fresh = Trainer(cfg, RunRegistry(runs_dir).create(cfg))
    fresh.setup()
    untrained = fresh.evaluate()
    run = RunRegistry(runs_dir).create(cfg)
    status = run_training(cfg, run)
    assert status.state == "finished"
    assert status.base_eval_loss == pytest.approx(untrained, abs=1e-6)
    records = [(type(m).__name__, m.step) for m in run.metrics()]
    first_two = [("TrainRecord", 1), ("EvalRecord", 0)] if method == "lora" else [("EvalRecord", 0), ("TrainRecord", 1)]
    assert records[:2] == first_two
    assert [m.step for m in run.eval_metrics()] == [0, 3]
    assert {"tokenizer and data", "model", "base score", "first loss point"} <= status.startup.keys()
    assert ("adapter" in status.startup) == (method == "lora")
    assert 0 < status.startup["first loss point"] < 120
