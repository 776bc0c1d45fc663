"""The LoRA adapter a LoRA or QLoRA run trains, attached to its loaded base with PEFT."""

from __future__ import annotations

import torch

from studio.config import LoraConfig as LoraSettings  # the run's `lora` section (PEFT has a LoraConfig too)
from studio.models import ModelError


def attach_lora(model: torch.nn.Module, lora: LoraSettings, precision: str) -> torch.nn.Module:
    """``model`` wrapped by PEFT with a new adapter (the base frozen); ModelError when the
    targets name no module of the model."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.tuners_utils import BaseTunerLayer

    # QLoRA: no prepare_model_for_kbit_training. Besides freezing (get_peft_model freezes the
    # base too) it casts everything the 4-bit base keeps in 16 bits (embeddings, output layer,
    # norms) to fp32: for a Llama-3-8B shape 4 GB more weights plus fp32 logits, more than the
    # 4-bit linears save on a 1B model. They stay in the compute dtype, as in a LoRA run's base.
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules(),
        task_type="CAUSAL_LM",
    )
    try:
        model = get_peft_model(model, config)
    except ValueError as exc:
        raise ModelError(
            f"LoRA targets {lora.targets!r} do not match this model "
            f"({str(exc).splitlines()[0][:160]}). Use all-linear, or module "
            "names such as q_proj,v_proj."
        ) from None
    if precision == "bf16":
        # The adapters keep fp32 weights (PEFT's autocast_adapter_dtype), and every forward here
        # runs under bf16 autocast, which computes their matmuls in bf16. PEFT would first cast
        # each adapted layer's bf16 input to fp32 for autocast to cast straight back: two copies
        # per adapted layer and step, the same numbers (tests/test_batching.py compares).
        for module in model.modules():
            if isinstance(module, BaseTunerLayer):
                module.cast_input_dtype_enabled = False
    return model
