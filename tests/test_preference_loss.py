"""studio/training/preference.py against TRL 1.16's own code: losses and gradients within 1e-5.

Everything runs in fp32 (the tiny model is loaded in fp32, no autocast), so these tests pin their
precision and are not `numeric`; they run backward passes, so they are not `unit` either.

TRL is called as little as possible: its loss code is a method of a trainer we never build, so
each test hands the unbound method a stand-in ``self`` with only the attributes it reads, and a
stand-in model where the method runs one. TRL 1.16 keeps DPO's and KTO's loss inline in
``DPOTrainer._compute_loss`` / ``KTOTrainer._compute_loss`` (no standalone ``dpo_loss`` or
``kto_loss`` any more) and ORPO in ``trl.experimental.orpo``.
"""

from __future__ import annotations

import types
from collections import defaultdict

import pytest
import torch

from studio.data.render import IGNORE_INDEX
from studio.training import preference
from studio.training.loss import plain_loss_reason
from studio.training.preference import dpo_loss, kto_loss, orpo_loss, sequence_logps, sequence_logps_plain

pytestmark = pytest.mark.filterwarnings("ignore:You are importing from 'trl.experimental'")

TOL = 1e-5  # fp32
MAX_LEN = 16  # rows longer than this are cut, labels included (a truncated answer)

# (prompt, answer) lengths: unequal, and the third is cut at MAX_LEN mid-answer.
SHAPES = [(5, 7), (3, 4), (6, 14), (4, 2), (7, 5), (2, 9)]


def _tokens(n: int, gen: torch.Generator, vocab: int) -> list[int]:
    return torch.randint(3, vocab, (n,), generator=gen).tolist()  # 0-2 are the special tokens


@pytest.fixture(scope="module")
def rows(tiny_model_dir) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, answer ids) per row, random tokens of the tiny model's vocabulary."""
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(tiny_model_dir).vocab_size
    gen = torch.Generator().manual_seed(0)
    return [(_tokens(p, gen, vocab), _tokens(a, gen, vocab)) for p, a in SHAPES]


