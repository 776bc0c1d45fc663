"""Each row of a batch through its own adapter (or none), at about the base's cost.

On a CPU, and on a GPU at small batches, a decode step is bound by per-operation overhead, not
arithmetic: PEFT's LoRA forward spends ~10 small operations per layer per adapter (dropout, cast,
two matmuls, scaling, add, and for a mixed batch an index and copy per adapter), 210 layers per
token on the default model. Here every LoRA Linear layer is replaced, for the batch, by one
function that does:

    y = x @ W^T + b                               the base layer, called directly (F.linear)
    h = x @ A_group^T  (once per input tensor)    every adapter's A of every sibling layer at once
    y += (h[:, own slice] * row_scale) @ B^T      one addmm

- **Siblings share one A matmul.** Layers of one parent that read the same input tensor (q, k,
  v and o of an attention block; gate and up of an MLP) have their A matrices stacked; the first
  sibling called with a given input computes ``h`` for all of them and the others slice it (the
  input is recognised by identity, so o_proj, which reads another tensor, computes its own).
- **The LoRA scaling is folded into A** when every row uses the same adapter; a batch mixing
  adapters (or adapters and the base) multiplies ``h`` by a per-row mask instead: the scaling on
  the row's own adapter's columns, 0 elsewhere (base rows are all 0).
- **The weights are cast once** to the compute dtype, not per call.

Numbers equal PEFT's forward within float rounding (tests compare logits within 1e-5 in fp32
and greedy answers exactly). Only plain LoRA on Linear layers is routed; anything else (DoRA,
LoRA on embeddings, modules_to_save) falls back to PEFT's own forward (studio/serving/engine.py).
Merging an adapter into the base would be faster still for one adapter, but a batch mixes
adapters and rows join it at any step, so nothing is merged.
"""

from __future__ import annotations

import types
from collections import defaultdict
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


class _Group:
    """LoRA Linear layers of one parent module with the same input size: they may read the same
    input tensor, so their A matrices are applied as one matmul."""

    def __init__(self, layers: list):
        self.layers = layers
        self.a_t: torch.Tensor | None = None  # [in, sum of every member's ranks], scaled when folded
        self.mask: torch.Tensor | None = None  # [rows, sum of ranks]; None when the scaling is folded into A
        self.seen: torch.Tensor | None = None  # the input ``h`` was computed from (held, so the identity is exact)
        self.h: torch.Tensor | None = None

    def lora(self, x: torch.Tensor, x2d: torch.Tensor) -> torch.Tensor:
        """``h`` for input ``x`` (``x2d``: its rows), computed once however many members read it."""
        if self.seen is not x:
            h = F.linear(x2d.to(self.a_t.dtype), self.a_t)
            if self.mask is not None:
                h = (h.view(self.mask.shape[0], -1, h.shape[-1]) * self.mask.unsqueeze(1)).view(h.shape)
            self.seen, self.h = x, h
        return self.h

    def forget(self) -> None:
        self.seen = self.h = None


class Route:
    """The routed forward installed on every LoRA Linear layer of ``model`` until ``close``.
    ``set_rows(names)`` says which adapter each row of the next forwards uses (BASE_ADAPTER: none);
    the stacked weights are built once per set of adapters and kept while the route lives."""

    def __init__(self, model, dtype: torch.dtype):
        self.dtype = dtype
        self.linear, self.other = _lora_layers(model)
        self.names: list[str] | None = None
        self._stacks: dict[tuple, dict] = {}  # adapters -> per group (a_t, b_t per layer, ranks)
        by_parent: dict[tuple, list] = defaultdict(list)
        parents = {id(child): parent for parent in model.modules() for child in parent.children()}
        for layer in self.linear:
            by_parent[(id(parents.get(id(layer))), layer.in_features)].append(layer)
        self.groups = [_Group(layers) for layers in by_parent.values()]
        # Every PEFT layer off (the Chat tab's active adapter must not leak into layers this batch's
        # adapters do not touch); the routed layers below apply exactly the batch's adapters.
        for layer in self.linear + self.other:
            layer.enable_adapters(False)
        for group in self.groups:
            for layer in group.layers:
                layer._fs_group = group
                layer._fs_direct = type(layer.base_layer) is torch.nn.Linear  # else (4-bit...) its own call
                layer.forward = types.MethodType(_routed_forward, layer)

    def set_rows(self, names: list[str]) -> None:
        if names == self.names:
            return
        self.names = list(names)
        adapters = tuple(dict.fromkeys(n for n in names if n != BASE_ADAPTER))
        fold = len(adapters) == 1 and BASE_ADAPTER not in names  # one adapter on every row: no mask
        stacks = self._stacks.get((adapters, fold))
        if stacks is None:
            stacks = self._stacks[(adapters, fold)] = {id(g): self._stack(g, adapters, fold) for g in self.groups}
        masks: dict[tuple, torch.Tensor] = {}  # groups of the same shape share one mask
        for group in self.groups:
            a_t, slices, blocks = stacks[id(group)]
            group.a_t, group.mask = a_t, None
            group.forget()
            for layer in group.layers:
                layer._fs_lora = slices.get(id(layer))
            if a_t is not None and not fold:
                if blocks not in masks:
                    masks[blocks] = _mask(names, blocks, a_t.device, self.dtype)
                group.mask = masks[blocks]

    def _stack(self, group: _Group, adapters: tuple[str, ...], fold: bool):
        """(A of every member and adapter stacked and transposed, {layer: (start, end, B^T)}, the
        (adapter, rank, scaling) column blocks the mask follows); (None, {}, ()) when none of
        ``adapters`` touches the group."""
        a_parts, slices, blocks, start = [], {}, [], 0
        for layer in group.layers:
            held = [a for a in adapters if a in layer.lora_A]
            if not held:
                continue
            for a in held:
                weight = layer.lora_A[a].weight.detach()
                a_parts.append((weight * layer.scaling[a]) if fold else weight)
                blocks.append((a, weight.shape[0], float(layer.scaling[a])))
            b_t = torch.cat([layer.lora_B[a].weight.detach() for a in held], dim=1).t()
            width = b_t.shape[0]
            slices[id(layer)] = (start, start + width, b_t.to(self.dtype).contiguous())
            start += width
        if not a_parts:
            return None, {}, ()
        a_t = torch.cat(a_parts, dim=0).to(self.dtype).contiguous()
        return a_t, slices, tuple(blocks)

    def close(self) -> None:
        for group in self.groups:
            group.forget()
            for layer in group.layers:
                del layer.forward  # back to the class's forward
                del layer._fs_group, layer._fs_direct, layer._fs_lora
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
def routed(model, names: list[str], dtype: torch.dtype = torch.float32):
    """Within this context each row of a batch (in ``names`` order) runs through its own adapter
    in every LoRA Linear layer; the layers' own forward is restored after."""
    route = Route(model, dtype)
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
        start, end, b_t = lora
        h = self._fs_group.lora(x, x2d)[:, start:end]
        if h.dtype != y.dtype:  # a 4-bit base computes in its own dtype
            h = h.to(y.dtype)
            b_t = b_t.to(y.dtype)
        y = y.addmm_(h, b_t) if not y.requires_grad else y.addmm(h, b_t)
    return y.view(*shape[:-1], y.shape[-1])
