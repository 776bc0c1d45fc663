"""Which rows an evaluation scores, and on what: the run's held-out rows (split exactly as its
trainer split them) or an eval file's, each cut into the prompt the model is given and the
reference its answer is scored against.

A chat row is scored on its **last assistant turn given every turn before it** (rendered with the
run's chat template and its generation prompt); a **plain text row** has no question, so it is
scored on continuing its own text: the prompt is its first half (whole words, no template), the
reference its second half. Rows with nothing to score, or a prompt at or over the run's max
length, are skipped and counted.

Example:
    >>> rows, skipped = build_rows(held_out_conversations(run, tokenizer), tokenizer, 512)
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass

from studio.data import DataError, load_and_map, validate
from studio.data.dataset import inspect
from studio.data.render import Conversation
from studio.data.split import split_by_prompt
from studio.data.validate import prompt_key
from studio.runs.registry import Run


@dataclass
class Row:
    """One scored row: the turns (or text) before the scored answer, and that answer."""

    prompt: list[dict[str, str]] | str  # chat turns before the last assistant turn, or a text's first half
    reference: str
    prompt_ids: list[int]
    prompt_text: str  # what the model is given, as rendered


def scored_turn(conv: Conversation) -> tuple[list[dict[str, str]] | str, str] | None:
    """(prompt, reference) for a row: the turns before its last assistant turn and that turn's
    text, or a plain text's first half and second half. None when the row has nothing to score."""
    if isinstance(conv, str):
        words = list(re.finditer(r"\S+", conv))
        if len(words) < 2:
            return None
        at = words[len(words) // 2 - 1].end()  # after the middle word, keeping the text's own spacing
        return conv[:at], conv[at:].strip()
    last = max((i for i, m in enumerate(conv) if m["role"] == "assistant" and m["content"].strip()), default=None)
    if last is None:
        return None
    return conv[:last], conv[last]["content"].strip()


def build_rows(convs: list[Conversation], tokenizer, max_length: int) -> tuple[list[Row], int]:
    """Rows ready to generate from, and how many conversations were skipped (nothing to score,
    or a prompt at or over the run's max length, which training never saw an answer after)."""
    rows, skipped = [], 0
    for conv in convs:
        turn = scored_turn(conv)
        if turn is None:
            skipped += 1
            continue
        prompt, reference = turn
        if isinstance(prompt, str):
            text = prompt
        else:
            text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids or len(ids) >= max_length:
            skipped += 1
            continue
        rows.append(Row(prompt, reference, ids, text))
    return rows, skipped


def held_out_conversations(run: Run, tokenizer) -> list[Conversation]:
    """The run's held-out rows as conversations, split exactly as its trainer split them
    (studio/data/dataset.py: prepare). Raises ValueError with the reason and the fix."""
    cfg = run.config()
    if run.status().imported or not cfg.data.path:
        raise ValueError(
            "This adapter was imported, so its held-out rows are not here; name an eval file "
            "(--eval-path, or upload one) to score it."
        )
    try:
        report = inspect(cfg.data, tokenizer)
    except DataError as exc:
        raise ValueError(f"The run's data can no longer be read ({exc}); name an eval file instead.") from None
    convs = [c for c in report.convs if c is not None]
    if cfg.data.eval_path:
        train_keys = {prompt_key(c) for c in convs}
        held = file_conversations(cfg.data.eval_path, cfg.data.mapping or report.mapping.to_pairs(), tokenizer, cfg)
        held = [c for c in held if prompt_key(c) not in train_keys]  # leaked rows were left out in training too
    else:
        keys = [prompt_key(c) for c in convs]
        _, eval_idx = split_by_prompt(keys, cfg.data.eval_fraction, cfg.data.eval_rows, cfg.training.seed)
        held = [convs[i] for i in eval_idx]
    if not held:
        raise ValueError(
            "This run held out no rows (eval fraction 0 and no eval file), so there is nothing to "
            "score; name an eval file (--eval-path) or set an eval fraction and train again."
        )
    return held


def file_conversations(path: str, mapping: str | list[str], tokenizer, cfg) -> list[Conversation]:
    """An eval file's usable rows, read like the Data tab reads files. Raises ValueError naming
    the file and what is wrong with it (unreadable, columns that map to nothing, no usable row)."""
    try:
        table, column_map = load_and_map(str(path), mapping, cfg.data.max_file_mb)
        report = validate(table, column_map, tokenizer, cfg.data.max_length)
    except DataError as exc:
        raise ValueError(f"The eval file {path} cannot be used: {exc}") from None
    convs = [c for c in report.convs if c is not None]
    if not convs:
        first = report.errors()[0] if report.errors() else None
        why = f" {first.message} {first.fix}" if first else ""
        raise ValueError(f"The eval file {path} has no usable rows.{why}")
    return convs


def eval_set_sha256(rows: list[Row]) -> str:
    """A fingerprint of the scored rows (prompt turns and reference, in any order), so two
    evaluations on the same rows can be found and compared whatever file they came from."""
    items = sorted(json.dumps([r.prompt, r.reference], sort_keys=True, ensure_ascii=False) for r in rows)
    return hashlib.sha256("\n".join(items).encode("utf-8")).hexdigest()


def spread(items: list, n: int) -> list:
    """``n`` items spread evenly over ``items`` (all of them when there are no more than ``n``)."""
    if len(items) <= n:
        return items
    return [items[i * len(items) // n] for i in range(n)]
