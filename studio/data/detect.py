"""Decide which columns mean what, with a confidence, or take the user's own mapping.

Supervised shapes (``ColumnMapping``, kind ``sft``): instruction/input/output (Alpaca),
prompt/completion and synonyms, chat ``messages`` (role/content), ShareGPT ``conversations``
(from/value), plain ``text``; plus an optional ``system`` column.

Preference shapes (``PreferenceMapping``), checked first, because training one of them as
supervised data would teach the answers a person marked bad:

- kind ``pairs``: a prompt column with ``chosen`` and ``rejected`` answers (text or chat turns), or
  ``chosen`` and ``rejected`` alone, each a whole conversation (chat turns, or Anthropic HH's
  "\\n\\nHuman: ...\\n\\nAssistant: ..." text) whose shared turns are the prompt. A ``messages``
  column next to them is ignored.
- kind ``feedback`` (unpaired, for KTO): prompt and completion (or ``messages``) with a ``label``
  column saying good or bad.

A mapping is written ``column=role`` pairs (``question=prompt,answer=response``,
``q=prompt,good=chosen,bad=rejected``, ``q=prompt,a=response,thumb=label``) in the config, the CLI
and the UI alike. Which cells parse and what the labels mean is read in studio/data/preference.py.
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
# Roles only a preference mapping has; the supervised ROLES keep their order (the Data tab's boxes).
PREFERENCE_ROLES = ("chosen", "rejected", "label")
PREFERENCE_SYNONYMS = {
    "chosen": ("chosen", "chosen_response"),
    "rejected": ("rejected", "rejected_response"),
    "label": ("label", "feedback", "thumbs", "desirable"),
}
PREFERENCE_CANONICAL = ({"prompt", "chosen", "rejected"}, {"chosen", "rejected"}, {"prompt", "completion", "label"})

FORMAT_LABELS = {
    "instruction": "instruction / input / output (Alpaca)",
    "prompt_completion": "prompt / completion",
    "messages": "chat messages",
    "text": "plain text (every token is trained on)",
}
PREFERENCE_FORMAT_LABELS = {
    "pairs": "preference pairs: prompt, chosen, rejected",
    "pair_conversations": "preference pairs: whole conversations in chosen and rejected, their shared turns the prompt",
    "feedback": "feedback for KTO: prompt, completion and a good/bad label",
}


def accepted_names() -> str:
    """The column names we recognise, for error messages."""
    return (
        "instruction,output (optional input); prompt,completion (also question/answer, "
        "query/response, input/target); messages or conversations (chat turns); text; "
        "plus an optional system column. Preference data: prompt,chosen,rejected (or chosen,rejected "
        "holding whole conversations); prompt,completion,label (label: good/bad, true/false, 1/0, thumbs up/down)"
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

    @property
    def kind(self) -> str:
        """What the data teaches, for the trainer: always ``sft`` here (PreferenceMapping: pairs, feedback)."""
        return "sft"

    def describe(self) -> str:
        return _describe(self)


@dataclass(frozen=True)
class PreferenceMapping:
    """Which columns hold a preference file's prompt, answers and verdicts.

    ``format``: ``pairs`` (a prompt column, chosen, rejected), ``pair_conversations`` (chosen and
    rejected each a whole conversation) or ``feedback`` (prompt, completion or messages, label).
    ``kind`` is what the trainer reads: ``pairs`` or ``feedback``.
    """

    format: str
    prompt: str | None = None
    input: str | None = None
    chosen: str | None = None
    rejected: str | None = None
    response: str | None = None  # feedback: the judged completion
    messages: str | None = None  # feedback: a conversation whose last reply is judged
    label_column: str | None = None  # feedback: good or bad (role ``label``)
    system: str | None = None
    confidence: float = 1.0
    detected: bool = True

    @property
    def kind(self) -> str:
        return "feedback" if self.format == "feedback" else "pairs"

    @property
    def label(self) -> str:
        return PREFERENCE_FORMAT_LABELS[self.format]

    def roles(self) -> dict[str, str]:
        """role -> column for every role in use."""
        names = ("prompt", "input", "chosen", "rejected", "response", "messages", "label", "system")
        cols = (self.prompt, self.input, self.chosen, self.rejected, self.response, self.messages)
        cols += (self.label_column, self.system)
        return {r: c for r, c in zip(names, cols) if c}

    def columns(self) -> list[str]:
        return list(self.roles().values())

    def to_pairs(self) -> str:
        """The ``column=role`` form used by config, CLI and UI."""
        return ",".join(f"{col}={role}" for role, col in self.roles().items())

    def describe(self) -> str:
        return _describe(self)


DataMapping = ColumnMapping | PreferenceMapping


def _describe(mapping: DataMapping) -> str:
    roles = ", ".join(f"{role} = `{col}`" for role, col in mapping.roles().items())
    how = f"detected, {mapping.confidence:.0%} confident" if mapping.detected else "your mapping"
    return f"{mapping.label} ({how}): {roles}"


def _preference_from_roles(roles: dict[str, str], confidence: float, detected: bool) -> PreferenceMapping:
    """A preference mapping from role -> column, or DataError saying which role is missing."""
    given = ", ".join(f"{c}={r}" for r, c in roles.items())
    if "chosen" in roles or "rejected" in roles:
        if not ("chosen" in roles and "rejected" in roles):
            raise DataError(f"Preference pairs need both a chosen and a rejected column (got {given}).")
        if "label" in roles or "response" in roles or "messages" in roles:
            raise DataError(
                "A mapping holds either pairs (prompt, chosen, rejected; optional input, system) or feedback "
                f"(prompt, response, label; or messages, label), not roles of both (got {given})."
            )
        fmt = "pairs" if "prompt" in roles else "pair_conversations"
        keep = ("prompt", "input", "chosen", "rejected", "system")
    else:
        if not ("messages" in roles or ("prompt" in roles and "response" in roles)):
            raise DataError(
                "Feedback (a label column) needs prompt and response columns, or a messages column whose "
                f"last reply the label judges (got {given})."
            )
        fmt = "feedback"
        keep = (
            ("prompt", "input", "response", "system", "label")
            if "response" in roles
            else ("messages", "system", "label")
        )
    cols = {("label_column" if r == "label" else r): c for r, c in roles.items() if r in keep}
    return PreferenceMapping(fmt, confidence=confidence, detected=detected, **cols)


def _from_roles(roles: dict[str, str], confidence: float, detected: bool) -> DataMapping:
    if any(r in roles for r in PREFERENCE_ROLES):
        return _preference_from_roles(roles, confidence, detected)
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


def parse_mapping(pairs: str | list[str], columns: list[str]) -> DataMapping:
    """A user mapping such as ``question=prompt,answer=response`` checked against the columns;
    with chosen/rejected or label roles (``q=prompt,good=chosen,bad=rejected``) a PreferenceMapping.

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
        elif role not in ROLES + PREFERENCE_ROLES:
            problems.append(f"`{role}` is not a role (roles: {', '.join(ROLES + PREFERENCE_ROLES)})")
        elif role in roles:
            problems.append(f"two columns are mapped to {role}")
        else:
            roles[role] = col
    if problems:
        raise DataError("The column mapping has problems: " + "; ".join(problems) + ".")
    return _from_roles(roles, 1.0, detected=False)


