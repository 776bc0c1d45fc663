"""Preference-tuning losses: DPO, ORPO and KTO, from per-sequence log-probabilities.

Preference methods score whole answers, not single tokens: each loss here takes, per row, the sum
of the log-probabilities of the answer's tokens (``sequence_logps``) under the policy and, for DPO
and KTO, under the frozen reference. With LoRA the reference is the same model with the adapter
disabled, so no second copy of the weights is needed.

The formulas follow TRL 1.16 line for line (``tests/test_preference_loss.py`` calls TRL's own code
on the same inputs and compares losses and gradients within 1e-5 in fp32), so a run here means
what the same settings mean in TRL and in the papers' code:

- DPO (Rafailov et al. 2023): TRL ``DPOTrainer`` with ``loss_type="sigmoid"``, no label smoothing.
- ORPO (Hong et al. 2024): TRL ``trl.experimental.orpo.ORPOTrainer``; TRL's ``beta`` is the
  paper's lambda.
- KTO (Ethayarajh et al. 2024): TRL ``KTOTrainer`` with ``loss_type="kto"``.

A preference batch holds each pair as consecutive rows, chosen then rejected
(``studio/data/render.py: PairExample``); ``split_pairs`` takes the two sides apart.

    sums, counts = sequence_logps(model, **batch)       # batch: input_ids, attention_mask, labels
    chosen, rejected = split_pairs(sums)
    with torch.no_grad(), model.disable_adapter():
        ref_chosen, ref_rejected = split_pairs(sequence_logps(model, **batch)[0])
    losses, chosen_rewards, rejected_rewards = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=0.1)
    losses.mean().backward()
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from studio.data.render import IGNORE_INDEX
from studio.training.loss import causal_lm, plain_loss_reason

Tensor = torch.Tensor


def sequence_logps(model, input_ids: Tensor, attention_mask: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Per row: the summed log-probability of its labeled tokens, and how many there are.

    Position t predicts token t + 1, and only tokens whose label is not -100 count (the answer;
    the prompt and the padding are masked), as in ``LabeledTokenLoss``. One sequence per row,
    right- or left-padded: packed rows would add several sequences into one sum.

    Returns:
        ``(sums, counts)``: float32 sums with gradient, shape ``(rows,)``; int64 counts.
    """
    if plain_loss_reason(model) is not None:
        return sequence_logps_plain(model, input_ids, attention_mask, labels)
    lm = causal_lm(model)
    hidden = lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    # Only the labeled positions go through the output layer: preference answers are a minority of
    # a row (the prompt is shared and masked), and the vocabulary-wide softmax is most of the cost.
    logits = lm.get_output_embeddings()(hidden[:, :-1][keep])
    # fp32 softmax, as transformers' loss upcasts: under bf16 autocast a sequence sum of bf16
    # log-probabilities would lose the small chosen-minus-rejected differences DPO trains on.
    token_logps = logits.float().log_softmax(-1).gather(-1, targets[keep].unsqueeze(-1)).squeeze(-1)
    rows = keep.nonzero()[:, 0]  # the row of each kept position, in the order keep selected them
    sums = token_logps.new_zeros(input_ids.shape[0]).index_add(0, rows, token_logps)
    return sums, keep.sum(dim=1)