def _collate(rows: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded rows, prompts masked with -100, cut at MAX_LEN (as studio's collate lays them out)."""
    seqs = [(p + a)[:MAX_LEN] for p, a in rows]
    width = max(len(s) for s in seqs)
    batch = {
        "input_ids": torch.full((len(rows), width), pad_id),
        "attention_mask": torch.zeros((len(rows), width), dtype=torch.long),
        "labels": torch.full((len(rows), width), IGNORE_INDEX),
    }
    for i, ((prompt, _), seq) in enumerate(zip(rows, seqs)):
        batch["input_ids"][i, : len(seq)] = torch.tensor(seq)
        batch["attention_mask"][i, : len(seq)] = 1
        batch["labels"][i, len(prompt) : len(seq)] = torch.tensor(seq[len(prompt) :])
    return batch


def _load(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def lora_model(tiny_model_dir):
    """The tiny model with a LoRA adapter whose B is not zero (a policy that differs from the
    reference), and TRL's fused LM head patched in as TRL's trainers patch it."""
    from peft import LoraConfig, get_peft_model
    from trl.trainer.utils import add_fused_lm_head

    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    model = get_peft_model(_load(tiny_model_dir), config).eval()  # TRL logs under "eval"
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    add_fused_lm_head(model.get_base_model(), outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    return model


def _diff(a, b) -> float:
    """The largest absolute difference, as a number (no gradient)."""
    return float((torch.as_tensor(a) - torch.as_tensor(b)).detach().abs().max())


def _lora_grads(model) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    assert grads and all(g.abs().sum() > 0 for g in grads.values())
    return grads


def _assert_grads_close(ours: dict, theirs: dict) -> float:
    assert ours.keys() == theirs.keys()
    worst = max(_diff(ours[k], theirs[k]) for k in ours)
    assert worst < TOL, worst
    return worst


class _Accelerator:
    """What TRL's loss methods read from their Accelerator, for one process."""

    device = torch.device("cpu")

    @staticmethod
    def gather(t):
        return t

    gather_for_metrics = gather

    @staticmethod
    def unwrap_model(m):
        return m


def _trainer_stand_in(model, **attrs) -> types.SimpleNamespace:
    return types.SimpleNamespace(
        model=model,
        ref_model=None,
        accelerator=_Accelerator(),
        args=types.SimpleNamespace(gradient_checkpointing_kwargs=None),
        aux_loss_enabled=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
        **attrs,
    )


# -- sequence log-probabilities ------------------------------------------------------------------


def test_sequence_logps_match_trl_full_logits(tiny_model_dir, rows):
    """Per-row sums and counts equal TRL's full-logit computation (selective_log_softmax over the
    shifted logits, masked, summed: ORPOTrainer.get_batch_logps), and so do the gradients."""
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    model = _load(tiny_model_dir)
    assert plain_loss_reason(model) is None  # so sequence_logps takes the labeled-positions path
    batch = _collate(rows, model.config.pad_token_id)
    assert batch["labels"][2, -1] != IGNORE_INDEX  # the cut row is labeled to its last position

    theirs = ORPOTrainer.get_batch_logps(
        model(**{k: batch[k] for k in ("input_ids", "attention_mask")}).logits, batch["labels"]
    )
    theirs.sum().backward()
    their_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    expected_counts = (batch["labels"][:, 1:] != IGNORE_INDEX).sum(1)

    for fn in (sequence_logps, sequence_logps_plain):
        sums, counts = fn(model, **batch)
        assert sums.dtype == torch.float32 and counts.tolist() == expected_counts.tolist()
        assert _diff(sums, theirs) < TOL
        sums.sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad(set_to_none=True)
        _assert_grads_close(grads, their_grads)


def test_sequence_logps_takes_the_full_logits_where_the_head_is_not_plain(tiny_model_dir, rows, monkeypatch):
    model = _load(tiny_model_dir)
    batch = _collate(rows[:2], model.config.pad_token_id)
    calls = []
    monkeypatch.setattr(preference, "sequence_logps_plain", lambda *a: calls.append(a) or ("plain", None))
    model.config.final_logit_softcapping = 30.0  # what Gemma 2 sets: logits change after the layer
    assert sequence_logps(model, **batch)[0] == "plain" and len(calls) == 1


# -- the losses, on log-probabilities ---------------------------------------------------------------


def _leaf(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, requires_grad=True)


def _fake_fused_model(per_token: dict[int, torch.Tensor]):
    """A model for TRL's _compute_loss: returns the given per-token log-probs for a width."""

    def forward(input_ids, labels=None, fused_lm_head=False, **kwargs):
        log_probs = per_token[input_ids.shape[1]]
        zeros = torch.zeros_like(log_probs.detach())
        return types.SimpleNamespace(log_probs=log_probs, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())

    return forward


def _trl_dpo(policy_c, policy_r, ref_c, ref_r, beta):
    """TRL DPOTrainer._compute_loss (loss_type sigmoid) on summed log-probs: a width-2 row whose one
    scored position carries the whole sum, the reference log-probs precomputed."""
    from trl.trainer.dpo_trainer import DPOTrainer

    n = policy_c.shape[0]
    stand_in = _trainer_stand_in(
        types.SimpleNamespace(training=False),
        beta=beta,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=["sigmoid"],
        loss_weights=[1.0],
        label_smoothing=0.0,
        use_weighting=False,
    )
    inputs = {
        "input_ids": torch.ones(2 * n, 2, dtype=torch.long),
        "attention_mask": torch.ones(2 * n, 2, dtype=torch.long),
        "completion_mask": torch.tensor([[0, 1]] * (2 * n)),
        "ref_chosen_logps": ref_c,
        "ref_rejected_logps": ref_r,
    }
    model = _fake_fused_model({2: torch.cat([policy_c, policy_r]).unsqueeze(1)})
    loss = DPOTrainer._compute_loss(stand_in, model, inputs, return_outputs=False)
    return loss, stand_in._metrics["eval"]


def test_dpo_loss_matches_trl():
    beta = 0.1
    values = [[-12.0, -30.5, -3.25, -80.0], [-14.0, -25.0, -3.5, -60.0], [-11.0, -31.0, -4.0, -85.0]]
    policy_c, policy_r = _leaf(values[0]), _leaf(values[1])
    ref_c, ref_r = torch.tensor(values[2]), torch.tensor([-13.0, -26.0, -2.0, -90.0])

    losses, chosen_rewards, rejected_rewards = dpo_loss(policy_c, policy_r, ref_c, ref_r, beta)
    losses.mean().backward()
    ours = (policy_c.grad.clone(), policy_r.grad.clone())
    policy_c.grad = policy_r.grad = None
    assert not chosen_rewards.requires_grad and not rejected_rewards.requires_grad

    theirs, metrics = _trl_dpo(policy_c, policy_r, ref_c, ref_r, beta)
    theirs.backward()
    assert _diff(losses.mean(), theirs) < TOL
    assert _diff(ours[0], policy_c.grad) < TOL
    assert _diff(ours[1], policy_r.grad) < TOL
    assert _diff(chosen_rewards.mean(), metrics["rewards/chosen"][0]) < TOL
    assert _diff(rejected_rewards.mean(), metrics["rewards/rejected"][0]) < TOL
    for i in range(len(losses)):  # each pair's loss alone
        one = [t[i : i + 1].detach() for t in (policy_c, policy_r, ref_c, ref_r)]
        assert _diff(losses[i], _trl_dpo(*one, beta)[0]) < TOL


def test_orpo_loss_matches_trl():
    """Average log-probs on both sides of -ln 2, where TRL's log1mexp switches formulas."""
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    lam = 0.25
    chosen_sums, rejected_sums = _leaf([-2.0, -30.0, -0.9, -0.02]), _leaf([-9.0, -12.0, -0.4, -0.03])
    chosen_counts, rejected_counts = torch.tensor([4, 10, 3, 2]), torch.tensor([5, 6, 2, 1])
    nll = _leaf(1.7)

    losses, chosen_rewards, rejected_rewards, log_odds = orpo_loss(
        chosen_sums, chosen_counts, rejected_sums, rejected_counts, nll, lam
    )
    losses.mean().backward()
    ours = [t.grad.clone() for t in (chosen_sums, rejected_sums, nll)]
    for t in (chosen_sums, rejected_sums, nll):
        t.grad = None

    stand_in = types.SimpleNamespace(beta=lam, accelerator=_Accelerator())
    trl_losses, trl_chosen, trl_rejected, _, trl_log_odds_mean = ORPOTrainer.odds_ratio_loss(
        stand_in, chosen_sums / chosen_counts, rejected_sums / rejected_counts
    )
    (nll - trl_losses.mean()).backward()  # ORPOTrainer.get_batch_loss_metrics: the full ORPO loss
    theirs = [t.grad for t in (chosen_sums, rejected_sums, nll)]

    assert _diff(losses, nll - trl_losses) < TOL
    assert max(_diff(a, b) for a, b in zip(ours, theirs)) < TOL
    assert _diff(chosen_rewards, trl_chosen) < TOL
    assert _diff(rejected_rewards, trl_rejected) < TOL
    assert _diff(log_odds.mean(), trl_log_odds_mean) < TOL


def _trl_kto(policy, ref, kl_policy, kl_ref, desirable, beta, dw, uw):
    """TRL KTOTrainer._compute_loss (loss_type kto) on summed log-probs, reference precomputed."""
    from trl.trainer.kto_trainer import KTOTrainer

    n, m = policy.shape[0], kl_policy.shape[0]
    stand_in = _trainer_stand_in(
        types.SimpleNamespace(training=False),
        beta=beta,
        loss_type="kto",
        desirable_weight=dw,
        undesirable_weight=uw,
        calculate_KL=True,
        precompute_ref_logps=True,
    )
    batch = {  # the KL rows are one wider, so the stand-in model tells the two forwards apart
        "input_ids": torch.ones(n, 2, dtype=torch.long),
        "attention_mask": torch.ones(n, 2, dtype=torch.long),
        "completion_mask": torch.tensor([[0, 1]] * n),
        "KL_input_ids": torch.ones(m, 3, dtype=torch.long),
        "KL_attention_mask": torch.ones(m, 3, dtype=torch.long),
        "KL_completion_mask": torch.tensor([[0, 1, 0]] * m),
        "label": desirable,
        "ref_logps": ref,
        "ref_KL_logps": kl_ref,
    }
    stand_in._compute_kl_logps = types.MethodType(KTOTrainer._compute_kl_logps, stand_in)
    kl_per_token = torch.stack([kl_policy, torch.zeros_like(kl_policy)], dim=1)
    model = _fake_fused_model({2: policy.unsqueeze(1), 3: kl_per_token})
    loss = KTOTrainer._compute_loss(stand_in, model, batch, return_outputs=False)
    return loss, stand_in._metrics["eval"]


@pytest.mark.parametrize("kl_shift", [3.0, -3.0], ids=["kl-positive", "kl-clamped"])
def test_kto_loss_matches_trl(kl_shift):
    beta, dw, uw = 0.1, 1.0, 1.33
    policy = _leaf([-12.0, -30.5, -3.25, -80.0, -41.0])
    ref = torch.tensor([-13.0, -26.0, -2.0, -90.0, -40.0])
    desirable = torch.tensor([True, False, True, False, False])
    kl_ref = torch.tensor([-20.0, -35.0, -7.0, -95.0, -50.0])
    kl_policy = _leaf((kl_ref + kl_shift + torch.tensor([0.5, -0.25, 1.0, 0.0, -0.5])).tolist())

    losses, rewards, kl = kto_loss(policy, ref, kl_policy, kl_ref, desirable, beta, dw, uw)
    losses.mean().backward()
    ours = policy.grad.clone()
    policy.grad = None
    assert kl_policy.grad is None  # the reference point carries no gradient
    assert (kl > 0) == (kl_shift > 0)

    theirs, metrics = _trl_kto(policy, ref, kl_policy, kl_ref, desirable, beta, dw, uw)
    theirs.backward()
    assert _diff(losses.mean(), theirs) < TOL
    assert _diff(ours, policy.grad) < TOL
    assert _diff(kl, metrics["kl"][0]) < TOL
    assert _diff(rewards[desirable].mean(), metrics["rewards/chosen"][0]) < TOL
    assert _diff(rewards[~desirable].mean(), metrics["rewards/rejected"][0]) < TOL


# -- end to end: a LoRA policy, its base as the reference --------------------------------------------


def _reference(model, batch) -> torch.Tensor:
    with torch.no_grad(), model.disable_adapter():
        return sequence_logps(model, **batch)[0]


def test_dpo_end_to_end_matches_trl(lora_model, rows):
    """Our DPO from our log-probs vs TRL's DPOTrainer._compute_loss running the same LoRA model
    (its fused LM head; the reference by disabling the adapter), losses and LoRA gradients."""
    from trl.trainer.dpo_trainer import DPOTrainer

    beta = 0.5
    model = lora_model
    batch = _collate(rows, model.config.pad_token_id)  # pairs: rows (0, 1), (2, 3), (4, 5)
    sums, _ = sequence_logps(model, **batch)
    ref = _reference(model, batch)
    losses, _, _ = dpo_loss(*preference.split_pairs(sums), *preference.split_pairs(ref), beta)
    losses.mean().backward()
    ours = _lora_grads(model)

    # TRL's batch: every chosen row, then every rejected row.
    order = torch.cat([torch.arange(0, len(rows), 2), torch.arange(1, len(rows), 2)])
    inputs = {
        "input_ids": batch["input_ids"][order],
        "attention_mask": batch["attention_mask"][order],
        "completion_mask": (batch["labels"][order] != IGNORE_INDEX).long(),
    }
    stand_in = _trainer_stand_in(
        model,
        beta=beta,
        ld_alpha=None,
        precompute_ref_logps=False,
        f_divergence_type="reverse_kl",
        loss_types=["sigmoid"],
        loss_weights=[1.0],
        label_smoothing=0.0,
        use_weighting=False,
    )
    theirs = DPOTrainer._compute_loss(stand_in, model, inputs, return_outputs=False)
    theirs.backward()
    assert _diff(losses.mean(), theirs) < TOL
    _assert_grads_close(ours, _lora_grads(model))


def test_orpo_end_to_end_matches_trl(lora_model, rows):
    """Our ORPO vs ORPOTrainer.get_batch_loss_metrics on the same LoRA model. TRL's NLL term scores
    the whole chosen row, prompt included: ours is given the same by labeling the whole row."""
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    lam = 0.25
    model = lora_model
    batch = _collate(rows, model.config.pad_token_id)
    sums, counts = sequence_logps(model, **batch)
    chosen_rows = {k: v[0::2] for k, v in batch.items()}
    whole_rows = chosen_rows["input_ids"].masked_fill(chosen_rows["attention_mask"] == 0, IGNORE_INDEX)
    nll_sums, nll_counts = sequence_logps(model, chosen_rows["input_ids"], chosen_rows["attention_mask"], whole_rows)
    nll = -(nll_sums.sum() / nll_counts.sum())
    chosen, rejected = preference.split_pairs(sums)
    chosen_counts, rejected_counts = preference.split_pairs(counts)
    losses, *_ = orpo_loss(chosen, chosen_counts, rejected, rejected_counts, nll, lam)
    losses.mean().backward()
    ours = _lora_grads(model)

    trl_batch = {}
    for side, part in (("chosen", slice(0, None, 2)), ("rejected", slice(1, None, 2))):
        for key in ("input_ids", "attention_mask", "labels"):
            trl_batch[f"{side}_{key}"] = batch[key][part]
    stand_in = types.SimpleNamespace(
        beta=lam, accelerator=_Accelerator(), is_encoder_decoder=False, padding_value=model.config.pad_token_id
    )
    stand_in.aux_loss_enabled = False
    stand_in.concatenated_inputs = ORPOTrainer.concatenated_inputs
    stand_in.get_batch_logps = ORPOTrainer.get_batch_logps
    stand_in.concatenated_forward = types.MethodType(ORPOTrainer.concatenated_forward, stand_in)
    stand_in.odds_ratio_loss = types.MethodType(ORPOTrainer.odds_ratio_loss, stand_in)
    theirs, metrics = ORPOTrainer.get_batch_loss_metrics(stand_in, model, trl_batch)
    theirs.backward()
    assert _diff(losses.mean(), theirs) < TOL
    assert _diff(nll, metrics["nll_loss"]) < TOL
    _assert_grads_close(ours, _lora_grads(model))


def test_kto_end_to_end_matches_trl(lora_model, rows):
    """Our KTO vs KTOTrainer._compute_loss on the same LoRA model, batched by TRL's own collator
    (each prompt's KL row takes the next row's answer, as TRL's dataset cycles them)."""
    from trl.trainer.kto_trainer import DataCollatorForUnpairedPreference, KTOTrainer

    beta, dw, uw = 0.1, 1.0, 1.5
    model = lora_model
    labels = [True, False, False, True, False, True]
    examples = [
        {"prompt_ids": p, "completion_ids": a, "KL_completion_ids": rows[(i + 1) % len(rows)][1], "label": lab}
        for i, ((p, a), lab) in enumerate(zip(rows, labels))
    ]
    batch = DataCollatorForUnpairedPreference(pad_token_id=model.config.pad_token_id, max_length=MAX_LEN)(examples)

    def ours_view(prefix: str) -> dict[str, torch.Tensor]:
        ids, completion = batch[f"{prefix}input_ids"], batch[f"{prefix}completion_mask"]
        return {
            "input_ids": ids,
            "attention_mask": batch[f"{prefix}attention_mask"],
            "labels": ids.masked_fill(completion == 0, IGNORE_INDEX),
        }

    main, mismatched = ours_view(""), ours_view("KL_")
    assert (main["labels"][:, -1] != IGNORE_INDEX).any()  # a row cut at MAX_LEN mid-answer
    policy, _ = sequence_logps(model, **main)
    with torch.no_grad():
        kl_policy, _ = sequence_logps(model, **mismatched)
    losses, _, kl = kto_loss(
        policy, _reference(model, main), kl_policy, _reference(model, mismatched), batch["label"], beta, dw, uw
    )
    losses.mean().backward()
    ours = _lora_grads(model)

    stand_in = _trainer_stand_in(
        model,
        beta=beta,
        loss_type="kto",
        desirable_weight=dw,
        undesirable_weight=uw,
        calculate_KL=True,
        precompute_ref_logps=False,
    )
    stand_in._compute_kl_logps = types.MethodType(KTOTrainer._compute_kl_logps, stand_in)
    theirs = KTOTrainer._compute_loss(stand_in, model, batch, return_outputs=False)
    theirs.backward()
    assert _diff(losses.mean(), theirs) < TOL
    assert _diff(kl, stand_in._metrics["eval"]["kl"][0]) < TOL
    _assert_grads_close(ours, _lora_grads(model))
