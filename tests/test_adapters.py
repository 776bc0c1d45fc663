"""studio/training/adapters.py: the adapter a LoRA run trains, and targets that match nothing."""

import pytest
from transformers import AutoModelForCausalLM

from studio.config import RunConfig
from studio.models import ModelError
from studio.training.adapters import attach_lora

pytestmark = pytest.mark.unit


def _lora(**values):
    return RunConfig.from_dict({"lora": {"r": 4, **values}}).lora


def test_the_base_is_frozen_and_only_the_adapter_trains(tiny_model_dir):
    model = attach_lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir), _lora(targets="q_proj,v_proj"), "fp32")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert all(("q_proj" in n or "v_proj" in n) for n in trainable)


def test_bf16_runs_skip_peft_s_input_cast_and_fp32_runs_keep_it(tiny_model_dir):
    from peft.tuners.tuners_utils import BaseTunerLayer

    for precision, cast in (("bf16", False), ("fp32", True)):
        model = attach_lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir), _lora(), precision)
        layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
        assert layers and all(m.cast_input_dtype_enabled is cast for m in layers), precision


def test_targets_that_match_nothing_are_a_sentence_with_the_fix(tiny_model_dir):
    with pytest.raises(ModelError, match=r"LoRA targets 'nope' do not match this model .*Use all-linear"):
        attach_lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir), _lora(targets="nope"), "fp32")
