"""Checks for supervised rows, and the one entry point for every kind of data: ``validate``.

What a report holds (findings with row numbers and fixes, token statistics) is in
studio/data/report.py; preference data (pairs, feedback) is checked in
studio/data/preference_checks.py. Checks run column-wise with pandas where they can, so a
100k-row file validates in seconds.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from studio.data.detect import DataMapping, PreferenceMapping
from studio.data.load import Table
from studio.data.preference_checks import validate_preference
from studio.data.render import Conversation, conversations, parse_messages
from studio.data.report import DataReport, Finding, LengthStats, add_duplicates, add_finding, check_text
from studio.data.tokens import TokenCounter

__all__ = ["DataReport", "Finding", "LengthStats", "first_reply", "prompt_key", "token_lengths", "validate"]

FEW_ROWS = 200


def prompt_key(conv: Conversation) -> str:
    """What makes two rows "the same prompt": the text before the first reply, normalised."""
    if isinstance(conv, str):
        return " ".join(conv.split()).lower()
    before = []
    for m in conv:
        if m["role"] == "assistant":
            break
        before.append(m["content"])
    return " ".join(" ".join(before).split()).lower()


def first_reply(conv: Conversation) -> str:
    if isinstance(conv, str):
        return conv
    return next((m["content"].strip() for m in conv if m["role"] == "assistant"), "")


def validate(table: Table, mapping: DataMapping, tokenizer=None, max_length: int = 512) -> DataReport:
    """Check every row; with a tokenizer also count token lengths against max_length. Preference
    data (``mapping.kind`` pairs or feedback) gets its own checks (:func:`validate_preference`)."""
    if isinstance(mapping, PreferenceMapping):
        return validate_preference(table, mapping, tokenizer, max_length)
    df = table.df
    findings: list[Finding] = []
    convs = conversations(df, mapping)
    usable = np.array([c is not None for c in convs], dtype=bool)
    cells = {
        role: df[col].map(lambda v: "" if v is None or (isinstance(v, float) and np.isnan(v)) else str(v))
        for role, col in mapping.roles().items()
    }
    required = [r for r in ("prompt", "response", "text") if r in cells]

    # Empty, whitespace-only and unreadable cells.
    if required:
        raw_empty = np.zeros(len(df), bool)
        ws_only = np.zeros(len(df), bool)
        for role in required:
            raw_empty |= cells[role].eq("").to_numpy()
            ws_only |= (cells[role].ne("") & cells[role].str.strip().eq("")).to_numpy()
        names = " or ".join(f"`{mapping.roles()[r]}`" for r in required)
        add_finding(
            findings,
            "warning",
            "empty_cells",
            raw_empty,
            "{n} rows have an empty " + names + " cell and will be skipped.",
            "Fill in those cells or delete the rows.",
        )
        add_finding(
            findings,
            "warning",
            "whitespace_cells",
            ws_only & ~raw_empty,
            "{n} rows have a " + names + " cell holding only spaces or line breaks; they will be skipped.",
            "Fill in those cells or delete the rows.",
        )
    if mapping.format == "messages":
        problems = [parse_messages(v)[1] for v in df[mapping.messages].tolist()]
        add_finding(
            findings,
            "warning",
            "invalid_json",
            np.array([p == "invalid_json" for p in problems]),
            f"{{n}} rows have a `{mapping.messages}` cell that is not a JSON list of "
            "{{role, content}} (or {{from, value}}) turns; they will be skipped.",
            'Write each cell as [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}].',
        )
        add_finding(
            findings,
            "warning",
            "bad_roles",
            np.array([p == "bad_roles" for p in problems]),
            "{n} rows have unknown roles or turns that do not alternate user/assistant (after an "
            "optional system turn), or no assistant reply; they will be skipped.",
            "Use the roles system, user and assistant, alternate user and assistant, and end with an assistant reply.",
        )

    # Duplicates and contradictions, among rows we would train on.
    dup = add_duplicates(findings, df, mapping.columns(), usable)
    if mapping.format != "text":
        keys = pd.Series([prompt_key(c) if c is not None else None for c in convs])
        replies = pd.Series([first_reply(c) if c is not None else None for c in convs])
        frame = pd.DataFrame({"key": keys, "reply": replies})[usable & ~dup]
        n_replies = frame.groupby("key")["reply"].transform("nunique")
        conflict = np.zeros(len(df), bool)
        conflict[frame.index[n_replies > 1].to_numpy()] = True
        add_finding(
            findings,
            "warning",
            "conflicting_answers",
            conflict,
            "{n} rows share a prompt with another row but give a different answer; the model "
            "will learn a blend of them.",
            "Keep one answer per prompt, or make the prompts say what differs.",
        )

    check_text(findings, cells, len(df))

    stats = None
    if tokenizer is not None and usable.any():
        lengths, prompt_lengths = token_lengths([c for c in convs if c is not None], tokenizer)
        stats = LengthStats(lengths, max_length)
        long_rows = np.zeros(len(df), bool)
        long_rows[np.flatnonzero(usable)[lengths > max_length]] = True
        no_room = np.zeros(len(df), bool)
        no_room[np.flatnonzero(usable)[prompt_lengths >= max_length]] = True
        add_finding(
            findings,
            "warning",
            "too_long",
            long_rows & ~no_room,
            f"{{n}} rows are longer than the max length of {max_length} tokens; their ends will be cut "
            f"({stats.cut_share:.1%} of all tokens), so the model never sees how those answers finish.",
            f"Raise max length (the longest row has {int(lengths.max())} tokens) or shorten those rows.",
        )
        add_finding(
            findings,
            "warning",
            "prompt_too_long",
            no_room,
            f"{{n}} rows have a prompt of {max_length} tokens or more, leaving no room for the answer; "
            "they will be skipped.",
            "Raise max length or shorten those prompts.",
        )
        convs = [None if no_room[i] else c for i, c in enumerate(convs)]

    n_usable = sum(c is not None for c in convs)
    if n_usable == 0:
        findings.insert(
            0,
            Finding(
                "error",
                "no_usable_rows",
                "No row can be trained on.",
                "Fix the problems listed below, or check the column mapping.",
            ),
        )
    elif n_usable < FEW_ROWS:
        findings.append(
            Finding(
                "warning",
                "few_rows",
                f"Only {n_usable} usable rows: the model will learn the format but little else.",
                f"Aim for at least {FEW_ROWS} examples, ideally a few thousand.",
            )
        )
    return DataReport(table, mapping, findings, convs, stats)


def token_lengths(convs: list[Conversation], tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """(total, prompt) token counts per conversation, as the chat template renders them.

    Template text and message contents are counted apart and added: the template's pieces are
    counted once per sequence of roles, the contents in one batch. Special tokens separate
    them, so the sum equals tokenizing the rendered text (tests check this).
    """
    counter = TokenCounter(tokenizer)
    contents: list[str] = []
    owners: list[int] = []
    before_reply: list[bool] = []
    shapes: list[tuple[str, ...]] = []
    for i, conv in enumerate(convs):
        if isinstance(conv, str):  # plain text: every token is trained, there is no prompt
            contents.append(conv)
            owners.append(i)
            before_reply.append(False)
            shapes.append(("text",))
            continue
        seen_reply = False
        for m in conv:
            seen_reply |= m["role"] == "assistant"
            contents.append(m["content"])
            owners.append(i)
            before_reply.append(not seen_reply)
        shapes.append(tuple(m["role"] for m in conv))
    counts = counter.count(contents)
    owners_arr = np.asarray(owners, dtype=np.int64)
    totals = np.bincount(owners_arr, weights=counts, minlength=len(convs)).astype(np.int64)
    prompts = np.bincount(owners_arr, weights=counts * np.asarray(before_reply), minlength=len(convs)).astype(np.int64)
    cache: dict[tuple[str, ...], tuple[int, int]] = {}
    for i, shape in enumerate(shapes):
        if shape not in cache:
            cache[shape] = _template_overhead(shape, tokenizer)
        full, prompt = cache[shape]
        totals[i] += full
        prompts[i] += prompt
    return totals, prompts


def _template_overhead(shape: tuple[str, ...], tokenizer) -> tuple[int, int]:
    """Tokens the template adds around contents: for the whole conversation, and up to (and
    including) the generation prompt of the first reply. Plain text (its own shape) gets EOS."""

    def n(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    if shape == ("text",):
        return n(tokenizer.eos_token or ""), 0
    empty = [{"role": r, "content": ""} for r in shape]
    first = shape.index("assistant") if "assistant" in shape else len(shape)
    full = n(tokenizer.apply_chat_template(empty, tokenize=False))
    prompt = n(tokenizer.apply_chat_template(empty[:first], tokenize=False, add_generation_prompt=True))
    return full, prompt
