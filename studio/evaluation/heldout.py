"""Base vs adapter on a run's held-out rows: loss, perplexity and a few answers side by side.

The held-out rows are rebuilt from the run's own config (same file, mapping, seed and split),
so they are exactly the rows the trainer held out. Both sides run on the playground's one
loaded base (the base side with the adapter disabled), like the chat panes. The result is
stored with the run (``evaluation.json``) and shown on the Chat tab and in the model card.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable

import torch

from studio.data import DataError, prepare
from studio.data.render import IGNORE_INDEX, Example, collate
from studio.inference.playground import Playground, SamplingSettings, split_ref
from studio.runs.registry import Run

BATCH = 4
MAX_ROWS = 200  # enough for a stable loss; a bigger eval split is sampled evenly


def _batches(examples: list[Example], pad_id: int):
    for i in range(0, len(examples), BATCH):
        yield collate(examples[i : i + BATCH], pad_id)


def held_out_rows(run: Run, tokenizer) -> list[Example]:
    """The run's held-out examples, rebuilt from its config. Raises ValueError with the reason
    when they cannot be (imported runs, a deleted data file, no eval split)."""
    status = run.status()
    cfg = run.config()
    if status.imported or not cfg.data.path:
        raise ValueError("This adapter was imported, so its held-out rows are not here; chat with it instead.")
    try:
        rows = prepare(cfg.data, tokenizer, cfg.training.seed).eval
    except DataError as exc:
        raise ValueError(f"The run's data can no longer be read ({exc}); its held-out rows are gone.") from None
    if not rows:
        raise ValueError(
            "This run held out no rows (eval fraction 0 and no eval file), so there is "
            "nothing to evaluate on; set an eval fraction and train again."
        )
    if len(rows) > MAX_ROWS:
        rows = rows[:: math.ceil(len(rows) / MAX_ROWS)]
    return rows


def prompt_and_reference(example: Example) -> tuple[list[int], list[int]]:
    """Split a tokenized row at its first trained token: the prompt as templated in training
    (system prompt and generation prompt included) and the reference answer."""
    first = next(i for i, t in enumerate(example.labels) if t != IGNORE_INDEX)
    return example.input_ids[:first], [t for t in example.labels[first:] if t != IGNORE_INDEX]


def _score(total: float, count: int) -> dict[str, float]:
    loss = total / max(count, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50))}


def evaluate(
    playground: Playground,
    run: Run,
    samples: int = 3,
    max_new_tokens: int = 64,
    progress: Callable[[str], None] = lambda msg: None,
) -> dict[str, Any]:
    """Score base and adapter on the held-out rows, answer ``samples`` of them with both
    (greedy), store the result with the run and return it. The run must be active in the
    playground (``playground.activate``)."""
    if playground.active is None or split_ref(playground.active)[0] != run.id:
        playground.activate(run)
    ref = playground.active  # pinned: another session may activate something else meanwhile
    rows = held_out_rows(run, playground.tokenizer)
    started = time.perf_counter()
    pad = playground.tokenizer.pad_token_id
    pad = pad if pad is not None else playground.tokenizer.eos_token_id
    progress(f"Scoring the base model on {len(rows)} held-out rows...")
    base_total, count = playground.loss(_batches(rows, pad), adapted=False, ref=ref)
    progress(f"Scoring the adapter on {len(rows)} held-out rows...")
    adapted_total, _ = playground.loss(_batches(rows, pad), adapted=True, ref=ref)
    answers = []
    settings = SamplingSettings(max_new_tokens=max_new_tokens)
    tok = playground.tokenizer
    for i, example in enumerate(rows[:samples]):
        progress(f"Answering held-out prompt {i + 1} of {min(samples, len(rows))}...")
        prompt, reference = prompt_and_reference(example)
        ids = torch.tensor([prompt])
        base_text, adapted_text = "", ""
        for base_text, adapted_text in playground.stream_ids(ids, ids, settings, ref):
            pass
        answers.append(
            {
                "prompt": tok.decode(prompt, skip_special_tokens=False),
                "reference": tok.decode(reference, skip_special_tokens=True),
                "base": base_text,
                "adapter": adapted_text,
            }
        )
    result = {
        "ref": ref,
        "rows": len(rows),
        "tokens": count,
        "base": _score(base_total, count),
        "adapter": _score(adapted_total, count),
        "samples": answers,
        "seconds": round(time.perf_counter() - started, 2),
        "at": time.time(),
    }
    if split_ref(ref)[1] is None:  # a checkpoint's scores are not the run's
        run.save_evaluation(result)
    return result


def table_rows(run: Run, result: dict[str, Any] | None = None) -> list[list[Any]]:
    """[[model, loss, perplexity], ...] for the Chat tab and the model card. Uses a stored
    evaluation when there is one, else the losses recorded during training."""
    result = result or run.evaluation()
    if result:
        return [
            [side, round(result[key]["loss"], 4), round(result[key]["perplexity"], 3)]
            for side, key in (("base", "base"), ("adapter", "adapter"))
        ]
    status = run.status()
    out = []
    for side, loss in (("base", status.base_eval_loss), ("adapter", status.eval_loss)):
        if isinstance(loss, (int, float)):
            out.append([side, round(loss, 4), round(math.exp(min(loss, 50)), 3)])
    return out
