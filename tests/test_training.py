"""Integration: train the tiny model for real, save, reload with plain PEFT."""

import threading

import torch

from studio.config import RunConfig
from studio.runs import RunRegistry
from studio.training import Trainer, run_training
from tests.conftest import tiny_run_config


_cfg = tiny_run_config


def test_lora_training_learns_saves_and_reloads_in_plain_peft(tiny_model_dir, instruction_csv, runs_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = _cfg(tiny_model_dir, instruction_csv, save_steps=10, eval_steps=10)
    run = RunRegistry(runs_dir).create(cfg)
    status = run_training(cfg, run)
    assert status["state"] == "finished", status
    train = [m for m in run.metrics() if m["kind"] == "train"]
    evals = [m for m in run.metrics() if m["kind"] == "eval"]
    assert [m["step"] for m in train] == list(range(1, 31))
    assert all({"loss", "lr", "grad_norm", "tokens_per_s", "rss_mib", "time"} <= m.keys() for m in train)
    first, last = sum(m["loss"] for m in train[:3]) / 3, sum(m["loss"] for m in train[-3:]) / 3
    assert last < 0.7 * first, (first, last)
    assert [m["step"] for m in evals] == [10, 20, 30]
    assert (run.path / "checkpoints" / "step-10" / "adapter_model.safetensors").exists()
    assert (run.adapter_dir / "adapter_model.safetensors").exists()
    assert run.is_trained()

    # Plain PEFT reload gives the same logits as the model the studio's playground serves.
    from studio.playground import Playground

    ids = torch.tensor([[1, 5, 9, 14, 3]])
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), run.adapter_dir).eval()
    pg = Playground()
    pg.activate(run)
    with torch.no_grad():
        ours, theirs = pg.model(input_ids=ids).logits, peft_model(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)(input_ids=ids).logits
    torch.testing.assert_close(ours, theirs)
    assert not torch.allclose(ours, base, atol=1e-3)  # the adapter really changes the model


def test_stop_saves_adapter_and_reports_stopped(tiny_model_dir, instruction_csv, runs_dir):
    cfg = _cfg(tiny_model_dir, instruction_csv, max_steps=10_000)
    run = RunRegistry(runs_dir).create(cfg)
    stop = threading.Event()

    def on_metrics(m):
        if m["kind"] == "train" and m["step"] == 3:
            stop.set()

    status = run_training(cfg, run, stop, on_metrics)
    assert status["state"] == "finished" and status["stopped"] is True
    assert status["step"] == 3 and "Stopped at step 3" in status["message"]
    assert run.is_trained()


def test_full_fine_tuning_saves_a_model(tiny_model_dir, instruction_csv, runs_dir):
    cfg = _cfg(tiny_model_dir, instruction_csv, method="full", max_steps=3, learning_rate=1e-4)
    run = RunRegistry(runs_dir).create(cfg)
    assert run_training(cfg, run)["state"] == "finished"
    assert (run.model_dir / "model.safetensors").exists() and run.weights_dir() == run.model_dir


def test_qlora_trains_and_keeps_gradients_after_an_inference_pass(tiny_model_dir, instruction_csv, runs_dir):
    """Guards the bitsandbytes CPU trap: after eval/generate, LoRA grads silently became None."""
    import bitsandbytes as bnb

    cfg = _cfg(tiny_model_dir, instruction_csv, method="qlora", max_steps=2)
    trainer = Trainer(cfg, RunRegistry(runs_dir).create(cfg))
    trainer.setup()
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in trainer.model.modules())
    trainer.evaluate()  # an inference pass
    batch = trainer._collate(trainer.train_examples[:2])
    trainer.model(**batch).loss.backward()
    lora = [p for n, p in trainer.model.named_parameters() if "lora_" in n and p.requires_grad]
    assert lora and all(p.grad is not None for p in lora)
    assert sum(float(p.grad.abs().sum()) for p in lora) > 0


def test_bad_data_fails_with_a_sentence(tiny_model_dir, tmp_path, runs_dir):
    bad = tmp_path / "bad.csv"
    bad.write_text("name,age\nann,3\n")
    cfg = _cfg(tiny_model_dir, bad)
    run = RunRegistry(runs_dir).create(cfg)
    status = run_training(cfg, run)
    assert status["state"] == "failed"
    assert "No usable columns found" in status["message"] and "Traceback" not in status["message"]
    assert "Traceback" in run.log_path.read_text()


def test_server_job_runs_in_background_refuses_a_second_and_stops(tiny_model_dir, instruction_csv, runs_dir):
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
    with pytest.raises(RuntimeError, match="still training"):
        studio.start_training(_cfg(tiny_model_dir, instruction_csv))
    assert studio.stop_training()
    job.thread.join(60)
    final = studio.job_view()
    assert final.state == "finished" and "Stopped at step" in final.message
    assert job.run.is_trained() and len(studio.registry.list()) == 1  # the refused run left no folder


def test_early_stopping_ends_the_run_when_eval_loss_stops_improving(tiny_model_dir, instruction_csv, runs_dir,
                                                                     monkeypatch):
    losses = iter([1.0, 0.9, 0.95, 0.97, 0.5, 0.4])  # best at the 2nd evaluation, then two without gain

    def fake_evaluate(self):
        loss = next(losses, 0.3)
        self._emit({"kind": "eval", "step": self.step, "eval_loss": loss})
        return loss

    monkeypatch.setattr(Trainer, "evaluate", fake_evaluate)
    cfg = _cfg(tiny_model_dir, instruction_csv, max_steps=40, eval_steps=2, early_stopping=2, memory_check=False)
    run = RunRegistry(runs_dir).create(cfg)
    status = run_training(cfg, run)
    assert status["state"] == "finished" and status["early_stopped"] and not status["stopped"]
    assert status["step"] == 8 and "Stopped early at step 8" in status["message"]
    assert run.is_trained()  # the adapter is saved as for any finished run


def test_early_stopping_needs_evaluations():
    problems = RunConfig.from_dict({"training": {"early_stopping": 2}}).validate(check_data_file=False)
    assert any("needs `training.eval_steps`" in p for p in problems)
