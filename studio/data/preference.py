"""Preference data: rows read as pairs or as judged answers, then token ids for the trainer.

Two kinds (detected in studio/data/detect.py, where ``PreferenceMapping`` says which column is what):

- ``pairs``: one prompt answered twice, ``chosen`` better than ``rejected`` (DPO, ORPO). A side is
  text, chat turns (a list, or its JSON string in a CSV) holding the answer alone or the whole
  conversation, or Anthropic HH's "\\n\\nHuman: ...\\n\\nAssistant: ..." text. Whole conversations
  share their first turns: those are the prompt, the last assistant turn each side's answer.
- ``feedback``: one answer per row and a label saying good or bad (KTO).

Every answer is rendered like supervised rows (studio/data/render.py): the tokenizer's chat
template, labels only on the answer's tokens (its end-of-turn included), the prompt masked.
A pair's two sides are the same prompt plus each answer; max length cuts the answer's end.

    pairs, problems = pair_rows(df, mapping)        # aligned with the file's rows
    examples = tokenize_pairs([p for p in pairs if p], tokenizer, max_length=512)
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import pandas as pd

from studio.data.detect import PreferenceMapping
from studio.data.render import Example, PairExample, parse_messages, tokenize_text

Turns = list[dict[str, str]]

# Label values read as good / bad, compared lower-cased with spaces, "_" and "-" removed from words.
GOOD_LABELS = frozenset({"true", "1", "+1", "yes", "y", "up", "thumbsup", "thumbup", "good", "👍"})
BAD_LABELS = frozenset({"false", "0", "-1", "no", "n", "down", "thumbsdown", "thumbdown", "bad", "👎"})
_EMOJI_MARKS = re.compile("[\ufe0f\U0001f3fb-\U0001f3ff]")  # variation selector, skin tones
_HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):[ \t]?")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}
_ANSWER_ROLES = {"assistant", "gpt", "bot", "model", "chatgpt"}  # render.ROLE_ALIASES' assistant names

__all__ = [
    "BAD_LABELS",
    "FeedbackExample",
    "FeedbackRow",
    "GOOD_LABELS",
    "PreferenceMapping",
    "PreferencePair",
    "feedback_rows",
    "hh_turns",
    "label_value",
    "pair_rows",
    "tokenize_answer",
    "tokenize_feedback",
    "tokenize_pairs",
]


@dataclass(frozen=True)
class PreferencePair:
    """A prompt (the chat turns before the answers, ending with the user's) and two answers."""

    prompt: Turns
    chosen: str
    rejected: str

    def conversation(self, side: str = "chosen") -> Turns:
        """The prompt followed by one side's answer."""
        return self.prompt + [{"role": "assistant", "content": getattr(self, side)}]


@dataclass(frozen=True)
class FeedbackRow:
    """A prompt, one answer, and whether a person marked it good (``desirable``)."""

    prompt: Turns
    completion: str
    desirable: bool

    def conversation(self) -> Turns:
        return self.prompt + [{"role": "assistant", "content": self.completion}]


@dataclass
class FeedbackExample:
    """A judged answer for KTO: the Example (labels on the answer only) and its verdict. Reads
    like an Example for batching (one row)."""

    example: Example
    desirable: bool

    @property
    def input_ids(self) -> list[int]:
        return self.example.input_ids

    @property
    def labels(self) -> list[int]:
        return self.example.labels

    @property
    def truncated(self) -> bool:
        return self.example.truncated

    @property
    def tokens(self) -> int:
        return self.example.tokens

    @property
    def trained_tokens(self) -> int:
        return self.example.trained_tokens

    @property
    def targets(self) -> int:
        return self.example.targets

    def rows(self) -> list[Example]:
        return [self.example]


def label_value(value) -> bool | None:
    """True (good), False (bad) or None (not a verdict we recognise) for a label cell: booleans,
    1/0/-1, and true/false, yes/no, up/down, good/bad, thumbs up/down, 👍/👎 in any case."""
    if hasattr(value, "item") and not isinstance(value, str):  # numpy scalars from parquet
        value = value.item()
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        return {1: True, 0: False, -1: False}.get(value) if value == value else None
    text = _EMOJI_MARKS.sub("", str(value)).strip().lower()
    if any(ch.isalpha() for ch in text):
        text = re.sub(r"[\s_-]+", "", text)
    elif re.fullmatch(r"[+-]?\d+\.0+", text):
        text = text.split(".")[0]
    return True if text in GOOD_LABELS else False if text in BAD_LABELS else None


def hh_turns(text: str) -> Turns | None:
    """Anthropic HH text ("\\n\\nHuman: hi\\n\\nAssistant: hello") as chat turns; None when the
    text is not in that form."""
    parts = _HH_TURN.split(text)
    if len(parts) < 3 or parts[0].strip():
        return None
    return [{"role": _HH_ROLES[role], "content": body.strip()} for role, body in zip(parts[1::2], parts[2::2])]


def _value(cell) -> str | list | None:
    """A cell as chat turns (a list of dicts), text, or None when empty. A CSV's JSON string of
    turns (objects with a role or from key) is decoded; any other text stays text, so an answer
    that is itself JSON (``[1, 2]``, ``[{"name": "a"}]``) is an answer."""
    if hasattr(cell, "tolist") and not isinstance(cell, str):  # numpy arrays from parquet
        cell = cell.tolist()
    if isinstance(cell, dict):
        cell = [cell]
    if isinstance(cell, list):
        return cell or None
    if cell is None or (isinstance(cell, float) and pd.isna(cell)):
        return None
    text = str(cell).strip()
    if text.startswith("["):
        try:
            decoded = json.loads(text)
        except ValueError:
            return text
        if isinstance(decoded, list) and any(isinstance(m, dict) and ("role" in m or "from" in m) for m in decoded):
            return decoded
        if decoded == []:
            return None
    return text or None


def _prompt_turns(prompt_cell, input_cell) -> Turns | None:
    value = _value(prompt_cell)
    if isinstance(value, list):
        return value
    context = _value(input_cell)
    if value and isinstance(context, str):
        value = f"{value}\n\n{context}"
    return [{"role": "user", "content": value}] if value else None


def _conversation(cell, prompt: Turns | None, system: str) -> tuple[Turns | None, str | None]:
    """One answer cell as a whole conversation ending with the answer, or (None, problem):
    ``empty_answer``, ``empty_prompt`` (the answer alone, with no prompt), ``invalid_json``, ``bad_roles``."""
    value = _value(cell)
    if value is None:
        return None, "empty_answer"
    if isinstance(value, str):
        turns = hh_turns(value)
        if turns is None:
            if not prompt:
                return None, "empty_prompt"
            turns = prompt + [{"role": "assistant", "content": value}]
    elif all(isinstance(m, dict) and str(m.get("role", m.get("from", ""))).lower() in _ANSWER_ROLES for m in value):
        if not prompt:  # the answer's turns alone (TRL's conversational shape) need the prompt's
            return None, "empty_prompt"
        turns = prompt + value
    else:
        turns = value
    msgs, problem = parse_messages(turns)
    if problem:
        return None, problem
    if msgs[-1]["role"] != "assistant":
        return None, "bad_roles"
    if not msgs[-1]["content"].strip():
        return None, "empty_answer"
    if system and msgs[0]["role"] != "system":
        msgs = [{"role": "system", "content": system}] + msgs
    return msgs, None


def _text(cell) -> str:
    value = _value(cell)
    return value if isinstance(value, str) else ""


def _column(df: pd.DataFrame, name: str | None) -> list:
    return df[name].tolist() if name else [None] * len(df)


def _same(a: str, b: str) -> bool:
    return " ".join(a.split()) == " ".join(b.split())


def pair_rows(df: pd.DataFrame, mapping: PreferenceMapping) -> tuple[list[PreferencePair | None], list[str | None]]:
    """Each row as a PreferencePair, or None and why: ``empty_answer``, ``empty_prompt``,
    ``invalid_json``, ``bad_roles``, ``prompt_mismatch`` (whole conversations whose turns before
    the answers differ) or ``identical`` (the same answer on both sides). Aligned with ``df``."""
    pairs: list[PreferencePair | None] = []
    problems: list[str | None] = []
    columns = (mapping.prompt, mapping.input, mapping.system, mapping.chosen, mapping.rejected)
    for p, i, s, c, r in zip(*(_column(df, name) for name in columns)):
        prompt, system = _prompt_turns(p, i), _text(s)
        chosen, problem = _conversation(c, prompt, system)
        rejected, problem_r = _conversation(r, prompt, system)
        problem = problem or problem_r
        if problem is None and [(m["role"], m["content"].strip()) for m in chosen[:-1]] != [
            (m["role"], m["content"].strip()) for m in rejected[:-1]
        ]:
            problem = "prompt_mismatch"
        if problem is None and _same(chosen[-1]["content"], rejected[-1]["content"]):
            problem = "identical"
        if problem is None and not any(m["role"] == "user" for m in chosen[:-1]):
            problem = "empty_prompt"
        problems.append(problem)
        pairs.append(None if problem else PreferencePair(chosen[:-1], chosen[-1]["content"], rejected[-1]["content"]))
    return pairs, problems


def feedback_rows(df: pd.DataFrame, mapping: PreferenceMapping) -> tuple[list[FeedbackRow | None], list[str | None]]:
    """Each row as a FeedbackRow, or None and why: ``unknown_label``, or a problem of its answer
    as in :func:`pair_rows`. Aligned with ``df``."""
    rows: list[FeedbackRow | None] = []
    problems: list[str | None] = []
    columns = (mapping.prompt, mapping.input, mapping.system, mapping.response or mapping.messages)
    for p, i, s, answer, label in zip(*(_column(df, name) for name in columns), _column(df, mapping.label_column)):
        conv, problem = _conversation(answer, _prompt_turns(p, i), _text(s))
        verdict = label_value(label)
        if problem is None and verdict is None:
            problem = "unknown_label"
        if problem is None and not any(m["role"] == "user" for m in conv[:-1]):
            problem = "empty_prompt"
        problems.append(problem)
        rows.append(None if problem else FeedbackRow(conv[:-1], conv[-1]["content"], verdict))
    return rows, problems


def _prompt_text(prompt: Turns, tokenizer) -> str:
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)


