"""Decide which columns mean what: instruction/input/output, prompt/completion, messages, text."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from studio.data.load import DataError

# Synonyms are matched case-insensitively. Order matters: the first match wins.
PROMPT_NAMES = ("instruction", "prompt", "question", "query", "input", "user")
RESPONSE_NAMES = ("output", "completion", "response", "answer", "target", "assistant")
CONTEXT_NAMES = ("input", "context")
SYSTEM_NAMES = ("system", "system_prompt")
MESSAGES_NAMES = ("messages", "conversations", "conversation")
TEXT_NAMES = ("text", "content")

FORMAT_LABELS = {
    "instruction": "instruction / input / output (Alpaca)",
    "prompt_completion": "prompt / completion",
    "messages": "chat messages",
    "text": "plain text (every token is trained on)",
}


@dataclass(frozen=True)
class ColumnMapping:
    """Which column plays which role; ``format`` is one of FORMAT_LABELS' keys."""

    format: str
    prompt: str | None = None
    response: str | None = None
    context: str | None = None
    system: str | None = None
    messages: str | None = None
    text: str | None = None

    @property
    def label(self) -> str:
        return FORMAT_LABELS[self.format]

    def describe(self) -> str:
        roles = [f"{role} = `{col}`" for role, col in (
            ("prompt", self.prompt), ("input", self.context), ("response", self.response),
            ("system", self.system), ("messages", self.messages), ("text", self.text)) if col]
        return f"{self.label}: " + ", ".join(roles)


def detect_format(df: pd.DataFrame) -> ColumnMapping:
    """Detect the dataset's shape from its column names.

    Raises:
        DataError: no known combination of columns; the message lists what was found and
            what we accept.
    """
    by_lower = {c.lower(): c for c in df.columns}

    def pick(names, exclude=()):
        for n in names:
            if n in by_lower and by_lower[n] not in exclude:
                return by_lower[n]
        return None

    system = pick(SYSTEM_NAMES)
    messages = pick(MESSAGES_NAMES)
    if messages:
        return ColumnMapping("messages", messages=messages, system=system)
    if "instruction" in by_lower:
        response = pick(RESPONSE_NAMES)
        if response:
            context = pick(CONTEXT_NAMES, exclude=(by_lower["instruction"], response))
            return ColumnMapping("instruction", prompt=by_lower["instruction"], response=response,
                                 context=context, system=system)
    response = pick(RESPONSE_NAMES)
    prompt = pick(PROMPT_NAMES, exclude=(response,))
    if prompt and response:
        return ColumnMapping("prompt_completion", prompt=prompt, response=response, system=system)
    text = pick(TEXT_NAMES)
    if text:
        return ColumnMapping("text", text=text)
    found = ", ".join(map(str, df.columns[:12])) or "none"
    raise DataError(
        f"No usable columns found (columns: {found}). Name them instruction,output (optional input), "
        "or prompt,completion (also question/answer, query/response), or messages, or text.")
