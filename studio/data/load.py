"""Read a dataset file into a pandas DataFrame, or fail with a sentence that says why."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pandas as pd

SUFFIXES = (".csv", ".tsv", ".jsonl", ".json", ".parquet")
MAX_BYTES = 200 * 1024 * 1024


class DataError(ValueError):
    """The data cannot be used; the message names the problem and the fix."""


def load_table(path: str | Path, max_bytes: int = MAX_BYTES) -> pd.DataFrame:
    """Read CSV/TSV, JSONL, JSON (array of objects) or Parquet into a DataFrame of the rows.

    Raises:
        DataError: the file is missing, too large, empty or not in a format we read.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"The file {p.name} was not found; upload it again.")
    suffix = p.suffix.lower()
    if suffix not in SUFFIXES:
        raise DataError(f"{p.name} is a {suffix or 'file without extension'}; upload a "
                        f"{', '.join(SUFFIXES)} file.")
    size = p.stat().st_size
    if size == 0:
        raise DataError(f"{p.name} is empty; it needs a header row and at least one example.")
    if size > max_bytes:
        raise DataError(f"{p.name} is {size / 1e6:.0f} MB, above the {max_bytes / 1e6:.0f} MB limit; "
                        "split it or keep a sample.")
    try:
        if suffix in (".csv", ".tsv"):
            df = _read_delimited(p)
        elif suffix == ".jsonl":
            df = pd.read_json(p, lines=True, dtype=False)
        elif suffix == ".json":
            df = _read_json(p)
        else:
            df = pd.read_parquet(p)
    except DataError:
        raise
    except (ValueError, UnicodeDecodeError, pd.errors.ParserError, OSError, ImportError) as exc:
        raise DataError(f"{p.name} could not be read as {suffix[1:].upper()}: "
                        f"{str(exc).splitlines()[0][:200]}. Check that the file is not cut off "
                        "and that every row has the same columns.") from None
    df = df.loc[:, [c for c in df.columns if not str(c).startswith("Unnamed: ")]]
    if df.empty or len(df.columns) == 0:
        raise DataError(f"{p.name} has no rows; it needs a header row and at least one example.")
    df.columns = [str(c).strip() for c in df.columns]
    return df


def _read_delimited(p: Path) -> pd.DataFrame:
    raw = p.read_bytes()
    # UTF-16 only with its BOM: without one, almost any byte string "decodes" as UTF-16.
    encodings = ("utf-16",) if raw[:2] in (b"\xff\xfe", b"\xfe\xff") else ("utf-8-sig", "cp1252", "latin-1")
    for encoding in encodings:
        try:
            text = raw.decode(encoding)
            break
        except UnicodeDecodeError:
            continue
    sample = text[:64_000]
    try:
        delimiter = csv.Sniffer().sniff(sample, delimiters=",;\t|").delimiter
    except csv.Error:
        delimiter = "\t" if p.suffix.lower() == ".tsv" else ","
    # dtype=str keeps "007" and "1e5" as the user wrote them; keep_default_na=False keeps "NA".
    return pd.read_csv(io.StringIO(text), sep=delimiter, dtype=str, keep_default_na=False)


def _read_json(p: Path) -> pd.DataFrame:
    import json

    try:
        data = json.loads(p.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{p.name} is not valid JSON (line {exc.lineno}: {exc.msg}). "
                        "If it holds one object per line, rename it to .jsonl.") from None
    if isinstance(data, dict):  # {"data": [...]} or {"train": [...]}: take the one list inside
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(f"{p.name} holds an object; it should hold a list of examples "
                            "(or an object with exactly one list inside).")
        data = lists[0]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise DataError(f"{p.name} should hold a list of objects such as "
                        '[{"instruction": "...", "output": "..."}].')
    return pd.DataFrame(data)