def sequence_logps_plain(model, input_ids: Tensor, attention_mask: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """``sequence_logps`` through the model's own forward and its full logits, for models whose
    output layer is not plain (soft-capped or scaled logits, see ``loss.plain_loss_reason``)."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1]
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    # -100 is not a token id: gather a dummy 0 there and zero it with the mask, as TRL does.
    token_logps = logits.float().log_softmax(-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (token_logps * keep).sum(dim=1), keep.sum(dim=1)


def split_pairs(values: Tensor) -> tuple[Tensor, Tensor]:
    """A pair batch's per-row values as (chosen, rejected): rows alternate, chosen first."""
    return values[0::2], values[1::2]


def dpo_loss(
    policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor, beta: float
) -> tuple[Tensor, Tensor, Tensor]:
    """DPO's sigmoid loss per pair: -log sigmoid(beta * (chosen log-ratio - rejected log-ratio)).

    Args: summed sequence log-probabilities, shape ``(pairs,)``, under the policy and the
    reference; ``beta`` is how far from the reference the policy may move (smaller: further).

    Returns:
        ``(losses, chosen_rewards, rejected_rewards)``: per-pair losses (take the mean), and the
        implicit rewards ``beta * (policy - reference)``, detached, for the live view.
    """
    chosen_logratios = policy_chosen - ref_chosen
    rejected_logratios = policy_rejected - ref_rejected
    losses = -F.logsigmoid(beta * (chosen_logratios - rejected_logratios))
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, accurate on both sides of -ln 2 (Maechler 2012), as TRL does:
    log1p(-exp(x)) cancels near 0, log(-expm1(x)) far below it."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(
    chosen_logps_sum: Tensor,
    chosen_counts: Tensor,
    rejected_logps_sum: Tensor,
    rejected_counts: Tensor,
    chosen_nll: Tensor,
    lam: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """ORPO per pair: the chosen answer's NLL plus ``lam`` times -log sigmoid(log odds ratio).

    No reference model: the odds ratio of the chosen over the rejected answer, each answer's
    probability taken as its per-token average log-probability (``sum / count``, so long answers
    are not penalised for their length), pushes the rejected answer down while the NLL teaches the
    chosen one.

    Args:
        chosen_logps_sum, rejected_logps_sum: summed log-probabilities (``sequence_logps``).
        chosen_counts, rejected_counts: their token counts; every answer needs at least one.
        chosen_nll: the SFT term, a scalar (broadcast) or one per pair. TRL uses one scalar,
            the chosen rows' token-mean NLL, ``-(chosen_sums.sum() / chosen_counts.sum())``;
            note that TRL's covers the prompt tokens too (its labels are the whole row).
        lam: the odds-ratio weight (TRL's ``beta``; the paper's lambda, 0.1 there).

    Returns:
        ``(losses, chosen_rewards, rejected_rewards, log_odds)``; the rewards are
        ``lam * average log-probability`` and, with ``log_odds``, detached for logging.
    """
    # fp32: log1mexp of an average log-probability near 0 (a likely answer) needs the precision.
    chosen = (chosen_logps_sum / chosen_counts).float()
    rejected = (rejected_logps_sum / rejected_counts).float()
    # log odds(y) = log p - log(1 - p), so the log odds ratio is a difference of two of those.
    log_odds = (chosen - rejected) - (_log1mexp(chosen) - _log1mexp(rejected))
    losses = chosen_nll - lam * F.logsigmoid(log_odds)
    return losses, lam * chosen.detach(), lam * rejected.detach(), log_odds.detach()


def kto_loss(
    policy_logps: Tensor,
    ref_logps: Tensor,
    kl_policy: Tensor,
    kl_ref: Tensor,
    desirable: Tensor,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """KTO per row: each answer labeled good or bad on its own, judged against a KL reference point.

    The reference point z0 is the policy's KL from the reference, estimated on mismatched pairs
    (each prompt with another row's answer), averaged over the batch, detached (it only shifts the
    sigmoid) and clamped at 0. A desirable row's loss is ``1 - sigmoid(beta * (r - z0))``, an
    undesirable one's ``1 - sigmoid(beta * (z0 - r))``, with ``r = policy - reference``.

    Args:
        policy_logps, ref_logps: summed sequence log-probabilities per row.
        kl_policy, kl_ref: the same for the mismatched rows (any number of them).
        desirable: bool per row, True where the answer is a good one.
        beta: as in DPO; desirable_weight, undesirable_weight: per-class loss weights (the paper
            suggests weights that make weight x count roughly equal between the classes).

    Returns:
        ``(losses, rewards, kl)``: weighted per-row losses in row order (TRL's mean over its rows
        is ``losses.mean()``), rewards ``beta * r`` detached, and the scalar z0.

    Under DDP, TRL averages z0 over the processes; here it is this batch's (all-reduce
    ``kl_policy - kl_ref`` means first to match it).
    """
    kl = (kl_policy - kl_ref).mean().detach().clamp(min=0)
    logratios = policy_logps - ref_logps
    desirable = desirable.to(dtype=torch.bool, device=logratios.device)
    # One sigmoid for both classes: the sign flips the margin, so a bad answer gains by sinking.
    sign = torch.where(desirable, 1.0, -1.0).to(logratios.dtype)
    weight = torch.where(desirable, desirable_weight, undesirable_weight).to(logratios.dtype)
    losses = weight * (1 - torch.sigmoid(beta * sign * (logratios - kl)))
    return losses, beta * logratios.detach(), kl
