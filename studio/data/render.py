"""Turn table rows into chat messages, then into token ids with labels on the trained tokens.

Rows become messages rendered by the tokenizer's own chat template, so training sees exactly
what chat will send. Labels cover only the assistant's replies (prompt tokens get -100); for
plain text every token is trained on. Masking is done by character spans of the rendered text
mapped through the tokenizer's offsets, which works for any template (TRL's
``assistant_only_loss`` needs ``{% generation %}`` markers most templates lack).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pandas as pd

from studio.data.detect import ColumnMapping

IGNORE_INDEX = -100
ROLE_ALIASES = {"human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant"}


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    truncated: bool = False

    @property
    def trained_tokens(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE_INDEX)


def _cell(value) -> str:
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return ""
    return str(value).strip()


def _parse_messages(value) -> list[dict[str, str]] | None:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return None
    if hasattr(value, "tolist"):  # numpy arrays from parquet/jsonl
        value = value.tolist()
    if not isinstance(value, list):
        return None
    out = []
    for m in value:
        if not isinstance(m, dict):
            return None
        role = m.get("role", m.get("from"))
        content = m.get("content", m.get("value"))
        if not isinstance(role, str) or content is None:
            return None
        out.append({"role": ROLE_ALIASES.get(role.lower(), role.lower()), "content": str(content)})
    return out


def row_to_messages(row: pd.Series, mapping: ColumnMapping) -> list[dict[str, str]] | str | None:
    """One row as chat messages (or a plain string for text datasets); None if the row is unusable."""
    if mapping.format == "text":
        text = _cell(row[mapping.text])
        return text or None
    msgs: list[dict[str, str]] = []
    system = _cell(row[mapping.system]) if mapping.system else ""
    if mapping.format == "messages":
        parsed = _parse_messages(row[mapping.messages])
        if not parsed or not any(m["role"] == "assistant" and m["content"].strip() for m in parsed):
            return None
        if system and parsed[0]["role"] != "system":
            msgs.append({"role": "system", "content": system})
        return msgs + parsed
    prompt, response = _cell(row[mapping.prompt]), _cell(row[mapping.response])
    context = _cell(row[mapping.context]) if mapping.context else ""
    if not prompt or not response:
        return None
    if context:
        prompt = f"{prompt}\n\n{context}"
    if system:
        msgs.append({"role": "system", "content": system})
    msgs += [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    return msgs


def rows_to_messages(df: pd.DataFrame, mapping: ColumnMapping) -> list:
    """Every usable row, converted; unusable rows (empty cells, bad JSON) are left out."""
    out = []
    for _, row in df.iterrows():
        conv = row_to_messages(row, mapping)
        if conv is not None:
            out.append(conv)
    return out


def tokenize_messages(conv, tokenizer, max_length: int) -> Example:
    """Token ids and labels for one conversation (or plain text), cut to max_length."""
    if isinstance(conv, str):
        text = conv + (tokenizer.eos_token or "")
        spans = [(0, len(text))]
    else:
        text = tokenizer.apply_chat_template(conv, tokenize=False)
        spans = []
        for i, m in enumerate(conv):
            if m["role"] != "assistant":
                continue
            # The assistant's span is what turn i adds after the generation prompt.
            start = len(tokenizer.apply_chat_template(conv[:i], tokenize=False, add_generation_prompt=True))
            end = len(tokenizer.apply_chat_template(conv[: i + 1], tokenize=False))
            spans.append((start, end))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    labels = []
    for tok_id, (s, _) in zip(ids, enc["offset_mapping"]):
        trained = any(a <= s < b for a, b in spans)
        labels.append(tok_id if trained else IGNORE_INDEX)
    truncated = len(ids) > max_length
    return Example(ids[:max_length], labels[:max_length], truncated)


def tokenize_rows(convs: list, tokenizer, max_length: int) -> list[Example]:
    """Tokenize conversations, dropping any whose trained tokens were all cut by max_length."""
    examples = [tokenize_messages(c, tokenizer, max_length) for c in convs]
    return [e for e in examples if e.trained_tokens > 0]
