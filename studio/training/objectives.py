"""What a run's loss is: next-token cross-entropy (sft), a preference loss over pairs (dpo, orpo), or
KTO over answers marked good or bad (kto).

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
from studio.data.render import IGNORE_INDEX
from studio.training.adapters import REFERENCE, reference_adapter
from studio.training.loss import LabeledTokenLoss, plain_loss_reason
from studio.training.preference import dpo_loss, kto_loss, orpo_loss, sequence_logps

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

    @property
    def labeled_only(self) -> bool:
        """Logits at the answer tokens only (studio/training/preference.py), as the sft loss."""
        return plain_loss_reason(self.model) is None

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


class KTOLoss(PreferenceLoss):
    """KTO over answers marked good or bad one by one (feedback rows with ``desirable`` flags), or
    over pairs read that way (chosen rows good, rejected rows bad). Its reference point is the
    policy's KL from the reference on mismatched rows: each prompt with the next row's answer, as
    TRL builds them, under no_grad."""

    def __init__(self, model, beta: float, desirable_weight: float, undesirable_weight: float, full: bool):
        super().__init__(model, "dpo", beta, 0.0, full)  # "dpo": a reference like DPO's
        self.objective = "kto"
        self.desirable_weight, self.undesirable_weight = desirable_weight, undesirable_weight

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        desirable: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if desirable is None:  # pairs: the chosen rows (even) are the good answers
            desirable = torch.arange(input_ids.shape[0], device=input_ids.device) % 2 == 0
        desirable = desirable.to(device=input_ids.device, dtype=torch.bool)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        logps, _ = sequence_logps(self.model, input_ids, attention_mask, labels)
        kl_rows = mismatched(input_ids, attention_mask, labels)
        reference = self.reference or self.model
        with torch.no_grad():
            kl_policy, _ = sequence_logps(self.model, *kl_rows)
            with self._reference_context():
                ref_logps, _ = sequence_logps(reference, input_ids, attention_mask, labels)
                kl_ref, _ = sequence_logps(reference, *kl_rows)
        losses, rewards, _ = kto_loss(
            logps, ref_logps, kl_policy, kl_ref, desirable, self.beta, self.desirable_weight, self.undesirable_weight
        )
        rewards = rewards.float()
        good = rewards[desirable].mean() if desirable.any() else rewards.new_zeros(())
        bad = rewards[~desirable].mean() if (~desirable).any() else rewards.new_zeros(())
        agree = ((rewards > 0) == desirable).float().mean()  # each answer's reward on the side its label says
        self.last = torch.stack([agree, good - bad, good, bad]).detach()
        return losses.mean()


def mismatched(input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor):
    """KTO's KL rows: row i's prompt (its tokens before the first labeled one) followed by row
    i+1's answer (its labeled tokens), right-padded; (input_ids, attention_mask, labels)."""
    n = input_ids.shape[0]
    rows = []
    for i in range(n):
        keep = attention_mask[i].bool()
        labeled = (labels[i] != IGNORE_INDEX) & keep
        first = int(labeled.nonzero()[0]) if labeled.any() else int(keep.sum())
        j = (i + 1) % n
        answer = input_ids[j][(labels[j] != IGNORE_INDEX) & attention_mask[j].bool()]
        rows.append((input_ids[i, :first], answer))
    width = max(len(p) + len(a) for p, a in rows)
    ids = torch.zeros((n, width), dtype=input_ids.dtype, device=input_ids.device)
    mask = torch.zeros_like(ids)
    out_labels = torch.full_like(ids, IGNORE_INDEX)
    for i, (prompt, answer) in enumerate(rows):
        k = len(prompt) + len(answer)
        ids[i, :k] = torch.cat([prompt, answer])
        mask[i, :k] = 1
        out_labels[i, len(prompt) : k] = answer
    return ids, mask, out_labels


def data_problem(objective: str, kind: str) -> str | None:
    """Why data of ``kind`` (sft, pairs, feedback: studio/data/preference.py) cannot train with
    ``objective``, as a sentence with the fix; None when it can. Never trains answers marked bad."""
    if kind == "feedback" and objective != "kto":
        return (
            "This file marks answers as good or bad one by one (prompt, completion, label): train it with "
            "objective kto. Supervised training would teach the bad answers too, and dpo and orpo need a "
            "chosen and a rejected answer to the same prompt."
        )
    if objective == "sft" and kind == "pairs":
        return (
            "This file holds preference pairs (a prompt with a chosen and a rejected answer): train it with "
            "objective dpo, orpo or kto (training.objective, or the Objective setting on the Train tab)."
        )
    if objective != "sft" and kind == "sft":
        return (
            f"Objective {objective} learns from preference data, and this file holds supervised rows: upload a "
            "file with prompt, chosen and rejected columns (or prompt, completion, label for kto), or train it "
            "with objective sft."
        )
    return None


def loss_for(model, config: RunConfig) -> torch.nn.Module:
    """The loss module a run trains through."""
    t, full = config.training, config.method == "full"
    if t.objective == "sft":
        return LabeledTokenLoss(model)
    if t.objective == "kto":
        return KTOLoss(model, t.beta, t.kto_desirable_weight, t.kto_undesirable_weight, full)
    return PreferenceLoss(model, t.objective, t.beta, t.orpo_lambda, full)
