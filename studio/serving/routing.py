"""Each row of a batch through its own adapter (or none), at close to the base's cost.

On a CPU, and on a GPU at small batches, a decode step is bound by per-operation overhead and
memory latency, not arithmetic: PEFT's LoRA forward spends ~10 small operations per layer per
adapter (dropout, cast, two matmuls, scaling, add, and for a mixed batch an index and copy per
adapter), 210 layers per token on the default model. Here every LoRA Linear layer is replaced, for
the batch, by one function that does:

    y = x @ W^T + b                        the base layer, called directly (F.linear)
    h = x @ A^T                            every adapter of the batch in this layer, stacked
    y += (h * row_scale) @ B^T             one addmm

- **The LoRA scaling is folded into A** when every row uses the same adapter (no mask); a batch
  mixing adapters (or adapters and the base) multiplies ``h`` by a per-row mask instead: the
  scaling on the row's own adapter's columns, 0 elsewhere (base rows are all 0).
- **The weights are stacked once** per set of adapters, not per call, and keep their dtype: fp32
  adapters on a bf16 base compute their update in fp32 (as PEFT does without autocast), because
  autocast's bf16 for these few-row matmuls is ~7x slower than fp32 on CPU.

Tried and dropped: one A matmul shared by sibling layers that read the same input (q, k, v; gate
and up). It saves matmuls but slices ``h`` into strided views, and measured slower (8 rows: 0.875x
the base against 0.94x for one matmul per layer; benchmarks in the issue 26 note). What an adapter
still costs is mostly its own weights, read every step, and the latency of two small matmuls per
layer: `benchmarks/routing.py` prints both per model shape (docs/serving.md, "What an adapter
costs, by model size").

Numbers equal PEFT's forward within float rounding (tests compare logits within 1e-5 in fp32
and greedy answers exactly). Only plain LoRA on Linear layers is routed; anything else (DoRA,
LoRA on embeddings, modules_to_save) falls back to PEFT's own forward (studio/serving/batch.py).
Merging an adapter into the base would be faster still for one adapter, but a batch mixes
adapters and rows join it at any step, so nothing is merged.
"""

from __future__ import annotations

import types
from contextlib import contextmanager

import torch
import torch.nn.functional as F

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


class Route:
    """The routed forward installed on every LoRA Linear layer of ``model`` until ``close``.
    ``set_rows(names)`` says which adapter each row of the next forwards uses (BASE_ADAPTER: none);
    the stacked weights are built once per set of adapters and kept while the route lives."""

    def __init__(self, model):
        self.linear, self.other = _lora_layers(model)
        self.names: list[str] | None = None
        self._stacks: dict[tuple, list] = {}  # (adapters, folded) -> per layer (A, B^T, blocks) or None
        # Every PEFT layer off (the Chat tab's active adapter must not leak into layers this batch's
        # adapters do not touch); the routed layers below apply exactly the batch's adapters.
        for layer in self.linear + self.other:
            layer.enable_adapters(False)
        for layer in self.linear:
            layer._fs_direct = type(layer.base_layer) is torch.nn.Linear  # else (4-bit...) its own call
            layer._fs_lora = None
            layer.forward = types.MethodType(_routed_forward, layer)

    def set_rows(self, names: list[str]) -> None:
        if names == self.names:
            return
        self.names = list(names)
        adapters = tuple(dict.fromkeys(n for n in names if n != BASE_ADAPTER))
        fold = len(adapters) == 1 and BASE_ADAPTER not in names  # one adapter on every row: no mask
        stacks = self._stacks.get((adapters, fold))
        if stacks is None:
            stacks = self._stacks[(adapters, fold)] = [self._stack(layer, adapters, fold) for layer in self.linear]
        masks: dict[tuple, torch.Tensor] = {}  # layers with the same adapters and ranks share one mask
        for layer, stack in zip(self.linear, stacks):
            if stack is None:
                layer._fs_lora = None
                continue
            a, b_t, blocks = stack
            if fold:
                layer._fs_lora = (a, b_t, None)
                continue
            if blocks not in masks:
                masks[blocks] = _mask(names, blocks, a.device, a.dtype)
            layer._fs_lora = (a, b_t, masks[blocks])

    def _stack(self, layer, adapters: tuple[str, ...], fold: bool):
        """(A of every adapter in ``adapters`` that this layer holds, stacked [sum r, in] and scaled
        when folded; their B^T [sum r, out]; the (adapter, rank, scaling) blocks the mask follows),
        or None when none of them touches the layer."""
        held = [a for a in adapters if a in layer.lora_A]
        if not held:
            return None
        a_parts, blocks = [], []
        for name in held:
            weight = layer.lora_A[name].weight.detach()
            a_parts.append(weight * layer.scaling[name] if fold else weight)
            blocks.append((name, weight.shape[0], float(layer.scaling[name])))
        a = torch.cat(a_parts, dim=0).contiguous()
        b_t = torch.cat([layer.lora_B[name].weight.detach() for name in held], dim=1).t().contiguous()
        return a, b_t, tuple(blocks)

    def close(self) -> None:
        for layer in self.linear:
            del layer.forward  # back to the class's forward
            del layer._fs_direct, layer._fs_lora
        for layer in self.linear + self.other:
            layer.enable_adapters(True)
        self._stacks.clear()


