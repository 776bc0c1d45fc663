"""Small file helpers shared by the run registry, fingerprints and imports (one home each)."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Any


def atomic_write_text(path: Path, text: str) -> None:
    """Write through a temp file and a rename, so a crash never leaves half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def read_json(path: Path) -> Any | None:
    """The parsed JSON in ``path``, or None when it is missing or unreadable."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def stamp(folder: Path, patterns: tuple[str, ...] = ("*.safetensors",)) -> tuple:
    """What identifies the files in ``folder`` matching ``patterns`` without reading them: each
    one's name, size, mtime and inode (sorted). A re-save changes it, in place or by rename
    (an atomic replace is a new inode even when size and mtime happen to match)."""
    out = []
    for pattern in patterns:
        for f in sorted(Path(folder).glob(pattern)):
            st = f.stat()
            out.append((f.name, st.st_size, st.st_mtime_ns, st.st_ino))
    return tuple(out)


_SHA_LOCK = threading.Lock()
_SHAS: dict[tuple[str, tuple], str] = {}  # (folder, stamp) -> sha256 prefix; files change rarely


def weights_sha256(folder: Path) -> str | None:
    """sha256 (first 16 hex) of the ``*.safetensors`` files in ``folder``, in name order: which
    bytes an adapter is. Hashed once per version of the files (keyed by ``stamp``), so the request
    log and the playground, which both ask, read the bytes once. None when there are none."""
    key = (str(folder), stamp(folder))
    if not key[1]:
        return None
    with _SHA_LOCK:
        if key not in _SHAS:
            h = hashlib.sha256()
            for f in sorted(Path(folder).glob("*.safetensors")):
                with f.open("rb") as fh:
                    for chunk in iter(lambda: fh.read(1 << 20), b""):
                        h.update(chunk)
            if len(_SHAS) >= 1024:  # a long-lived server re-saving runs all day: stay bounded
                _SHAS.clear()
            _SHAS[key] = h.hexdigest()[:16]
        return _SHAS[key]
