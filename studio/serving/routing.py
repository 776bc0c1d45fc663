"""Each row of a batch through its own adapter (or none), at two small matmuls per LoRA layer.

PEFT's mixed batch (``adapter_names=``) handles each adapter in each LoRA layer apart: it finds
that adapter's rows, copies them out, runs A and B, and adds them back; with all-linear LoRA
that is ~10 small ops x adapters x 210 layers per token on the default model, which on CPU cost
more than the batching saved (benchmarks/serve.py: a mixed batch of 8 decoded fewer tokens/s
than one request at a time).

Here each LoRA layer computes every row's update at once: the batch's adapters are concatenated
(A: [sum of ranks, in], B: [out, sum of ranks]) and each row keeps only its own adapter's slice
through a per-row scale mask (the LoRA scaling where the slice is the row's, 0 elsewhere):

    delta = ((x @ A_cat^T) * row_scale) @ B_cat^T

The wasted work is the other adapters' rank columns (r=16 against hidden sizes in the hundreds
or thousands: a few percent of the layer). Base rows have an all-zero mask. Only plain LoRA on
Linear layers is routed this way; anything else (DoRA, LoRA on embeddings, modules_to_save)
falls back to PEFT's own forward (one adapter) or mixed batch (several). Even for one adapter
this is faster than PEFT's forward on CPU (benchmarks/serve.py), whose per-layer dropout, cast
and scaling calls add up over 210 layers per token.
"""

from __future__ import annotations

import types
from contextlib import contextmanager

import torch

from studio.inference.playground import BASE_ADAPTER


def _lora_layers(model):
    from peft.tuners.lora.layer import Linear as LoraLinear
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import ModulesToSaveWrapper

    linear, other = [], []
    for m in model.modules():
        if isinstance(m, LoraLinear):
            linear.append(m)
        elif isinstance(m, (BaseTunerLayer, ModulesToSaveWrapper)):
            other.append(m)
    return linear, other


def can_route(model, names: list[str]) -> bool:
    """True when every adapter in ``names`` is plain LoRA on Linear layers only."""
    adapters = {n for n in names if n != BASE_ADAPTER}
    linear, other = _lora_layers(model)
    for m in other:
        held = set(getattr(m, "lora_A", {}) or {}) | set(getattr(m, "modules_to_save", {}) or {})
        if held & adapters:
            return False
    for m in linear:
        for name in adapters & set(m.lora_A):
            if m.merged or name in getattr(m, "lora_variant", {}) or m.use_dora.get(name):
                return False
    return True


@contextmanager
def routed(model, names: list[str]):
    """Within this context each row of a batch (in ``names`` order) runs through its own adapter
    in every LoRA Linear layer; the layers' own forward is restored after."""
    adapters = list(dict.fromkeys(n for n in names if n != BASE_ADAPTER))
    linear, other = _lora_layers(model)
    patched = []
    # Every PEFT layer off (the Chat tab's active adapter must not leak into layers this batch's
    # adapters do not touch); the routed layers below apply exactly the batch's adapters.
    for layer in linear + other:
        layer.enable_adapters(False)
    try:
        for layer in linear:
            held = [a for a in adapters if a in layer.lora_A]
            if not held:
                continue
            a_cat = torch.cat([layer.lora_A[a].weight for a in held], dim=0)  # [sum r, in]
            b_cat = torch.cat([layer.lora_B[a].weight for a in held], dim=1)  # [out, sum r]
            scale = torch.zeros((len(names), a_cat.shape[0]), dtype=a_cat.dtype, device=a_cat.device)
            start = 0
            for a in held:
                r = layer.lora_A[a].weight.shape[0]
                rows = [i for i, n in enumerate(names) if n == a]
                scale[rows, start : start + r] = layer.scaling[a]
                start += r
            layer.forward = types.MethodType(_routed_forward, layer)
            layer._fs_route = (a_cat.t(), b_cat.t(), scale.unsqueeze(1))
            patched.append(layer)
        yield
    finally:
        for layer in patched:
            del layer.forward  # back to the class's forward
            del layer._fs_route
        for layer in linear + other:
            layer.enable_adapters(True)


def _routed_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    result = self.base_layer(x, *args, **kwargs)
    a_t, b_t, scale = self._fs_route
    h = x.to(a_t.dtype) @ a_t  # [batch, tokens, sum r]
    return result + ((h * scale) @ b_t).to(result.dtype)
