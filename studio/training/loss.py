"""The training loss, with logits computed only where there is a label.

``model(**batch).loss`` runs the output layer at every position: batch x seq x vocab logits
(49,152 wide for SmolLM2), then a cross-entropy that ignores the prompt and padding positions
anyway. Here the decoder runs as usual, the hidden states of the positions whose next token is
labeled are gathered, and only those go through the output layer and the cross-entropy. The
loss is the same number (mean over labeled tokens, as transformers computes it) with fewer
FLOPs (the output layer is about a fifth of a small model's forward) and far less of the
memory-bound softmax work and memory.

Only for model families whose causal-LM head is exactly "decoder, output layer, cross-entropy";
anything else takes the model's own forward (see ``plain_loss_reason``).

    loss_fn = LabeledTokenLoss(model)   # an nn.Module: wrap this in DDP, not the model
    loss = loss_fn(input_ids=..., labels=..., attention_mask=...)  # or position_ids for packed rows
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from studio.data.render import IGNORE_INDEX

# Families whose XForCausalLM.forward is decoder -> output layer -> ForCausalLMLoss with nothing
# in between (read from transformers 5.x; tests compare the loss for several of them). Others
# change the logits or add to the loss: Gemma 2/3 soft-cap the logits, Cohere and Granite scale
# them, mixture-of-experts models add a router loss, and models we have not read may do anything.
PLAIN_HEAD_MODEL_TYPES = frozenset(
    {
        "llama",
        "mistral",
        "ministral",
        "qwen2",
        "qwen3",
        "gemma",
        "phi",
        "phi3",
        "smollm3",
        "olmo",
        "olmo2",
        "starcoder2",
        "stablelm",
        "gpt_neox",
        "glm",
        "glm4",
        "helium",
    }
)


def causal_lm(model):
    """The transformers causal LM inside a PEFT wrapper (LoRA layers are injected in place)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def plain_loss_reason(model) -> str | None:
    """Why the labeled-token path would not compute this model's loss exactly, or None."""
    lm = causal_lm(model)
    config = getattr(lm, "config", None)
    model_type = getattr(config, "model_type", None)
    for attr in ("final_logit_softcapping", "logit_scale", "logits_scaling"):
        if getattr(config, attr, None) not in (None, 1, 1.0):  # the logits are changed after the layer
            return f"config.{attr} is set"
    if getattr(config, "output_router_logits", False):
        return "the loss includes a router loss"
    if model_type not in PLAIN_HEAD_MODEL_TYPES:
        return f"model type {model_type!r} is not one whose output layer we know to be plain"
    try:
        decoder, head = lm.get_decoder(), lm.get_output_embeddings()
    except (AttributeError, NotImplementedError, ValueError):
        return "no separate decoder and output layer"
    if decoder is lm or not isinstance(head, torch.nn.Module):
        return "no separate decoder and output layer"
    return None


class LabeledTokenLoss(torch.nn.Module):
    """Mean next-token cross-entropy over labeled positions; an nn.Module so DDP can wrap it
    (its forward is what DDP hooks to all-reduce the gradients)."""

    def __init__(self, model, labeled_only: bool = True):
        super().__init__()
        self.model = model
        # labeled_only=False forces the model's own loss (benchmarks compare the two paths).
        self.plain_reason = plain_loss_reason(model) if labeled_only else "turned off"

    @property
    def labeled_only(self) -> bool:
        return self.plain_reason is None

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Packed batches (training/batching.py) bring position_ids and a 4-D mask, or none."""
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
        inputs = {k: v for k, v in inputs.items() if v is not None}
        if self.plain_reason is not None:
            return self.model(**inputs, labels=labels).loss
        lm = causal_lm(self.model)
        hidden = lm.get_decoder()(**inputs, use_cache=False).last_hidden_state
        targets = labels[:, 1:]  # position t predicts token t + 1
        keep = targets != IGNORE_INDEX
        logits = lm.get_output_embeddings()(hidden[:, :-1][keep])
        # Upcast as transformers does (a no-op in fp32; under bf16 autocast the softmax runs in fp32).
        return F.cross_entropy(logits.float(), targets[keep])
