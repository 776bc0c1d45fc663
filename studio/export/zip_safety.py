"""Checks that make a zip from the internet safe to read and unpack.

A zip is hostile until proven otherwise: its headers are written by whoever made it. So before
anything is written, every entry is checked, and the whole zip is refused on the first bad one:

- size: at most ``MAX_ENTRIES`` entries, their declared uncompressed sizes summed under a cap,
  and no entry over 1 MiB that inflates more than ``MAX_RATIO`` times (a zip bomb: a few KB that
  unpack to gigabytes and fill the disk or memory). Reading and extracting count the bytes that
  really come out rather than trusting the headers;
- names: no empty or NUL names, backslashes, absolute paths, drive letters, ``.``/``..`` or empty
  components (path traversal: ``../../.bashrc`` would be written outside the target folder), and
  no name twice, case folded (the second would overwrite the first, or collide on a
  case-insensitive disk);
- types: no symbolic links or special files (their type sits in the Unix mode bits of
  ``external_attr``; a link to ``/etc`` turns the next entry's write into a write outside), and
  no encrypted entries (they cannot be checked).

Errors are ``UnsafeZipError`` (a ``ValueError``) with a message that names the entry, the problem
and the fix. What a zip must hold (adapter files, no pickles) is the caller's business, e.g.
``studio.export.adapter_import``.

Example:
    >>> with zipfile.ZipFile("upload.zip") as zf:  # doctest: +SKIP
    ...     entries = check_entries(zf, "upload.zip", max_bytes=2 * 1024**3)
    ...     extract_members(zf, [e for e in entries if not e.is_dir()], Path("unpacked"), 2 * 1024**3, "upload.zip")
"""

from __future__ import annotations

import re
import stat
import zipfile
import zlib
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

from studio.formatting import format_bytes

MAX_ENTRIES = 1000
MAX_RATIO = 100  # deflate reaches ~5x on text, ~1.1x on weights; 1000x is a bomb
RATIO_FLOOR = 2**20  # entries below 1 MiB may inflate as they like: they cannot fill a disk
_CHUNK = 1 << 20


class UnsafeZipError(ValueError):
    """The zip is refused; the message names the entry, the problem and the fix."""


def unsafe_name(name: str) -> str | None:
    """Why an entry name could write outside its folder (a phrase to follow "that"), or None if safe.

    Example:
        >>> unsafe_name("../evil.json")
        "contains '..', '.' or an empty path component"
        >>> unsafe_name("adapter/adapter_config.json") is None
        True
    """
    if not name or "\x00" in name:
        return "has an empty or NUL-containing name"
    if "\\" in name:
        return "contains a backslash (a Windows path separator)"
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        return "is an absolute path"
    parts = name.rstrip("/").split("/")
    if any(p in ("", ".", "..") for p in parts):
        return "contains '..', '.' or an empty path component"
    return None


def check_entry(info: zipfile.ZipInfo, label: str, folder: str = "the folder") -> None:
    """Refuse one entry whose name, type or encryption makes it unsafe to extract.

    Args:
        info: the entry.
        label: how messages call the zip (its file name).
        folder: what the user should zip again, for the fix (e.g. ``"the adapter folder"``).

    Raises:
        UnsafeZipError: the name could leave the folder, it is a link or special file, or it is encrypted.
    """
    name = info.filename
    bad = unsafe_name(name)
    if bad:
        raise UnsafeZipError(
            f"{label} has an entry {name!r} that {bad}; refusing the whole zip, since "
            f"extracting it could write outside its folder. Zip {folder} again."
        )
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode) or (stat.S_IFMT(mode) not in (0, stat.S_IFREG, stat.S_IFDIR)):
        raise UnsafeZipError(
            f"{label} has an entry {name!r} that is a link or special file, not a plain "
            "file; links can point outside the folder. Zip real files only."
        )
    if info.flag_bits & 0x1:
        raise UnsafeZipError(f"{label} is encrypted ({name!r}); export it again without a password.")


