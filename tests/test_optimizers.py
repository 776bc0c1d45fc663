"""``training.optimizer``: every choice trains, checkpoints and resumes; ``auto`` is the QLoRA recipe
on CUDA; the estimate counts each one's state."""

from __future__ import annotations

import pytest

from studio.config import RunConfig, optimizer_for
from studio.runs.registry import RunRegistry
from studio.training import Trainer
from studio.training.optimizers import BITSANDBYTES
from tests.helpers import tiny_run_config


@pytest.mark.unit
def test_auto_is_paged_adamw_for_qlora_on_cuda_and_adamw_elsewhere():
    assert optimizer_for("auto", "qlora", "cuda") == "paged_adamw_32bit"
    assert optimizer_for("auto", "lora", "cuda") == optimizer_for("auto", "qlora", "cpu") == "adamw"
    assert optimizer_for("adamw_8bit", "full", "cpu") == "adamw_8bit"


@pytest.mark.unit
def test_unknown_optimizer_and_bitsandbytes_under_fsdp_are_refused():
    problems = RunConfig.from_dict({"training": {"optimizer": "sgd"}}).validate(check_data_file=False)
    assert any("`training.optimizer` must be one of auto, adamw, adamw_8bit" in p for p in problems)
    problems = RunConfig.from_dict({"training": {"optimizer": "adamw_8bit", "distributed": "fsdp"}}).validate(
        check_data_file=False
    )
    assert any("cannot step sharded (fsdp) parameters" in p for p in problems)


@pytest.mark.parametrize("name", ["adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"])
def test_bitsandbytes_optimizers_train_and_resume_to_the_same_losses(name, tiny_model_dir, instruction_csv, tmp_path):
    pytest.importorskip("bitsandbytes")
    cfg = tiny_run_config(tiny_model_dir, instruction_csv, max_steps=6, optimizer=name, precision="fp32")

    def trained(runs, stop_at=None):
        trainer = Trainer(cfg, RunRegistry(tmp_path / runs).create(cfg))
        trainer.setup()
        if stop_at:
            trainer.total_steps = stop_at
        trainer.train()
        return trainer

    straight = trained("straight")
    assert type(straight.optimizer).__name__ == BITSANDBYTES[name]
    # (8-bit state only for tensors of 4096+ values, bitsandbytes' min_8bit_size: not the tiny model's)
    assert straight.optimizer.args.optim_bits == (32 if name.endswith("32bit") else 8)
    losses = [r.loss for r in straight.run.train_metrics()]
    assert losses[-1] < losses[0]

    first = trained("resumed", stop_at=3)
    first.save_checkpoint()
    resumed = Trainer(cfg, first.run)
    resumed.setup()
    resumed.restore(first.run.checkpoints()[-1])
    resumed.train()
    again = [r.loss for r in first.run.train_metrics()]
    assert again == pytest.approx(losses, rel=1e-5)


@pytest.mark.unit
def test_estimate_counts_each_optimizers_state(tiny_model_dir):
    from transformers import AutoConfig

    from studio.planning.memory import Settings, estimate, shape_from_config

    shape = shape_from_config(AutoConfig.from_pretrained(tiny_model_dir))
    state = {
        name: estimate(shape, "lora", Settings(64, 2, optimizer=name), "cuda").breakdown["optimizer_state"]
        for name in ("adamw", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit")
    }
    assert state["adamw"] == state["paged_adamw_32bit"] == 4 * state["adamw_8bit"] == 4 * state["paged_adamw_8bit"]