def detect_format(df: pd.DataFrame) -> DataMapping:
    """Detect the dataset's shape from its column names, with a confidence. Preference shapes
    come first: a file with chosen and rejected columns, or a label next to prompt and completion,
    is never read as supervised data (``.kind`` says which: sft, pairs, feedback).

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
    if preference := _detect_preference(df, by_lower, pick):
        return preference
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
    required = [c for r, c in roles.items() if r in ("prompt", "response", "messages", "text")]
    confidence = 0.95 if tuple(c.lower() for c in required) in CANONICAL else 0.8
    return _from_roles(roles, confidence * _filled_share(df, required), detected=True)


def _detect_preference(df: pd.DataFrame, by_lower: dict[str, str], pick) -> PreferenceMapping | None:
    """Pairs (chosen and rejected columns) or feedback (a label with prompt and completion, or
    messages); None for supervised data."""

    def pick_pref(role, exclude=()):
        return next(
            (by_lower[n] for n in PREFERENCE_SYNONYMS[role] if n in by_lower and by_lower[n] not in exclude), None
        )

    roles: dict[str, str] = {}
    chosen, rejected = pick_pref("chosen"), pick_pref("rejected")
    if chosen and rejected:
        roles = {"chosen": chosen, "rejected": rejected}
        # With chosen and rejected beside it, an `input` column is the question (as in Orca-DPO
        # style files), unless an `instruction` column is the question and `input` its context.
        if prompt := pick("prompt", exclude=(chosen, rejected)):
            roles["prompt"] = prompt
            if prompt.lower() == "instruction" and (context := pick("input", exclude=(prompt, chosen, rejected))):
                roles["input"] = context
    elif label := pick_pref("label"):
        if "instruction" in by_lower and (response := pick("response", exclude=(label,))):
            roles = {"prompt": by_lower["instruction"], "response": response, "label": label}
            if context := pick("input", exclude=(by_lower["instruction"], response, label)):
                roles["input"] = context
        elif (response := pick("response", exclude=(label,))) and (prompt := pick("prompt", exclude=(response, label))):
            roles = {"prompt": prompt, "response": response, "label": label}
        elif messages := pick("messages", exclude=(label,)):
            roles = {"messages": messages, "label": label}
    if not roles:
        return None
    if system := pick("system", exclude=tuple(roles.values())):
        roles["system"] = system
    names = {c.lower() for r, c in roles.items() if r in ("prompt", "chosen", "rejected", "response", "label")}
    confidence = 0.95 if names in PREFERENCE_CANONICAL else 0.8
    required = [c for r, c in roles.items() if r in ("chosen", "rejected", "response", "messages", "label")]
    return _preference_from_roles(roles, confidence * _filled_share(df, required), detected=True)


def _filled_share(df: pd.DataFrame, required: list[str]) -> float:
    """Share of rows whose required cells are non-empty: a column named right but mostly empty
    is probably not what we think it is."""
    if df.empty:
        return 0.0
    filled = pd.Series(True, index=df.index)
    for col in required:
        filled &= df[col].astype(str).str.strip().ne("") & df[col].notna()
    return max(0.2, float(filled.mean()))


def mapping_for(df: pd.DataFrame, mapping: str | list[str] = "") -> DataMapping:
    """The person's mapping when they gave one (``"q=prompt,a=response"`` or a list of pairs),
    else detection: the one rule every reader follows. Raises DataError naming the columns found
    and how to map them. ``.kind`` of the result: ``sft``, ``pairs`` or ``feedback``."""
    given = mapping.strip() if isinstance(mapping, str) else [p for p in mapping if p.strip()]
    return parse_mapping(mapping, list(df.columns)) if given else detect_format(df)
