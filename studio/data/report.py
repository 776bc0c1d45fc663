"""A plain-language report on a dataset: its shape, how many rows are usable, and findings."""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

from studio.data.detect import ColumnMapping
from studio.data.render import row_to_messages

FEW_ROWS = 200


@dataclass
class Finding:
    severity: str  # "error" blocks training; "warning" does not
    message: str
    rows: list[int] = field(default_factory=list)  # 1-based, header excluded


@dataclass
class DataReport:
    mapping: ColumnMapping
    rows: int
    usable_rows: int
    findings: list[Finding]

    @property
    def ok(self) -> bool:
        return not any(f.severity == "error" for f in self.findings)

    def to_markdown(self) -> str:
        head = (f"**Format:** {self.mapping.describe()}  \n"
                f"**Rows:** {self.rows} ({self.usable_rows} usable)")
        lines = [head]
        for f in self.findings:
            icon = "Error" if f.severity == "error" else "Warning"
            where = f" (rows {', '.join(map(str, f.rows[:5]))}{'...' if len(f.rows) > 5 else ''})" if f.rows else ""
            lines.append(f"- **{icon}:** {f.message}{where}")
        if self.ok and len(lines) == 1:
            lines.append("- Ready to train.")
        return "\n".join(lines)


def build_report(df: pd.DataFrame, mapping: ColumnMapping) -> DataReport:
    """Check every row once; findings name the row numbers as they appear in the file."""
    unusable = [i + 1 for i, (_, row) in enumerate(df.iterrows()) if row_to_messages(row, mapping) is None]
    usable = len(df) - len(unusable)
    findings: list[Finding] = []
    if usable == 0:
        findings.append(Finding("error", "No row has both a prompt and a response; fill in the "
                                "empty cells or check the column names.", unusable))
    elif unusable:
        findings.append(Finding("warning", f"{len(unusable)} rows have an empty prompt or response "
                                "(or unreadable messages) and will be skipped.", unusable))
    if 0 < usable < FEW_ROWS:
        findings.append(Finding("warning", f"Only {usable} usable rows: the model will learn the "
                                f"format but little else; a few hundred or more work better."))
    return DataReport(mapping, len(df), usable, findings)
