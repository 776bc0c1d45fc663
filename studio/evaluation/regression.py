"""General regression without a download: how far the adapter moved from the base outside its task.

A fine-tune should change the task's answers and little else. This measures the "little else" on
a small prompt set shipped with the package (``general_prompts.jsonl``: 100 short instructions
written for this project, 13 kinds: explanations, arithmetic, rewriting, lists, code, advice,
facts, formatting, translation, summaries, classification, creative, reasoning):

1. The base answers each prompt greedily (the run's chat template and its generation prompt,
   through the serving engine like the task's rows); the adapter answers too.
2. **KL**: the base's exact answer tokens (its end of turn included) are teacher-forced through
   the base (adapters off) and the adapter, and KL(base || adapter) over the full vocabulary is
   averaged over those tokens (fp32 math on the logits). 0 means the adapter predicts the base's
   own answers exactly as the base does. Interval: bootstrap over prompts.
3. **Changed answers**: the share of prompts whose adapter answer keeps less than half of the
   base's answer (ROUGE-L F below :data:`CHANGED_ROUGE_L`), with a Wilson interval.

The sentence calls the movement small, moderate or large by the KL thresholds below.

Example:
    >>> result = measure_regression(sides, tokenizer, task.generate, prompts=20)
    >>> result["kl_per_token"], result["changed_share"], result["sentence"]
"""

from __future__ import annotations

import importlib.resources
import json
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

from studio.evaluation.metrics import metric_by_name
from studio.evaluation.stats import bootstrap_ci
from studio.inference.playground import SamplingSettings
from studio.planning import precision
from studio.serving.engine import Engine

__all__ = ["GeneralPrompt", "general_prompts", "level", "measure_regression", "sentence", "summarise", "token_kl"]

PROMPTS_FILE = "general_prompts.jsonl"  # package data next to this module (pyproject.toml)
MAX_NEW_TOKENS = 48  # every prompt is answerable in 32-64 tokens; a cut answer is still a fair sample
FORCE_BATCH = 4  # answers teacher-forced per forward (logits: batch x length x vocab floats)

# Thresholds, in nats per answer token, from LoRA adapters of SmolLM2-135M (the default model)
# measured by benchmarks/regression.py (docs/numbers.md; 40-100 prompts, KL -> answers changed):
#   instructions sample, lr 1e-4: 5 steps 0.002 -> 12%, 10 steps 0.011 -> 33%, 20 steps 0.02 -> 49%
#   chat sample, lr 1e-3: 10 steps 0.13 -> 85%, 20 steps 0.22 -> 93%
#   instructions sample, lr 1e-3, 20 steps: 1.29 -> 91% ("ANSWER: ..." on every prompt)
# A small model's greedy answers fork at near-ties, so even 5 barely-trained steps change about
# one answer in eight: below 0.01 that is all that happens. By 0.1 most answers change. Rounding
# stays far below 0.01: the base in bf16 against itself in fp32 gives 0.0007 (autocast) to 0.001
# (bf16 weights), so a full fine-tune decoded in another precision than its base is not moved by it.
KL_SMALL = 0.01
"""Below this the adapter behaves like the base outside the task."""
KL_LARGE = 0.1
"""Above this it answers most general prompts differently: check they are still what you need."""
DEFAULT_PROMPTS = 30
"""Of the bundled 100, spread over their kinds: about a minute on the default model on a 2-core
CPU (100 take 3-4 minutes there); ask for all 100 when the interval should be narrower."""
CHANGED_MANY = 0.3
"""A share of changed answers this high contradicts "behaves like the base" even when the KL is
small: the sentence then says the answers forked at near-ties (a tiny or undertrained base's
greedy answers do), rather than calling the adapter unchanged."""
CHANGED_ROUGE_L = 0.5
"""An adapter answer that keeps less than half of the base's answer (ROUGE-L F1 against it)
changed materially; rewordings and small edits of the same answer score above it."""

# task.py's generate(sides, rows, settings, progress, stop), passed in: task.py imports this module.
Generate = Callable[..., list]


@dataclass(frozen=True)
class GeneralPrompt:
    """One bundled instruction: ``explain-01`` of kind ``explain``, and its text."""

    id: str
    category: str
    prompt: str


@dataclass
class PromptRow:
    """A general prompt as the engine takes it (the shape task.generate reads: ``prompt_ids``)."""

    prompt: GeneralPrompt
    prompt_ids: list[int]