def _mask(names: list[str], blocks: tuple, device, dtype) -> torch.Tensor:
    """[rows, columns]: each row's LoRA scaling on its own adapter's columns, 0 elsewhere."""
    mask = torch.zeros((len(names), sum(rank for _, rank, _ in blocks)), dtype=dtype)
    start = 0
    for adapter, rank, scaling in blocks:
        for i, name in enumerate(names):
            if name == adapter:
                mask[i, start : start + rank] = scaling
        start += rank
    return mask.to(device)


@contextmanager
def routed(model, names: list[str]):
    """Within this context each row of a batch (in ``names`` order) runs through its own adapter
    in every LoRA Linear layer; the layers' own forward is restored after."""
    route = Route(model)
    try:
        route.set_rows(names)
        yield route
    finally:
        route.close()


def _routed_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    shape = x.shape
    x2d = x.reshape(-1, shape[-1])
    if self._fs_direct:
        base = self.base_layer
        y = F.linear(x2d, base.weight, base.bias)
    else:
        y = self.base_layer(x2d, *args, **kwargs)
    lora = self._fs_lora
    if lora is not None:
        a, b_t, mask = lora
        if a.dtype == y.dtype:
            y = y.addmm_(_masked(F.linear(x2d, a), mask), b_t)
        else:
            # fp32 adapters on a bf16 base: the update in fp32, added once, as PEFT computes it
            # without autocast. Autocast would run these tiny matmuls in bf16, which on CPU cost
            # ~22 us each against ~3 us in fp32 (oneDNN's bf16 path is slow for a few rows).
            # Autocast is switched off and back directly: `torch.autocast(enabled=False)` costs
            # ~2.7 us a call, 210 calls a step on the default model, against ~0.4 us for this.
            device = _autocast_device(x)
            was = torch.is_autocast_enabled(device)
            torch.set_autocast_enabled(device, False)
            try:
                y = y.add_(_masked(F.linear(x2d.to(a.dtype), a), mask) @ b_t)
            finally:
                torch.set_autocast_enabled(device, was)
    return y.view(*shape[:-1], y.shape[-1])


def _masked(h: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``h`` with each row's columns scaled by its mask row (None: the scaling is folded into A)."""
    if mask is None:
        return h
    if h.shape[0] == mask.shape[0]:  # a decode step: one token per row
        return h.mul_(mask)
    return (h.view(mask.shape[0], -1, h.shape[-1]) * mask.unsqueeze(1)).view(h.shape)


def _autocast_device(x: torch.Tensor) -> str:
    return "cpu" if x.device.type == "mps" else x.device.type
