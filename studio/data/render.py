"""Turn table rows into chat messages, then into token ids with labels on the trained tokens.

Rows become messages rendered by the tokenizer's own chat template, so training sees exactly
what chat will send. Labels cover only the assistant's replies (prompt tokens get -100); for
plain text every token is trained on. Masking is done by character spans of the rendered text
mapped through the tokenizer's offsets, which works for any template (TRL's
``assistant_only_loss`` needs ``{% generation %}`` markers most templates lack).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass

import pandas as pd

from studio.data.detect import ColumnMapping

IGNORE_INDEX = -100
ROLE_ALIASES = {"human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant", "chatgpt": "assistant"}
VALID_ROLES = ("system", "user", "assistant")

Conversation = list[dict[str, str]] | str  # chat messages, or plain text


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    truncated: bool = False

    @property
    def trained_tokens(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE_INDEX)

    @property
    def tokens(self) -> int:
        return len(self.input_ids)

    def rows(self) -> list["Example"]:
        """The batch rows this example fills: itself (a PairExample fills two)."""
        return [self]

    @functools.cached_property
    def targets(self) -> int:
        """Positions scored in training: labeled tokens after the first (each predicts the next).
        Cached: every training step adds up its examples' counts."""
        return sum(1 for t in self.labels[1:] if t != IGNORE_INDEX)


@dataclass
class PairExample:
    """A preference pair: one prompt answered two ways, each side an Example whose labels cover
    only its answer. A batch holds both sides as consecutive rows (chosen, then rejected), so one
    forward scores both (studio/training/preference.py)."""

    chosen: Example
    rejected: Example

    @property
    def input_ids(self) -> list[int]:
        """The longer side: a padded row pair is as wide as it (what batching sorts by)."""
        return max(self.chosen.input_ids, self.rejected.input_ids, key=len)

    @property
    def labels(self) -> list[int]:
        return self.chosen.labels if self.input_ids is self.chosen.input_ids else self.rejected.labels

    @property
    def truncated(self) -> bool:
        return self.chosen.truncated or self.rejected.truncated

    @property
    def tokens(self) -> int:
        return len(self.chosen.input_ids) + len(self.rejected.input_ids)

    @property
    def trained_tokens(self) -> int:
        return self.chosen.trained_tokens + self.rejected.trained_tokens

    @property
    def targets(self) -> int:
        return self.chosen.targets + self.rejected.targets

    def rows(self) -> list[Example]:
        return [self.chosen, self.rejected]


def labeled_tokens(batch: dict) -> int:
    """Tokens a batch is scored on: labeled positions after the first (each predicts the next)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def collate(examples: list[Example], pad_id: int) -> dict:
    """A batch padded to its own longest row: input_ids, attention_mask and labels tensors."""
    import torch

    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _cell(value) -> str:
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return ""
    return str(value).strip()


def parse_messages(value) -> tuple[list[dict[str, str]] | None, str | None]:
    """Chat turns from a cell (a list, or a JSON string of one): (messages, None) or (None, problem)
    where problem is ``invalid_json`` or ``bad_roles``."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return None, "invalid_json"
    if hasattr(value, "tolist"):  # numpy arrays from parquet
        value = value.tolist()
    if not isinstance(value, list) or not value:
        return None, "invalid_json"
    out = []
    for m in value:
        if not isinstance(m, dict):
            return None, "invalid_json"
        role = m.get("role", m.get("from"))
        content = m.get("content", m.get("value"))
        if not isinstance(role, str) or content is None:
            return None, "invalid_json"
        role = ROLE_ALIASES.get(role.strip().lower(), role.strip().lower())
        out.append({"role": role, "content": str(content)})
    turns = out[1:] if out[0]["role"] == "system" else out
    expected = ["user", "assistant"] * len(turns)
    if any(m["role"] not in VALID_ROLES for m in out) or [m["role"] for m in turns] != expected[: len(turns)]:
        return None, "bad_roles"
    if not any(m["role"] == "assistant" and m["content"].strip() for m in turns):
        return None, "bad_roles"
    return out, None


def conversations(df: pd.DataFrame, mapping: ColumnMapping) -> list[Conversation | None]:
    """Each row as chat messages (or plain text); None where the row cannot be used.
    Aligned with ``df``'s rows, so callers can report row numbers."""

    def col(name):
        return df[name].tolist() if name else [None] * len(df)

    out: list[Conversation | None] = []
    if mapping.format == "text":
        return [_cell(t) or None for t in col(mapping.text)]
    systems = [_cell(s) for s in col(mapping.system)]
    if mapping.format == "messages":
        for value, system in zip(col(mapping.messages), systems):
            msgs, _ = parse_messages(value)
            if msgs and system and msgs[0]["role"] != "system":
                msgs = [{"role": "system", "content": system}] + msgs
            out.append(msgs)
        return out
    for prompt, context, response, system in zip(
        col(mapping.prompt), col(mapping.input), col(mapping.response), systems
    ):
        prompt, context, response = _cell(prompt), _cell(context), _cell(response)
        if not prompt or not response:
            out.append(None)
            continue
        msgs = [{"role": "system", "content": system}] if system else []
        user = f"{prompt}\n\n{context}" if context else prompt
        out.append(msgs + [{"role": "user", "content": user}, {"role": "assistant", "content": response}])
    return out


def rows_to_messages(df: pd.DataFrame, mapping: ColumnMapping) -> list[Conversation]:
    """Every usable row, converted; unusable rows (empty cells, bad JSON) are left out."""
    return [c for c in conversations(df, mapping) if c is not None]


def render_with_spans(conv: Conversation, tokenizer) -> tuple[str, list[tuple[int, int]]]:
    """The exact text the model sees and the character spans that are trained on."""
    if isinstance(conv, str):
        text = conv + (tokenizer.eos_token or "")
        return text, [(0, len(text))]
    text = tokenizer.apply_chat_template(conv, tokenize=False)
    spans = []
    for i, m in enumerate(conv):
        if m["role"] != "assistant":
            continue
        # The assistant's span is what turn i adds after the generation prompt.
        start = len(tokenizer.apply_chat_template(conv[:i], tokenize=False, add_generation_prompt=True))
        end = len(tokenizer.apply_chat_template(conv[: i + 1], tokenize=False))
        spans.append((start, end))
    return text, spans


def tokenize_messages(conv: Conversation, tokenizer, max_length: int | None) -> Example:
    """Token ids and labels for one conversation (or plain text), cut to max_length."""
    text, spans = render_with_spans(conv, tokenizer)
    return tokenize_text(text, spans, tokenizer, max_length)


def tokenize_text(text: str, spans: list[tuple[int, int]], tokenizer, max_length: int | None) -> Example:
    """Rendered text as token ids, labeled where a token starts inside a trained character span;
    cut to max_length (the end goes)."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    labels = [
        tok_id if any(a <= s < b for a, b in spans) else IGNORE_INDEX
        for tok_id, (s, _) in zip(ids, enc["offset_mapping"])
    ]
    if max_length is None:
        return Example(ids, labels, False)
    return Example(ids[:max_length], labels[:max_length], len(ids) > max_length)


def tokenize_rows(convs: list[Conversation], tokenizer, max_length: int) -> list[Example]:
    """Tokenize conversations, dropping any whose trained tokens were all cut by max_length."""
    examples = [tokenize_messages(c, tokenizer, max_length) for c in convs]
    return [e for e in examples if e.trained_tokens > 0]
