"""What a run's loss is: next-token cross-entropy (sft), or a preference loss over pairs (dpo, orpo).

The trainer calls one nn.Module per run, ``loss_fn(**batch)``, whatever the objective; DDP wraps
it, the memory check and evaluation call it. A preference batch holds each pair as two
consecutive rows, chosen then rejected (studio/data/render.py PairExample), so both sides go
through one forward; the per-row log-probabilities of the answer tokens come from the labeled
positions only (studio/training/preference.py), as the sft loss does.

The DPO reference is the model itself with its adapter switched off (LoRA and QLoRA: no second
copy in memory), the frozen version it started from (``training.start_from``: a second, frozen
adapter on the same base), or a frozen copy of the starting model for full fine-tuning. Its
log-probs are computed under no_grad in the same step.

``last`` holds the step's preference statistics (reward accuracy, margin, the implicit rewards'
chosen and rejected means) as one detached tensor, read with the loss (studio/training/trainer.py).
"""

from __future__ import annotations

import copy
from contextlib import nullcontext

import torch

from studio.config import RunConfig
from studio.training.adapters import REFERENCE, reference_adapter
from studio.training.loss import LabeledTokenLoss
from studio.training.preference import dpo_loss, orpo_loss, sequence_logps

PREFERENCE_STATS = ("reward_accuracy", "reward_margin", "chosen_reward", "rejected_reward")


class PreferenceLoss(torch.nn.Module):
    """DPO (sigmoid) or ORPO over batches of (chosen, rejected) row pairs."""

    def __init__(self, model, objective: str, beta: float, orpo_lambda: float, full: bool):
        super().__init__()
        self.model = model
        self.objective, self.beta, self.orpo_lambda = objective, beta, orpo_lambda
        # Full fine-tuning changes every weight, so the reference is a frozen copy made now;
        # an adapter switches off instead (the base under it never trains).
        self.reference = None
        if objective == "dpo" and full:
            self.reference = copy.deepcopy(model).eval().requires_grad_(False)
        self.last: torch.Tensor | None = None

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        logps, counts = sequence_logps(self.model, input_ids, attention_mask, labels)
        chosen, rejected = logps[0::2], logps[1::2]
        if self.objective == "dpo":
            with torch.no_grad(), self._reference_context():
                ref_logps, _ = sequence_logps(self.reference or self.model, input_ids, attention_mask, labels)
            losses, chosen_rewards, rejected_rewards = dpo_loss(
                chosen, rejected, ref_logps[0::2], ref_logps[1::2], self.beta
            )
        else:
            chosen_counts, rejected_counts = counts[0::2], counts[1::2]
            chosen_nll = -chosen.sum() / chosen_counts.sum().clamp(min=1)  # mean over the chosen answers' tokens
            losses, chosen_rewards, rejected_rewards, _ = orpo_loss(
                chosen, chosen_counts, rejected, rejected_counts, chosen_nll, self.orpo_lambda
            )
        margin = (chosen_rewards - rejected_rewards).float()
        self.last = torch.stack(
            [(margin > 0).float().mean(), margin.mean(), chosen_rewards.float().mean(), rejected_rewards.float().mean()]
        ).detach()
        return losses.mean()

    def _reference_context(self):
        if self.reference is not None:
            return nullcontext()
        if REFERENCE in getattr(self.model, "peft_config", {}):  # training.start_from: that version, frozen
            return reference_adapter(self.model)
        return self.model.disable_adapter()  # PEFT: the base alone, for this forward


def data_problem(objective: str, kind: str) -> str | None:
    """Why data of ``kind`` (sft, pairs, feedback: studio/data/preference.py) cannot train with
    ``objective``, as a sentence with the fix; None when it can. Never trains answers marked bad."""
    if kind == "feedback":
        return (
            "This file marks answers as good or bad (prompt, completion, label). Training it as supervised data "
            "would teach the bad answers too, and the studio cannot train on unpaired feedback (KTO) yet: pair "
            "each prompt's good and bad answer as prompt, chosen, rejected and train with objective dpo or orpo, "
            "or keep only the good rows for sft."
        )
    if objective == "sft" and kind == "pairs":
        return (
            "This file holds preference pairs (a prompt with a chosen and a rejected answer): train it with "
            "objective dpo or orpo (training.objective, or the Objective setting on the Train tab)."
        )
    if objective != "sft" and kind != "pairs":
        return (
            f"Objective {objective} learns from preference pairs, and this file holds supervised rows: upload a "
            "file with prompt, chosen and rejected columns, or train it with objective sft."
        )
    return None


def loss_for(model, config: RunConfig) -> torch.nn.Module:
    """The loss module a run trains through."""
    t = config.training
    if t.objective == "sft":
        return LabeledTokenLoss(model)
    return PreferenceLoss(model, t.objective, t.beta, t.orpo_lambda, full=config.method == "full")