def general_prompts(n: int | None = None) -> list[GeneralPrompt]:
    """The bundled prompts; ``n`` of them spread evenly over the file (which is grouped by kind,
    so a few still cover most kinds). Raises ValueError for ``n`` below 1."""
    if n is not None and n < 1:
        raise ValueError(f"The number of general prompts must be at least 1 (got {n}); 0 means skip the check.")
    text = (importlib.resources.files("studio.evaluation") / PROMPTS_FILE).read_text(encoding="utf-8")
    prompts = [GeneralPrompt(**json.loads(line)) for line in text.splitlines() if line.strip()]
    if n is None or n >= len(prompts):
        return prompts
    return [prompts[i * len(prompts) // n] for i in range(n)]


# ---- the numbers ------------------------------------------------------------------------------
def token_kl(base_log_probs: torch.Tensor, adapter_log_probs: torch.Tensor) -> torch.Tensor:
    """KL(base || adapter) at each position, in nats, from log-probabilities over the vocabulary
    (last dimension), computed in fp32. A token the base rules out (log-prob -inf) adds nothing."""
    p, q = base_log_probs.float(), adapter_log_probs.float()
    terms = torch.where(torch.isneginf(p), torch.zeros_like(p), p.exp() * (p - q))
    return terms.sum(-1).clamp(min=0.0)  # rounding can leave -1e-9 where the two agree


def _kl_interval(kl_sums: np.ndarray, tokens: np.ndarray, resamples: int = 2000, seed: int = 0) -> list[float]:
    """95% bootstrap interval over prompts of the pooled per-token KL (sum of KL / sum of tokens)."""
    if len(kl_sums) < 2:
        value = float(kl_sums.sum() / max(tokens.sum(), 1))
        return [value, value]
    idx = np.random.default_rng(seed).integers(0, len(kl_sums), size=(resamples, len(kl_sums)))
    ratios = kl_sums[idx].sum(1) / np.maximum(tokens[idx].sum(1), 1)
    lo, hi = np.percentile(ratios, [2.5, 97.5])
    return [float(lo), float(hi)]


def level(kl_per_token: float) -> str:
    """``small``, ``moderate`` or ``large``: where the KL falls between the thresholds."""
    if kl_per_token < KL_SMALL:
        return "small"
    return "moderate" if kl_per_token <= KL_LARGE else "large"


def sentence(kl_per_token: float, changed_share: float, prompts: int) -> str:
    """The result in words, the thresholds explained."""
    forked = level(kl_per_token) == "small" and changed_share >= CHANGED_MANY
    opening = {
        "small": "Outside your task the adapter behaves like the base",
        "moderate": "Outside your task the adapter has moved somewhat from the base",
        "large": "Outside your task the adapter answers differently from the base",
    }[level(kl_per_token)]
    if forked:
        opening = "Outside your task the adapter's probabilities barely moved from the base's"
    changed = round(changed_share * prompts)
    text = (
        f"{opening}: KL {kl_per_token:.3f} nats/token on the base's own answers to {prompts} general "
        f"prompts (below {KL_SMALL} is small, above {KL_LARGE} large), and {changed} of {prompts} "
        f"answers ({changed_share:.0%}) changed materially (kept less than half of the base's "
        f"answer, ROUGE-L below {CHANGED_ROUGE_L})."
    )
    if forked:
        text += (
            " Many answers changed anyway: the base's answers to these prompts hinge on near-ties between "
            "tokens, so a small nudge forks them; read the answers that changed most."
        )
    if level(kl_per_token) == "large":
        text += " Read the answers that changed most before using it outside the task."
    return text


def summarise(kl_sums: Sequence[float], tokens: Sequence[int], similarity: Sequence[float]) -> dict[str, Any]:
    """The regression numbers from per-prompt KL sums, answer token counts and the ROUGE-L of
    each adapter answer against the base's."""
    kl_arr, tok_arr = np.asarray(kl_sums, dtype=np.float64), np.asarray(tokens, dtype=np.float64)
    if kl_arr.size == 0:
        raise ValueError("No general prompts were answered; ask for at least one.")
    kl = float(kl_arr.sum() / max(tok_arr.sum(), 1.0))
    changed = [1.0 if s < CHANGED_ROUGE_L else 0.0 for s in similarity]
    share = sum(changed) / len(changed)
    return {
        "kl_per_token": kl,
        "kl_ci95": _kl_interval(kl_arr, tok_arr),
        "changed_share": share,
        "changed_ci95": [float(x) for x in bootstrap_ci(changed)],
        "prompts": len(changed),
        "tokens": int(tok_arr.sum()),
        "level": level(kl),
        "sentence": sentence(kl, share, len(changed)),
        "thresholds": {"kl_small": KL_SMALL, "kl_large": KL_LARGE, "changed_rouge_l": CHANGED_ROUGE_L},
    }


# ---- teacher forcing --------------------------------------------------------------------------
@torch.no_grad()
def _answer_log_probs(
    engine: Engine, ref: str | None, sequences: list[list[int]], starts: list[int]
) -> list[torch.Tensor]:
    """Per sequence (prompt + answer tokens), the fp32 log-probabilities the side ``ref`` gives
    at each answer position ([answer tokens, vocab]): the forward the engine's own decoding
    would run (same base load, adapter and precision), one batch under the playground's lock."""
    load, prepare = engine.resolve(ref)
    with engine.playground.serving(load) as pg:
        name = prepare(pg)
        width = max(len(s) for s in sequences)
        pad = pg.tokenizer.pad_token_id if pg.tokenizer.pad_token_id is not None else 0
        ids = torch.full((len(sequences), width), pad, dtype=torch.long)
        mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for i, seq in enumerate(sequences):  # right padding: positions count from 0 as in decoding
            ids[i, : len(seq)] = torch.tensor(seq)
            mask[i, : len(seq)] = 1
        with pg.one_adapter(name), precision.autocast(pg.device, load.precision):
            logits = pg.model(input_ids=ids.to(pg.device), attention_mask=mask.to(pg.device)).logits
        # The logits at position t predict token t + 1: an answer starting at ``start`` is read
        # from start - 1 to its second-to-last token.
        return [
            torch.log_softmax(logits[i, start - 1 : len(seq) - 1].float(), dim=-1).cpu()
            for i, (seq, start) in enumerate(zip(sequences, starts))
        ]


def _kl_sums(sides: list[tuple[Engine, str | None]], rows: list[PromptRow], answers: list[list[int]]) -> list[float]:
    """Summed KL(base || adapter) over each base answer's tokens, one forward per side."""
    sequences = [row.prompt_ids + answer for row, answer in zip(rows, answers)]
    starts = [len(row.prompt_ids) for row in rows]
    base = _answer_log_probs(*sides[0], sequences, starts)
    tuned = _answer_log_probs(*sides[1], sequences, starts)
    return [float(token_kl(p, q).sum()) for p, q in zip(base, tuned)]


# ---- the measurement --------------------------------------------------------------------------
def measure_regression(
    sides: list[tuple[Engine, str | None]],
    tokenizer,
    generate: Generate,
    *,
    prompts: int | None = None,
    max_new_tokens: int = MAX_NEW_TOKENS,
    progress: Callable[[int, int, float | None], None] | None = None,
    stop: threading.Event | None = None,
) -> dict[str, Any]:
    """Base and adapter answer the general prompts; how far the adapter moved (module docstring).

    Args:
        sides: (engine, ref) for the base and the adapter, as studio/evaluation/task.py builds them.
        tokenizer: the run's (its chat template renders each prompt).
        generate: task.py's ``generate``: answers rows through the engines, raises
            EvaluationStopped when ``stop`` is set and ValueError when a batch fails.
        prompts: how many of the bundled prompts (default: DEFAULT_PROMPTS, spread over their kinds).
        progress: ``(prompts done, prompts, seconds left or None)``.

    Returns:
        ``kl_per_token``, ``kl_ci95``, ``changed_share``, ``changed_ci95``, ``prompts``,
        ``tokens``, ``level``, ``sentence``, ``thresholds``, ``max_new_tokens``, ``seconds`` and
        ``most_changed`` (the three adapter answers furthest from the base's: lowest ROUGE-L
        against it, then highest KL per token).
    """
    started = time.perf_counter()
    chosen = general_prompts(DEFAULT_PROMPTS if prompts is None else prompts)
    rows = []
    for gp in chosen:
        messages = [{"role": "user", "content": gp.prompt}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        rows.append(PromptRow(gp, tokenizer(text, add_special_tokens=False)["input_ids"]))
    settings = SamplingSettings(max_new_tokens=max_new_tokens)
    # Longest first, as generate orders them, so a chunk's rows pad little in the teacher-forced pass.
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i].prompt_ids))
    texts: dict[int, tuple[str, str]] = {}
    kl_sums: dict[int, float] = {}
    tokens: dict[int, int] = {}
    if progress is not None:
        progress(0, len(rows), None)
    # Answer and teacher-force a chunk at a time: the base's answers never wait in memory for the
    # whole set, ``generate`` checks Stop before each chunk, and the estimate counts both passes.
    for at in range(0, len(order), FORCE_BATCH):
        chunk = order[at : at + FORCE_BATCH]
        answered = generate(sides, [rows[i] for i in chunk], settings, None, stop)
        base_ids = [list(pair[0].output_ids) for pair in answered]  # the end of turn included
        sums = _kl_sums(sides, [rows[i] for i in chunk], base_ids)
        for i, pair, ids, kl in zip(chunk, answered, base_ids, sums):
            texts[i] = (pair[0].text.strip(), pair[1].text.strip())
            kl_sums[i], tokens[i] = kl, len(ids)
        if progress is not None:
            done = at + len(chunk)
            per_prompt = (time.perf_counter() - started) / done
            progress(done, len(rows), per_prompt * (len(rows) - done))
    rouge = metric_by_name("rouge_l")
    similarity = [rouge.score(texts[i][1], texts[i][0]) for i in range(len(rows))]
    result = summarise([kl_sums[i] for i in range(len(rows))], [tokens[i] for i in range(len(rows))], similarity)
    furthest = sorted(range(len(rows)), key=lambda i: (similarity[i], -kl_sums[i] / max(tokens[i], 1)))[:3]
    result["most_changed"] = [
        {
            "id": rows[i].prompt.id,
            "prompt": rows[i].prompt.prompt,
            "base": texts[i][0],
            "adapter": texts[i][1],
            "kl_per_token": kl_sums[i] / max(tokens[i], 1),
            "rouge_l": similarity[i],
        }
        for i in furthest
    ]
    result["max_new_tokens"] = max_new_tokens
    result["seconds"] = round(time.perf_counter() - started, 2)
    return result