def check_entries(
    zf: zipfile.ZipFile,
    label: str,
    max_bytes: int,
    *,
    max_entries: int = MAX_ENTRIES,
    max_ratio: int = MAX_RATIO,
    folder: str = "the folder",
    count_fix: str | None = None,
    size_fix: str | None = None,
) -> list[zipfile.ZipInfo]:
    """Refuse the whole zip on any unsafe entry; return its entries (folders included) when all are safe.

    Only the headers are read, so this is fast on any zip; the sizes it sums are what the zip
    declares, which is why ``extract_members`` and ``read_member`` count real bytes too.

    Args:
        zf: the open zip.
        label: how messages call the zip (its file name).
        max_bytes: the most bytes all entries together may unpack to.
        max_entries: the most entries (files and folders) the zip may hold.
        max_ratio: the most an entry over 1 MiB may inflate (uncompressed / compressed size).
        folder: what the user should zip again, for the fixes (e.g. ``"the adapter folder"``).
        count_fix: the fix after "holds N entries (at most M); " (default: zip just ``folder``).
        size_fix: the fix after "unpacks to more than X MiB, the import limit; ".

    Raises:
        UnsafeZipError: too many entries, too many bytes, a zip bomb, an unsafe name, a link or
            special file, an encrypted entry, or a name twice (case folded).
    """
    infos = zf.infolist()
    if len(infos) > max_entries:
        raise UnsafeZipError(
            f"{label} holds {len(infos)} entries (at most {max_entries}); {count_fix or f'zip just {folder}.'}"
        )
    total, seen = 0, set()
    for info in infos:
        check_entry(info, label, folder)
        name = info.filename
        key = name.rstrip("/").lower()
        if key in seen:
            raise UnsafeZipError(f"{label} holds {name!r} twice; zip {folder} again.")
        seen.add(key)
        if info.is_dir():
            continue
        total += info.file_size
        if total > max_bytes:
            raise UnsafeZipError(
                f"{label} unpacks to more than {format_bytes(max_bytes)}, the import limit; "
                + (size_fix or "zip fewer files, or raise the limit if this size is right.")
            )
        if info.file_size > RATIO_FLOOR and info.file_size > max_ratio * max(info.compress_size, 1):
            ratio = info.file_size // max(info.compress_size, 1)
            raise UnsafeZipError(f"{label} has an entry {name!r} that inflates {ratio}x (a zip bomb?); refusing it.")
    return infos


def read_member(zf: zipfile.ZipFile, name: str, max_bytes: int) -> bytes | None:
    """The bytes of entry ``name``, or None if it is missing, declares more than ``max_bytes``,
    is damaged or encrypted. At most ``max_bytes`` are read whatever the header says.

    For optional files (metadata) that may be absent or broken without failing the whole zip.
    """
    try:
        info = zf.getinfo(name)
    except KeyError:
        return None
    if info.file_size > max_bytes:
        return None
    try:
        with zf.open(info) as f:
            return f.read(max_bytes + 1)[:max_bytes]
    except (zipfile.BadZipFile, zlib.error, OSError, RuntimeError, NotImplementedError, EOFError):
        return None


def extract_members(
    zf: zipfile.ZipFile,
    members: Iterable[zipfile.ZipInfo],
    dest: Path,
    max_bytes: int,
    label: str,
    *,
    root: str = "",
    folder: str = "the folder",
) -> int:
    """Write the file entries ``members`` under ``dest``, each at its name with ``root`` removed.

    Each entry is checked again (name, type, encryption) and its target must resolve inside
    ``dest``; bytes are counted as they come out, so a header that lies about its size stops at
    ``max_bytes``. An existing file is never overwritten, so ``dest`` should be a new folder.
    Folder entries are skipped (folders are made as files need them). Returns the bytes written.

    Raises:
        UnsafeZipError: an entry is unsafe or leaves ``dest``, the bytes pass ``max_bytes``, a
            file would be written twice, or the zip is damaged. What was written stays; write to
            a work folder and remove it on error.
        ValueError: a member's name does not start with ``root`` (a caller's mistake).
    """
    written, top = 0, dest.resolve()
    for info in members:
        if info.is_dir():
            continue
        if not info.filename.startswith(root):
            raise ValueError(f"{info.filename!r} is not under {root!r}")
        check_entry(info, label, folder)
        rel = info.filename[len(root) :]
        target = dest.joinpath(*PurePosixPath(rel).parts)
        if top not in target.resolve().parents:  # belt and braces after the name checks
            raise UnsafeZipError(f"{label} has an entry {info.filename!r} that leaves its folder; refusing it.")
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            with zf.open(info) as src, open(target, "xb") as out:
                for chunk in iter(lambda: src.read(_CHUNK), b""):
                    written += len(chunk)
                    if written > max_bytes:
                        limit = format_bytes(max_bytes)
                        raise UnsafeZipError(f"{label} unpacks to more than {limit}, the import limit.")
                    out.write(chunk)
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError, RuntimeError, NotImplementedError) as exc:
            if isinstance(exc, FileExistsError):
                raise UnsafeZipError(f"{label} holds {rel!r} twice; zip {folder} again.") from None
            raise UnsafeZipError(f"{label} is damaged ({info.filename}: {exc}); export it again.") from None
    return written
