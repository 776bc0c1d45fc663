"""Read a dataset file into a pandas DataFrame, or fail with a sentence that says why.

CSV/TSV: the encoding is tried in order (UTF-8 with or without BOM, UTF-16 with its BOM, then
cp1252 and latin-1) and the delimiter sniffed among comma, semicolon, tab and pipe; both are
reported so a user can see what we assumed. Excel-style exports' unnamed index column is dropped.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

SUFFIXES = (".csv", ".tsv", ".jsonl", ".json", ".parquet")
MAX_BYTES = 200 * 1024 * 1024
DELIMITER_NAMES = {",": "comma", ";": "semicolon", "\t": "tab", "|": "pipe"}


class DataError(ValueError):
    """The data cannot be used; the message names the problem and the fix."""


@dataclass
class Table:
    """A loaded file: its rows plus what we had to assume to read it."""

    df: pd.DataFrame
    kind: str  # csv, jsonl, json, parquet
    encoding: str | None = None
    delimiter: str | None = None

    def describe(self) -> str:
        parts = [self.kind.upper()]
        if self.encoding:
            parts.append(self.encoding)
        if self.delimiter:
            parts.append(f"{DELIMITER_NAMES.get(self.delimiter, repr(self.delimiter))}-separated")
        return ", ".join(parts)


def read_table(path: str | Path, max_bytes: int = MAX_BYTES) -> Table:
    """Read CSV/TSV, JSONL, JSON (array of objects, or an object holding one) or Parquet.

    Raises:
        DataError: the file is missing, too large, empty or not in a format we read.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"The file {p.name} was not found; upload it again.")
    suffix = p.suffix.lower()
    if suffix not in SUFFIXES:
        raise DataError(f"{p.name} is a {suffix or 'file without extension'}; upload a {', '.join(SUFFIXES)} file.")
    size = p.stat().st_size
    if size == 0:
        raise DataError(f"{p.name} is empty; it needs a header row and at least one example.")
    if size > max_bytes:
        raise DataError(
            f"{p.name} is {size / 1e6:.0f} MB, above the {max_bytes / 1e6:.0f} MB limit; "
            "split it, keep a sample, or raise data.max_file_mb."
        )
    try:
        if suffix in (".csv", ".tsv"):
            table = _read_delimited(p)
        elif suffix == ".jsonl":
            table = Table(_read_jsonl(p), "jsonl", "UTF-8")
        elif suffix == ".json":
            table = Table(_read_json(p), "json", "UTF-8")
        else:
            table = Table(pd.read_parquet(p), "parquet")
    except DataError:
        raise
    except (ValueError, UnicodeDecodeError, pd.errors.ParserError, OSError, ImportError) as exc:
        raise DataError(
            f"{p.name} could not be read as {suffix[1:].upper()}: "
            f"{str(exc).splitlines()[0][:200]}. Check that the file is not cut off "
            "and that every row has the same columns."
        ) from None
    df = table.df
    df = df.loc[:, [c for c in df.columns if not str(c).startswith("Unnamed: ")]]
    if df.empty or len(df.columns) == 0:
        raise DataError(f"{p.name} has no rows; it needs a header row and at least one example.")
    df.columns = [str(c).strip() for c in df.columns]
    table.df = df.reset_index(drop=True)
    return table


def load_table(path: str | Path, max_bytes: int = MAX_BYTES) -> pd.DataFrame:
    """The rows of a dataset file (see :func:`read_table`)."""
    return read_table(path, max_bytes).df


def _decode(raw: bytes) -> tuple[str, str]:
    if raw[:2] in (b"\xff\xfe", b"\xfe\xff"):
        # UTF-16 only with its BOM: without one, almost any byte string "decodes" as UTF-16.
        return raw.decode("utf-16"), "UTF-16"
    if raw[:3] == b"\xef\xbb\xbf":
        return raw[3:].decode("utf-8"), "UTF-8 with BOM"
    try:
        return raw.decode("utf-8"), "UTF-8"
    except UnicodeDecodeError:
        pass
    try:
        return raw.decode("cp1252"), "Windows-1252 (not UTF-8)"
    except UnicodeDecodeError:
        return raw.decode("latin-1"), "Latin-1 (not UTF-8)"


def _read_delimited(p: Path) -> Table:
    raw = p.read_bytes()
    if b"\x00" in raw[:4096] and raw[:2] not in (b"\xff\xfe", b"\xfe\xff"):
        raise DataError(
            f"{p.name} looks like a binary file (for example a spreadsheet saved as .xlsx), "
            "not text; export it as CSV (UTF-8)."
        )
    text, encoding = _decode(raw)
    delimiter = _sniff_delimiter(text, p.suffix.lower())
    # dtype=str keeps "007" and "1e5" as the user wrote them; keep_default_na=False keeps "NA".
    df = pd.read_csv(io.StringIO(text), sep=delimiter, dtype=str, keep_default_na=False)
    return Table(df, "csv", encoding, delimiter)


def _sniff_delimiter(text: str, suffix: str) -> str:
    """The csv module's sniffer, checked against the header: a delimiter that does not appear
    in the header line cannot separate columns (a one-column file whose text holds "|" or ";"
    would otherwise be split on it)."""
    header = text.split("\n", 1)[0]
    in_header = [d for d in ",;\t|" if d in header]
    if not in_header:
        return "\t" if suffix == ".tsv" else ","
    try:
        sniffed = csv.Sniffer().sniff(text[:64_000], delimiters="".join(in_header)).delimiter
    except csv.Error:
        sniffed = None
    if sniffed in in_header:
        return sniffed
    return max(in_header, key=header.count)


def _read_jsonl(p: Path) -> pd.DataFrame:
    rows = []
    for n, line in enumerate(p.read_text(encoding="utf-8-sig").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{p.name} line {n} is not valid JSON ({exc.msg}); each line must hold one JSON object."
            ) from None
        if not isinstance(row, dict):
            raise DataError(
                f"{p.name} line {n} holds a {type(row).__name__}, not an object like "
                '{"prompt": "...", "completion": "..."}.'
            )
        rows.append(row)
    return pd.DataFrame(rows)


def _read_json(p: Path) -> pd.DataFrame:
    try:
        data = json.loads(p.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{p.name} is not valid JSON (line {exc.lineno}: {exc.msg}). "
            "If it holds one object per line, rename it to .jsonl."
        ) from None
    if isinstance(data, dict):  # {"data": [...]} or {"train": [...]}: take the one list inside
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(
                f"{p.name} holds an object; it should hold a list of examples "
                "(or an object with exactly one list inside)."
            )
        data = lists[0]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise DataError(f'{p.name} should hold a list of objects such as [{{"instruction": "...", "output": "..."}}].')
    return pd.DataFrame(data)
