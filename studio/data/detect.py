"""Decide which columns mean what, with a confidence, or take the user's own mapping.

Shapes: instruction/input/output (Alpaca), prompt/completion and synonyms, chat ``messages``
(role/content), ShareGPT ``conversations`` (from/value), plain ``text``; plus an optional
``system`` column. A mapping is written ``column=role`` pairs (``question=prompt,answer=response``)
in the config, the CLI and the UI alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from studio.data.load import DataError

ROLES = ("prompt", "input", "response", "system", "messages", "text")
# Synonyms are matched case-insensitively, the first match wins. Canonical names come first.
SYNONYMS = {
    "prompt": ("instruction", "prompt", "question", "query", "input", "user", "human"),
    "response": ("output", "completion", "response", "answer", "target", "assistant", "gpt"),
    "input": ("input", "context"),
    "system": ("system", "system_prompt"),
    "messages": ("messages", "conversations", "conversation", "chat"),
    "text": ("text", "content", "document"),
}
CANONICAL = {("instruction", "output"), ("prompt", "completion"), ("messages",), ("conversations",), ("text",)}

FORMAT_LABELS = {
    "instruction": "instruction / input / output (Alpaca)",
    "prompt_completion": "prompt / completion",
    "messages": "chat messages",
    "text": "plain text (every token is trained on)",
}


def accepted_names() -> str:
    """The column names we recognise, for error messages."""
    return (
        "instruction,output (optional input); prompt,completion (also question/answer, "
        "query/response, input/target); messages or conversations (chat turns); text; "
        "plus an optional system column"
    )


@dataclass(frozen=True)
class ColumnMapping:
    """Which column plays which role; ``format`` is one of FORMAT_LABELS' keys."""

    format: str
    prompt: str | None = None
    response: str | None = None
    input: str | None = None
    system: str | None = None
    messages: str | None = None
    text: str | None = None
    confidence: float = 1.0
    detected: bool = True  # False when the user gave the mapping

    @property
    def label(self) -> str:
        return FORMAT_LABELS[self.format]

    def roles(self) -> dict[str, str]:
        """role -> column for every role in use."""
        return {r: getattr(self, r) for r in ROLES if getattr(self, r)}

    def columns(self) -> list[str]:
        return list(self.roles().values())

    def to_pairs(self) -> str:
        """The ``column=role`` form used by config, CLI and UI."""
        return ",".join(f"{col}={role}" for role, col in self.roles().items())

    def describe(self) -> str:
        roles = ", ".join(f"{role} = `{col}`" for role, col in self.roles().items())
        how = f"detected, {self.confidence:.0%} confident" if self.detected else "your mapping"
        return f"{self.label} ({how}): {roles}"


def _from_roles(roles: dict[str, str], confidence: float, detected: bool) -> ColumnMapping:
    if "messages" in roles:
        fmt = "messages"
    elif "prompt" in roles and "response" in roles:
        fmt = "instruction" if "input" in roles or roles["prompt"].lower() == "instruction" else "prompt_completion"
    elif "text" in roles:
        fmt = "text"
    else:
        raise DataError(
            "The mapping needs prompt and response columns, a messages column, or a text "
            f"column (got {', '.join(f'{c}={r}' for r, c in roles.items()) or 'nothing'})."
        )
    keep = {"messages": ("messages", "system"), "text": ("text",)}.get(fmt, ("prompt", "input", "response", "system"))
    return ColumnMapping(fmt, confidence=confidence, detected=detected, **{r: c for r, c in roles.items() if r in keep})


def parse_mapping(pairs: str | list[str], columns: list[str]) -> ColumnMapping:
    """A user mapping such as ``question=prompt,answer=response`` checked against the columns.

    Raises:
        DataError: a pair is malformed, names a missing column or an unknown role.
    """
    items = pairs.split(",") if isinstance(pairs, str) else [p for item in pairs for p in item.split(",")]
    roles: dict[str, str] = {}
    problems = []
    for item in (i.strip() for i in items):
        if not item:
            continue
        col, sep, role = item.rpartition("=")
        col, role = col.strip(), role.strip().lower()
        if not sep or not col:
            problems.append(f"`{item}` should look like column=role")
        elif col not in columns:
            problems.append(f"there is no column `{col}` (columns: {', '.join(columns[:12])})")
        elif role not in ROLES:
            problems.append(f"`{role}` is not a role (roles: {', '.join(ROLES)})")
        elif role in roles:
            problems.append(f"two columns are mapped to {role}")
        else:
            roles[role] = col
    if problems:
        raise DataError("The column mapping has problems: " + "; ".join(problems) + ".")
    return _from_roles(roles, 1.0, detected=False)


def detect_format(df: pd.DataFrame) -> ColumnMapping:
    """Detect the dataset's shape from its column names, with a confidence.

    Raises:
        DataError: no known combination of columns; the message lists what was found and
            what we accept.
    """
    by_lower = {c.lower(): c for c in df.columns}

    def pick(role, exclude=()):
        for n in SYNONYMS[role]:
            if n in by_lower and by_lower[n] not in exclude:
                return by_lower[n]
        return None

    roles: dict[str, str] = {}
    system = pick("system")
    if messages := pick("messages"):
        roles = {"messages": messages}
    elif "instruction" in by_lower and (response := pick("response")):
        roles = {"prompt": by_lower["instruction"], "response": response}
        if context := pick("input", exclude=(roles["prompt"], response)):
            roles["input"] = context
    elif (response := pick("response")) and (prompt := pick("prompt", exclude=(response,))):
        roles = {"prompt": prompt, "response": response}
    elif text := pick("text"):
        roles = {"text": text}
    else:
        found = ", ".join(map(str, df.columns[:12])) or "none"
        raise DataError(
            f"No usable columns found (columns: {found}). We accept {accepted_names()}. "
            "Rename the columns, or map them yourself (column=role)."
        )
    if system and "text" not in roles:
        roles["system"] = system
    names = tuple(c.lower() for r, c in roles.items() if r in ("prompt", "response", "messages", "text"))
    confidence = 0.95 if names in CANONICAL else 0.8
    return _from_roles(roles, confidence * _filled_share(df, roles), detected=True)


def _filled_share(df: pd.DataFrame, roles: dict[str, str]) -> float:
    """Share of rows whose required cells are non-empty: a column named right but mostly empty
    is probably not what we think it is."""
    if df.empty:
        return 0.0
    required = [c for r, c in roles.items() if r in ("prompt", "response", "messages", "text")]
    filled = pd.Series(True, index=df.index)
    for col in required:
        filled &= df[col].astype(str).str.strip().ne("") & df[col].notna()
    return max(0.2, float(filled.mean()))


def mapping_for(df: pd.DataFrame, mapping: str | list[str] = "") -> ColumnMapping:
    """The person's mapping when they gave one (``"q=prompt,a=response"`` or a list of pairs),
    else detection: the one rule every reader follows. Raises DataError naming the columns found
    and how to map them."""
    given = mapping.strip() if isinstance(mapping, str) else [p for p in mapping if p.strip()]
    return parse_mapping(mapping, list(df.columns)) if given else detect_format(df)
