"""How numbers and user text read in messages, tables, cards and file names: one rule each.

Byte counts are binary (a 200 MiB limit prints as "200 MiB", never "210 MB"), so a size in a
message always matches the limit it is compared with.
"""

from __future__ import annotations

import re

KIB, MIB, GIB = 1024, 1024**2, 1024**3


def format_bytes(n: float, digits: int = 1) -> str:
    """``format_bytes(3 * 1024**3)`` is ``'3.0 GiB'``; MiB and KiB below that, whole numbers."""
    if n >= GIB:
        return f"{n / GIB:,.{digits}f} GiB"
    if n >= MIB:
        return f"{n / MIB:,.0f} MiB"
    if n >= KIB:
        return f"{n / KIB:,.0f} KiB"
    return f"{n:,.0f} B"


def format_duration(seconds: float) -> str:
    """``'45s'``, ``'3m 07s'``, ``'2h 05m'``."""
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m {seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def markdown_cell(value: object, limit: int = 200, multiline: bool = False, empty: str = "") -> str:
    """User text inside a markdown table cell: HTML and pipes escaped so it cannot break the table
    or inject markup, line breaks as ``<br>`` (``multiline``) or spaces, cut to ``limit``."""
    text = "" if value is None else str(value)
    if multiline:
        text = "\n".join(" ".join(line.split()) for line in text.strip().splitlines())
    else:
        text = " ".join(text.split())
    if len(text) > limit:
        text = text[:limit] + "..."
    if not text:
        return empty
    text = text.replace("\\", "\\\\").replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return text.replace("|", "\\|").replace("\n", "<br>")


def slug(text: str, limit: int | None = 60, fallback: str = "run") -> str:
    """Letters, digits, ``._-`` only (each other run of characters becomes ``-``): safe in a
    file name, a folder name and a URL. Cut to ``limit``; ``fallback`` when nothing is left."""
    out = re.sub(r"[^A-Za-z0-9_.-]+", "-", str(text or "")).strip("-.")
    return (out[:limit] if limit else out).strip("-.") or fallback