def tokenize_answer(
    prompt: Turns, answer: str, tokenizer, max_length: int | None, prompt_text: str | None = None
) -> Example:
    """One side: the prompt and the answer as the chat template renders them, labels only on the
    answer's tokens (its end-of-turn included, as supervised rows are labeled). A longer row loses
    the end of its answer. ``prompt_text``: the prompt already rendered (a pair renders it once)."""
    prompt_text = _prompt_text(prompt, tokenizer) if prompt_text is None else prompt_text
    text = tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": answer}], tokenize=False)
    return tokenize_text(text, [(len(prompt_text), len(text))], tokenizer, max_length)


def tokenize_pairs(pairs: list[PreferencePair], tokenizer, max_length: int) -> list[PairExample]:
    """Token ids and labels for each pair: the prompt rendered once, each side the prompt plus its
    answer, labels on the answer only. Truncation cuts the answers' ends (``truncated`` is set);
    a pair whose prompt alone fills max length has no answer left on a side and is dropped (the
    report's ``prompt_too_long`` names those rows)."""
    out = []
    for pair in pairs:
        prompt_text = _prompt_text(pair.prompt, tokenizer)
        chosen = tokenize_answer(pair.prompt, pair.chosen, tokenizer, max_length, prompt_text)
        rejected = tokenize_answer(pair.prompt, pair.rejected, tokenizer, max_length, prompt_text)
        if chosen.trained_tokens and rejected.trained_tokens:
            out.append(PairExample(chosen, rejected))
    return out


def tokenize_feedback(rows: list[FeedbackRow], tokenizer, max_length: int) -> list[FeedbackExample]:
    """A FeedbackExample per row (its answer labeled, as one side of a pair); rows whose prompt
    fills max length are dropped."""
    out = []
    for row in rows:
        example = tokenize_answer(row.prompt, row.completion, tokenizer, max_length)
        if example.trained_tokens:
            out.append(FeedbackExample(example, row.desirable))
    return out
