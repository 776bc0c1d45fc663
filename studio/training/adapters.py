"""The LoRA adapter a LoRA or QLoRA run trains, attached to its loaded base with PEFT."""

from __future__ import annotations

from contextlib import contextmanager

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


REFERENCE = "reference"  # the PEFT name of a DPO run's frozen reference adapter (start_from)


def attach_saved(model: torch.nn.Module, folder, precision: str, with_reference: bool) -> torch.nn.Module:
    """``model`` wrapped by PEFT with the adapter saved in ``folder`` as its trainable adapter
    (training goes on from it); with ``with_reference`` the same weights loaded a second time,
    frozen, as the DPO reference (``REFERENCE``)."""
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTunerLayer

    model = PeftModel.from_pretrained(model, str(folder), is_trainable=True)
    if with_reference:
        model.load_adapter(str(folder), adapter_name=REFERENCE, is_trainable=False)
        model.base_model.set_adapter("default")  # the trainable one stays active (and the only one with grads)
    if precision == "bf16":  # as attach_lora: no fp32 round trip for every adapted layer's input
        for module in model.modules():
            if isinstance(module, BaseTunerLayer):
                module.cast_input_dtype_enabled = False
    return model


@contextmanager
def reference_adapter(model: torch.nn.Module):
    """For one forward, every LoRA layer computes with the frozen ``REFERENCE`` adapter instead of
    the trained one. Only which adapter is active changes: PEFT's set_adapter would also flip
    requires_grad on both adapters every step (and make compiled layers recompile)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    before = [layer._active_adapter for layer in layers]
    for layer in layers:
        layer._active_adapter = [REFERENCE]
    try:
        yield
    finally:
        for layer, active in zip(layers, before):
            layer._active_adapter = active
