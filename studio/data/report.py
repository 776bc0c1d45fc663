"""The validation report: findings with row numbers and fixes, and the token statistics.

Each finding has a severity (an ``error`` blocks training, a ``warning`` does not), a stable
``code``, how many rows it concerns, the first few row numbers as they appear in the file
(1-based, header excluded) and a sentence saying how to fix it. The checks that fill it are in
studio/data/validate.py (supervised rows) and studio/data/preference_checks.py (pairs and
judged answers); both run the text checks here (encoding damage, giant cells).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd

from studio.data.detect import DataMapping
from studio.data.load import Table
from studio.data.preference import FeedbackRow, PreferencePair
from studio.data.render import Conversation

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
    """``convs`` are what a supervised run would train on; for preference data, each pair's
    prompt and chosen answer (feedback: the answers marked good), so previews and held-out
    references never show a rejected answer. ``preference`` holds the pairs or judged rows."""

    table: Table
    mapping: DataMapping
    findings: list[Finding]
    convs: list[Conversation | None]  # aligned with the file's rows; None = skipped
    stats: LengthStats | None = None  # every row a batch would hold (a pair's two sides)
    preference: list[PreferencePair | FeedbackRow | None] | None = None  # aligned with the rows; pairs, feedback
    side_stats: dict[str, LengthStats] = field(default_factory=dict)  # chosen/rejected, desirable/undesirable

    @property
    def kind(self) -> str:
        """``sft``, ``pairs`` or ``feedback``: what the data teaches."""
        return self.mapping.kind

    @property
    def rows(self) -> int:
        return len(self.convs)

    @property
    def usable_rows(self) -> int:
        return sum(c is not None for c in (self.convs if self.preference is None else self.preference))

    @property
    def ok(self) -> bool:
        return not any(f.severity == "error" for f in self.findings)

    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    def to_dict(self) -> dict:
        """The documented JSON shape of ``finetune-studio validate --json``."""
        return {
            "ok": self.ok,
            "kind": self.kind,
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
                **({"sides": {k: v.to_dict() for k, v in self.side_stats.items()}} if self.side_stats else {}),
            },
        }

    def to_text(self) -> str:
        """The report for a terminal."""
        s = self.stats.to_dict() if self.stats else None
        usable = {"pairs": "usable pairs"}.get(self.kind, "usable")
        lines = [
            f"Format:  {self.mapping.describe().replace('`', '')}",
            f"File:    {self.table.describe()}; {self.rows} rows, {self.usable_rows} {usable}",
        ]
        if s and self.side_stats:
            lines.append(f"Tokens:  {s['tokens_per_epoch']:,} per epoch, all sides (max length {s['max_length']})")
            for side, stats in self.side_stats.items():
                d = stats.to_dict()
                lines.append(
                    f"  {side + ':':<12} {len(stats.lengths)} rows; prompt and answer: median "
                    f"{d['length_median']:.0f}, p95 {d['length_p95']:.0f}, longest {d['length_max']} tokens; "
                    f"{d['truncated_rows']} cut"
                )
        elif s:
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
    "{n} rows prefer": "1 row prefers",
}


def add_finding(findings, severity, code, mask, message, fix) -> None:
    """Append a finding for the rows ``mask`` marks, if any; ``{n}`` in the message is their count."""
    rows, count = _rows(mask)
    if not count:
        return
    if count == 1:
        for plural, singular in _SINGULAR.items():
            message = message.replace(plural, singular)
    findings.append(Finding(severity, code, message.replace("{n}", str(count)), fix, rows, count))


def check_text(findings: list[Finding], cells: dict[str, pd.Series], n_rows: int) -> None:
    """Encoding damage and giant cells."""
    moji = np.zeros(n_rows, bool)
    longc = np.zeros(n_rows, bool)
    for s in cells.values():
        moji |= s.str.contains(MOJIBAKE, regex=True).to_numpy()
        longc |= (s.str.len() > LONG_CELL_CHARS).to_numpy()
    add_finding(
        findings,
        "warning",
        "mojibake",
        moji,
        '{n} rows contain garbled characters such as "Ã©" or "â€™", a sign the text was decoded '
        "with the wrong encoding before it was saved.",
        "Re-export the file as UTF-8 from the program that made it.",
    )
    add_finding(
        findings,
        "warning",
        "long_cells",
        longc,
        f"{{n}} rows have a cell longer than {LONG_CELL_CHARS:,} characters.",
        "Check that a whole document did not end up in one cell; split long texts into several rows.",
    )


def add_duplicates(findings, df: pd.DataFrame, columns: list[str], usable: np.ndarray) -> np.ndarray:
    """A warning for usable rows that repeat an earlier row exactly in the mapped ``columns``
    (supervised and preference data alike); returns which rows those are."""
    dup = df[columns].astype(str).duplicated(keep="first").to_numpy() & usable
    add_finding(
        findings,
        "warning",
        "duplicate_rows",
        dup,
        "{n} rows repeat an earlier row exactly; they would be trained on more than once.",
        "Remove the duplicates, unless you mean to give those examples more weight.",
    )
    return dup
