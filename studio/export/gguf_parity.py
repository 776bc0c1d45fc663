"""Does the GGUF answer like the model it was made from? Read it back and compare.

The file is read back with transformers (``from_pretrained(..., gguf_file=...)``, which
de-quantises it: an independent reader, not our writer) and run on a few held-out prompts next to
the merged model it was written from. Two questions are kept apart:

1. **Is the file right?** The merged model is run a second time with its weights rounded exactly
   as the file's types round them (gguf-py's own quantise/de-quantise), which is what a correct
   file must give back. The read-back model's logits must equal those up to float32 noise, its
   tokenizer must encode the prompts to the same ids and its chat template must be the run's. A
   wrong layout, head permutation, rope base, norm epsilon or vocabulary shows up here as a
   difference of whole logits; quantisation cannot, so this check is strict for every type.
2. **What did the quantisation cost?** The read-back model against the unrounded merged model:
   the largest logit difference, the mean KL divergence of the next-token distributions, how often
   the top token agrees, and whether the greedy answers are the same. f16 must give the same greedy
   answers; q8_0 must agree on the top token at least ``Q8_TOP1`` of the time. These numbers go
   into the zip's README and the Export tab.
"""

from __future__ import annotations

import gc
from dataclasses import asdict, dataclass, field
from pathlib import Path

from studio.export.gguf_convert import gguf_tensor_name, round_trip

LAYOUT_TOLERANCE = 1e-3  # read-back vs expected, relative to the largest logit: float32 noise is ~1e-6
Q8_TOP1 = 0.9  # q8_0's stated bound: measured 0.98-1.0 on the default model and the tiny test model
MAX_PROMPT_TOKENS = 256
NEW_TOKENS = 24


@dataclass
class PromptResult:
    prompt: str
    answer: str  # the merged model's greedy answer
    gguf_answer: str  # the GGUF's
    same: bool


@dataclass
class Parity:
    """The measured differences between the GGUF (read back) and the merged model."""

    quant: str
    prompts: list[PromptResult] = field(default_factory=list)
    layout_diff: float = 0.0  # read-back vs the merged model rounded like the file, / largest logit
    max_logit_diff: float = 0.0  # read-back vs the merged model
    mean_kl: float = 0.0  # nats per position, merged || read-back
    top1_agreement: float = 1.0  # share of prompt positions whose most likely token agrees
    tokenizer_same: bool = True
    template_same: bool = True
    problems: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.problems

    @property
    def greedy_same(self) -> int:
        return sum(p.same for p in self.prompts)

    @classmethod
    def from_dict(cls, data: dict) -> Parity:
        known = {f for f in cls.__dataclass_fields__}
        fields = {k: v for k, v in data.items() if k in known and k != "prompts"}
        return cls(**fields, prompts=[PromptResult(**p) for p in data.get("prompts", [])])

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed, "greedy_same": self.greedy_same}

    def summary(self) -> str:
        """One line for the Export tab and the README."""
        return (
            f"{self.quant}: same greedy answer on {self.greedy_same} of {len(self.prompts)} held-out prompts; "
            f"top token agrees at {self.top1_agreement:.1%} of positions; mean KL {self.mean_kl:.2g} nats; "
            f"largest logit difference {self.max_logit_diff:.3g}; file layout exact to {self.layout_diff:.1e}"
        )


def _logits(model, prompts: list[list[int]]):
    import torch

    with torch.no_grad():
        return [model(torch.tensor([ids])).logits[0].float() for ids in prompts]


def _greedy(model, prompts: list[list[int]], stop_ids: list[int]) -> list[list[int]]:
    import torch

    out = []
    with torch.no_grad():
        for ids in prompts:
            gen = model.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=NEW_TOKENS,
                do_sample=False,
                eos_token_id=stop_ids or None,
                pad_token_id=stop_ids[0] if stop_ids else 0,
            )
            out.append(gen[0, len(ids) :].tolist())
    return out


def _round_like_file(model, arch: str, quant: str) -> None:
    """Round the model's weights in place exactly as the file's tensor types round them."""
    import torch

    n_layers = model.config.num_hidden_layers
    with torch.no_grad():
        for name, param in model.named_parameters():
            rounded = round_trip(param.detach().float().numpy(), gguf_tensor_name(arch, n_layers, name), quant)
            param.copy_(torch.from_numpy(rounded).to(param.dtype))


def check(
    merged_dir: str | Path,
    gguf_path: str | Path,
    arch: str,
    quant: str,
    prompts: list[list[int]],
    stop_ids: list[int],
    chat_template: str | None,
) -> Parity:
    """Compare the GGUF at ``gguf_path`` with the saved model in ``merged_dir`` on ``prompts``
    (token ids, as training templated them)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    prompts = [ids[-MAX_PROMPT_TOKENS:] for ids in prompts if ids]
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    parity = Parity(quant)

    model = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    reference = _logits(model, prompts)
    answers = _greedy(model, prompts, stop_ids)
    _round_like_file(model, arch, quant)
    expected = _logits(model, prompts)
    del model
    gc.collect()

    read_back = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    read_back.eval()
    actual = _logits(read_back, prompts)
    gguf_answers = _greedy(read_back, prompts, stop_ids)
    del read_back
    gc.collect()
    gguf_tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)

    scale = max(float(r.abs().max()) for r in reference)
    parity.layout_diff = max(float((a - e).abs().max()) for a, e in zip(actual, expected)) / scale
    parity.max_logit_diff = max(float((a - r).abs().max()) for a, r in zip(actual, reference))
    ref_logp = torch.cat([r.log_softmax(-1) for r in reference])
    act_logp = torch.cat([a.log_softmax(-1) for a in actual])
    parity.mean_kl = float((ref_logp.exp() * (ref_logp - act_logp)).sum(-1).mean())
    parity.top1_agreement = float((ref_logp.argmax(-1) == act_logp.argmax(-1)).float().mean())

    texts = [tokenizer.decode(ids) for ids in prompts]
    parity.tokenizer_same = all(
        tokenizer(t, add_special_tokens=False)["input_ids"] == gguf_tokenizer(t, add_special_tokens=False)["input_ids"]
        for t in texts
    )
    parity.template_same = (gguf_tokenizer.chat_template or None) == (chat_template or None)
    for text, a, b in zip(texts, answers, gguf_answers):
        parity.prompts.append(
            PromptResult(
                text,
                tokenizer.decode(a, skip_special_tokens=True),
                tokenizer.decode(b, skip_special_tokens=True),
                a == b,
            )
        )

    if parity.layout_diff > LAYOUT_TOLERANCE:
        parity.problems.append(
            f"read back, the file's logits differ from what its {quant} rounding explains by "
            f"{parity.layout_diff:.1e} of the largest logit (allowed {LAYOUT_TOLERANCE:g}): the file is wrong"
        )
    if not parity.tokenizer_same:
        parity.problems.append("the file's tokenizer splits the held-out prompts differently from the run's")
    if not parity.template_same:
        parity.problems.append("the chat template stored in the file is not the run's")
    if quant == "f16" and parity.greedy_same < len(parity.prompts):
        parity.problems.append(
            f"f16 gave a different greedy answer on {len(parity.prompts) - parity.greedy_same} of "
            f"{len(parity.prompts)} prompts"
        )
    if quant == "q8_0" and parity.top1_agreement < Q8_TOP1:
        parity.problems.append(
            f"q8_0 agrees on the top token at only {parity.top1_agreement:.1%} of positions (bound {Q8_TOP1:.0%})"
        )
    return parity
