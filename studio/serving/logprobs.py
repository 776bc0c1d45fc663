"""Log-probabilities: how the engine scores tokens, and OpenAI's two shapes for them.

A token's log-probability comes from the model's own distribution at its position (before
temperature, top-p or a repetition penalty, as vLLM reports them), through the same adapter
routing and in the same precision as the request's generation, softmaxed in fp32. Prompt tokens
are scored from the prefill's logits (``echo`` with ``logprobs``: lm-evaluation-harness's
loglikelihood requests); the first prompt token has no score (nothing comes before it).

Shapes: the legacy completions object ``{tokens, token_logprobs, top_logprobs, text_offset}``
(``text_offset`` counts characters from the start of the choice's text), and chat's
``{content: [{token, logprob, bytes, top_logprobs}]}``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Scored:
    """One token and its log-probability where it stands, with the likeliest alternatives."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token, logprob), likeliest first


def score(logits: torch.Tensor, targets: list[int], k: int) -> list[Scored]:
    """Score ``targets[i]`` under ``logits[i]`` (one row per position), with the top ``k``.
    The chosen token's number and the alternatives' come from one tensor, so a greedy token
    equals the best alternative exactly (lm-eval's ``is_greedy`` compares them with ``==``)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen = logp.gather(-1, torch.tensor(targets, device=logp.device).unsqueeze(-1)).squeeze(-1).tolist()
    if k:
        values, ids = logp.topk(min(k, logp.shape[-1]), dim=-1)
        tops = [tuple(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
    else:
        tops = [()] * len(targets)
    return [Scored(t, c, top) for t, c, top in zip(targets, chosen, tops)]


class _Pieces:
    """Each token id as text, decoded once per response (special tokens kept: they are tokens)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.seen = tokenizer, {}

    def __call__(self, token: int) -> str:
        if token not in self.seen:
            self.seen[token] = self.tokenizer.decode([token], skip_special_tokens=False)
        return self.seen[token]


def completion_logprobs(
    tokenizer, prompt_ids: list[int], prompt_scores: list[Scored], scores: list[Scored], echo: bool
) -> dict:
    """The legacy completions ``logprobs`` object: the prompt's tokens first when ``echo`` (the
    first with null), then every generated token, the end-of-turn token included (vLLM's and
    OpenAI's count: with ``max_tokens: 1`` there is one entry past the prompt)."""
    piece = _Pieces(tokenizer)
    rows: list[tuple[int, float | None, dict | None]] = []
    if echo:
        rows.append((prompt_ids[0], None, None))
        rows += [(s.token, s.logprob, _top_dict(piece, s)) for s in prompt_scores]
    rows += [(s.token, s.logprob, _top_dict(piece, s)) for s in scores]
    tokens = [piece(t) for t, _, _ in rows]
    offsets, at = [], 0
    for text in tokens:
        offsets.append(at)
        at += len(text)
    return {
        "tokens": tokens,
        "token_logprobs": [lp for _, lp, _ in rows],
        "top_logprobs": [top for _, _, top in rows],
        "text_offset": offsets,
    }


def _top_dict(piece: _Pieces, s: Scored) -> dict[str, float]:
    """``{token text: logprob}`` for the alternatives and the chosen token itself (vLLM's shape).
    Two ids may decode to one text: keep the larger number, so the chosen token is the maximum
    exactly when it is the likeliest."""
    out: dict[str, float] = {}
    for token, value in ((s.token, s.logprob), *s.top):
        text = piece(token)
        out[text] = max(value, out.get(text, value))
    return out


def chat_logprobs(tokenizer, scores: list[Scored], content_tokens: int) -> dict:
    """Chat's ``logprobs`` object for the reply's tokens (the end-of-turn token is not content)."""
    piece = _Pieces(tokenizer)

    def entry(token: int, value: float) -> dict:
        text = piece(token)
        return {"token": text, "logprob": value, "bytes": list(text.encode("utf-8"))}

    content = [
        entry(s.token, s.logprob) | {"top_logprobs": [entry(t, v) for t, v in s.top]} for s in scores[:content_tokens]
    ]
    return {"content": content, "refusal": None}
