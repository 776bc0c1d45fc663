"""The validation report: findings with row numbers and fixes, and the token statistics.

Each finding has a severity (an ``error`` blocks training, a ``warning`` does not), a stable
``code``, how many rows it concerns, the first few row numbers as they appear in the file
(1-based, header excluded) and a sentence saying how to fix it. Checks run column-wise with
pandas where they can, so a 100k-row file validates in seconds.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd

from studio.data.detect import ColumnMapping
from studio.data.load import Table
from studio.data.render import Conversation, conversations, parse_messages
from studio.data.tokens import TokenCounter

FEW_ROWS = 200
LONG_CELL_CHARS = 20_000
SHOW_ROWS = 5
# Mis-decoded UTF-8: "Ã©" for "é", "â€™" for "’", a stray "Â" before a symbol, the replacement char.
# Not a raw string on purpose: Python turns the escapes into the characters themselves, because
# pandas 3.0 hands pyarrow string columns to RE2, which refuses `\u` escapes (Python's re takes both).
MOJIBAKE = "Ã[\u0080-\u00bf]|â€|Â[\u0080-\u00bf]|\ufffd"


@dataclass
class Finding:
    severity: str  # "error" blocks training; "warning" does not
    code: str
    message: str
    fix: str
    rows: list[int] = field(default_factory=list)  # first few, 1-based, header excluded
    count: int = 0


@dataclass
class LengthStats:
    lengths: np.ndarray  # tokens per usable row, before truncation
    max_length: int

    @property
    def truncated_rows(self) -> int:
        return int((self.lengths > self.max_length).sum())

    @property
    def tokens_per_epoch(self) -> int:
        return int(np.minimum(self.lengths, self.max_length).sum())

    @property
    def cut_share(self) -> float:
        total = int(self.lengths.sum())
        return float(np.maximum(self.lengths - self.max_length, 0).sum() / total) if total else 0.0

    def to_dict(self) -> dict:
        q = np.percentile(self.lengths, [50, 95]) if len(self.lengths) else [0, 0]
        return {
            "max_length": self.max_length,
            "tokens_per_epoch": self.tokens_per_epoch,
            "truncated_rows": self.truncated_rows,
            "cut_token_share": round(self.cut_share, 4),
            "length_min": int(self.lengths.min()) if len(self.lengths) else 0,
            "length_median": float(q[0]),
            "length_p95": float(q[1]),
            "length_max": int(self.lengths.max()) if len(self.lengths) else 0,
        }


@dataclass
class DataReport:
    table: Table
    mapping: ColumnMapping
    findings: list[Finding]
    convs: list[Conversation | None]  # aligned with the file's rows; None = skipped
    stats: LengthStats | None = None

    @property
    def rows(self) -> int:
        return len(self.convs)

    @property
    def usable_rows(self) -> int:
        return sum(c is not None for c in self.convs)

    @property
    def ok(self) -> bool:
        return not any(f.severity == "error" for f in self.findings)

    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    def to_dict(self) -> dict:
        """The documented JSON shape of ``finetune-studio validate --json``."""
        return {
            "ok": self.ok,
            "format": self.mapping.format,
            "encoding": self.table.encoding,
            "delimiter": self.table.delimiter,
            "rows": self.rows,
            "usable_rows": self.usable_rows,
            "mapping": self.mapping.roles(),
            "confidence": round(self.mapping.confidence, 2),
            "findings": [{k: v for k, v in asdict(f).items()} for f in self.findings],
            "stats": {
                "rows": self.rows,
                "usable_rows": self.usable_rows,
                **(self.stats.to_dict() if self.stats else {}),
            },
        }

    def to_text(self) -> str:
        """The report for a terminal."""
        s = self.stats.to_dict() if self.stats else None
        lines = [
            f"Format:  {self.mapping.describe().replace('`', '')}",
            f"File:    {self.table.describe()}; {self.rows} rows, {self.usable_rows} usable",
        ]
        if s:
            lines.append(
                f"Tokens:  {s['tokens_per_epoch']:,} per epoch; median row {s['length_median']:.0f}, "
                f"p95 {s['length_p95']:.0f}, longest {s['length_max']} (max length {s['max_length']})"
            )
        lines.append("")
        for f in self.findings:
            rows = f" (rows {', '.join(map(str, f.rows))}{', ...' if f.count > len(f.rows) else ''})" if f.rows else ""
            lines.append(f"{f.severity.upper():<8}{f.code}: {f.message}{rows}\n        Fix: {f.fix}")
        lines.append("OK: training can proceed." if self.ok else "Training cannot start until the errors are fixed.")
        return "\n".join(lines)


def _rows(mask: pd.Series | np.ndarray) -> tuple[list[int], int]:
    idx = np.flatnonzero(np.asarray(mask))
    return [int(i) + 1 for i in idx[:SHOW_ROWS]], len(idx)


_SINGULAR = {
    "{n} rows have": "1 row has",
    "{n} rows repeat": "1 row repeats",
    "{n} rows share": "1 row shares",
    "{n} rows contain": "1 row contains",
    "{n} rows are": "1 row is",
    "another row but give": "another row but gives",
}


def _add(findings, severity, code, mask, message, fix) -> None:
    rows, count = _rows(mask)
    if not count:
        return
    if count == 1:
        for plural, singular in _SINGULAR.items():
            message = message.replace(plural, singular)
    findings.append(Finding(severity, code, message.replace("{n}", str(count)), fix, rows, count))


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


def validate(table: Table, mapping: ColumnMapping, tokenizer=None, max_length: int = 512) -> DataReport:
    """Check every row; with a tokenizer also count token lengths against max_length."""
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
        _add(
            findings,
            "warning",
            "empty_cells",
            raw_empty,
            "{n} rows have an empty " + names + " cell and will be skipped.",
            "Fill in those cells or delete the rows.",
        )
        _add(
            findings,
            "warning",
            "whitespace_cells",
            ws_only & ~raw_empty,
            "{n} rows have a " + names + " cell holding only spaces or line breaks; they will be skipped.",
            "Fill in those cells or delete the rows.",
        )
    if mapping.format == "messages":
        problems = [parse_messages(v)[1] for v in df[mapping.messages].tolist()]
        _add(
            findings,
            "warning",
            "invalid_json",
            np.array([p == "invalid_json" for p in problems]),
            f"{{n}} rows have a `{mapping.messages}` cell that is not a JSON list of "
            "{{role, content}} (or {{from, value}}) turns; they will be skipped.",
            'Write each cell as [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}].',
        )
        _add(
            findings,
            "warning",
            "bad_roles",
            np.array([p == "bad_roles" for p in problems]),
            "{n} rows have unknown roles or turns that do not alternate user/assistant (after an "
            "optional system turn), or no assistant reply; they will be skipped.",
            "Use the roles system, user and assistant, alternate user and assistant, and end with an assistant reply.",
        )

    # Duplicates and contradictions, among rows we would train on.
    mapped = df[mapping.columns()].astype(str)
    dup = mapped.duplicated(keep="first").to_numpy() & usable
    _add(
        findings,
        "warning",
        "duplicate_rows",
        dup,
        "{n} rows repeat an earlier row exactly; they would be trained on more than once.",
        "Remove the duplicates, unless you mean to give those examples more weight.",
    )
    if mapping.format != "text":
        keys = pd.Series([prompt_key(c) if c is not None else None for c in convs])
        replies = pd.Series([first_reply(c) if c is not None else None for c in convs])
        frame = pd.DataFrame({"key": keys, "reply": replies})[usable & ~dup]
        n_replies = frame.groupby("key")["reply"].transform("nunique")
        conflict = np.zeros(len(df), bool)
        conflict[frame.index[n_replies > 1].to_numpy()] = True
        _add(
            findings,
            "warning",
            "conflicting_answers",
            conflict,
            "{n} rows share a prompt with another row but give a different answer; the model "
            "will learn a blend of them.",
            "Keep one answer per prompt, or make the prompts say what differs.",
        )

    # Encoding damage and giant cells.
    moji = np.zeros(len(df), bool)
    longc = np.zeros(len(df), bool)
    for s in cells.values():
        moji |= s.str.contains(MOJIBAKE, regex=True).to_numpy()
        longc |= (s.str.len() > LONG_CELL_CHARS).to_numpy()
    _add(
        findings,
        "warning",
        "mojibake",
        moji,
        '{n} rows contain garbled characters such as "Ã©" or "â€™", a sign the text was decoded '
        "with the wrong encoding before it was saved.",
        "Re-export the file as UTF-8 from the program that made it.",
    )
    _add(
        findings,
        "warning",
        "long_cells",
        longc,
        f"{{n}} rows have a cell longer than {LONG_CELL_CHARS:,} characters.",
        "Check that a whole document did not end up in one cell; split long texts into several rows.",
    )

    stats = None
    if tokenizer is not None and usable.any():
        lengths, prompt_lengths = token_lengths([c for c in convs if c is not None], tokenizer)
        stats = LengthStats(lengths, max_length)
        long_rows = np.zeros(len(df), bool)
        long_rows[np.flatnonzero(usable)[lengths > max_length]] = True
        no_room = np.zeros(len(df), bool)
        no_room[np.flatnonzero(usable)[prompt_lengths >= max_length]] = True
        _add(
            findings,
            "warning",
            "too_long",
            long_rows & ~no_room,
            f"{{n}} rows are longer than the max length of {max_length} tokens; their ends will be cut "
            f"({stats.cut_share:.1%} of all tokens), so the model never sees how those answers finish.",
            f"Raise max length (the longest row has {int(lengths.max())} tokens) or shorten those rows.",
        )
        _add(
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
