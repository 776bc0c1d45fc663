"""studio.export.zip_safety on real zips built in tmp_path: every refusal names its problem, and a clean
zip unpacks inside its folder and nowhere else."""

from __future__ import annotations

import stat
import warnings
import zipfile
from pathlib import Path

import pytest

from studio.export.zip_safety import (
    MAX_ENTRIES,
    UnsafeZipError,
    check_entries,
    extract_members,
    read_member,
    unsafe_name,
)
from studio.formatting import GIB, format_bytes

pytestmark = pytest.mark.unit


def _zip(path: Path, entries: dict, compression: int = zipfile.ZIP_DEFLATED) -> Path:
    """A zip at ``path`` holding ``entries`` (name -> bytes, or name -> (ZipInfo, bytes))."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about a duplicate name, which some tests want
        with zipfile.ZipFile(path, "w", compression) as zf:
            for name, data in entries.items():
                if isinstance(data, tuple):
                    zf.writestr(*data)
                else:
                    zf.writestr(name, data)
    return path


def _refused(path: Path, max_bytes: int = GIB, **kwargs) -> str:
    with zipfile.ZipFile(path) as zf, pytest.raises(UnsafeZipError) as err:
        check_entries(zf, path.name, max_bytes, **kwargs)
    return str(err.value)


def _typed(name: str, mode: int) -> tuple[zipfile.ZipInfo, bytes]:
    info = zipfile.ZipInfo(name)
    info.create_system = 3  # Unix: the file type sits in the high 16 bits of external_attr
    info.external_attr = mode << 16
    return info, b"/etc/passwd"


@pytest.mark.parametrize(
    "name, problem",
    [
        ("../x", "contains '..', '.' or an empty path component"),
        ("a/../../x", "contains '..', '.' or an empty path component"),
        ("a//x", "contains '..', '.' or an empty path component"),
        ("/etc/x", "is an absolute path"),
        ("C:/x", "is an absolute path"),
        ("c:x", "is an absolute path"),
        ("C:\\x", "contains a backslash (a Windows path separator)"),
        ("..\\x", "contains a backslash (a Windows path separator)"),
        ("", "has an empty or NUL-containing name"),
        ("x\x00.json", "has an empty or NUL-containing name"),
    ],
)
def test_unsafe_name_says_what_is_wrong(name, problem):
    assert unsafe_name(name) == problem


@pytest.mark.parametrize("name", ["x.json", "adapter/x.json", "adapter/", "a.b/..c/x...json"])
def test_safe_names_pass(name):
    assert unsafe_name(name) is None


@pytest.mark.parametrize(
    "name, problem",
    [
        ("../x", "contains '..'"),
        ("/etc/x", "is an absolute path"),
        ("C:\\x", "contains a backslash"),
        ("..\\x", "contains a backslash"),
        ("C:/x", "is an absolute path"),
    ],
)
def test_a_zip_with_an_escaping_name_is_refused_whole(tmp_path, name, problem):
    path = _zip(tmp_path / "bad.zip", {"ok.json": b"{}", name: b"evil"})
    message = _refused(path, folder="the adapter folder")
    assert message.startswith(f"bad.zip has an entry {name!r} that {problem}")
    assert "could write outside its folder. Zip the adapter folder again." in message


@pytest.mark.parametrize("mode", [stat.S_IFLNK | 0o777, stat.S_IFIFO | 0o644, stat.S_IFCHR | 0o644])
def test_links_and_special_files_are_refused(tmp_path, mode):
    path = _zip(tmp_path / "link.zip", {"ok.json": b"{}", "link": _typed("link", mode)})
    assert _refused(path) == (
        "link.zip has an entry 'link' that is a link or special file, not a plain file; "
        "links can point outside the folder. Zip real files only."
    )


def test_plain_files_and_folders_with_unix_modes_pass(tmp_path):
    path = _zip(
        tmp_path / "modes.zip",
        {"d/": _typed("d/", stat.S_IFDIR | 0o755), "d/f.json": _typed("d/f.json", stat.S_IFREG | 0o644)},
    )
    with zipfile.ZipFile(path) as zf:
        assert [i.filename for i in check_entries(zf, "modes.zip", GIB)] == ["d/", "d/f.json"]


def test_too_many_entries(tmp_path):
    path = _zip(tmp_path / "many.zip", {f"f{i}.txt": b"" for i in range(MAX_ENTRIES + 1)}, zipfile.ZIP_STORED)
    assert _refused(path) == f"many.zip holds {MAX_ENTRIES + 1} entries (at most {MAX_ENTRIES}); zip just the folder."
    fix = "an adapter zip holds a dozen files. Zip just the adapter folder."
    assert (
        _refused(path, max_entries=10, count_fix=fix) == f"many.zip holds {MAX_ENTRIES + 1} entries (at most 10); {fix}"
    )


def test_declared_size_over_the_limit(tmp_path):
    path = _zip(tmp_path / "big.zip", {"a.txt": b"a" * 3000, "b.txt": b"b" * 3000})
    assert _refused(path, max_bytes=5000) == (
        f"big.zip unpacks to more than {format_bytes(5000)}, the import limit; "
        "zip fewer files, or raise the limit if this size is right."
    )
    with zipfile.ZipFile(path) as zf:
        check_entries(zf, "big.zip", 6000)  # exactly the sum fits


def test_a_header_that_claims_terabytes_is_refused_before_reading(tmp_path):
    path = _zip(tmp_path / "liar.zip", {"a.txt": b"tiny"})
    with zipfile.ZipFile(path) as zf:
        zf.getinfo("a.txt").file_size = 2**40
        with pytest.raises(UnsafeZipError, match=r"unpacks to more than 2.0 GiB, the import limit; raise it"):
            check_entries(zf, "liar.zip", 2 * GIB, size_fix="raise it")


def test_a_compression_bomb_is_refused(tmp_path):
    path = _zip(tmp_path / "bomb.zip", {"zeros.bin": bytes(50 * 2**20)})
    message = _refused(path, max_bytes=2 * GIB)
    assert message.startswith("bomb.zip has an entry 'zeros.bin' that inflates ")
    assert message.endswith("x (a zip bomb?); refusing it.")
    assert int(message.split("inflates ")[1].split("x")[0]) > 100


def test_a_small_entry_may_compress_well(tmp_path):
    path = _zip(tmp_path / "small.zip", {"zeros.txt": bytes(2**20)})  # 1 MiB of zeros: ~1000x, but harmless
    with zipfile.ZipFile(path) as zf:
        check_entries(zf, "small.zip", GIB)


@pytest.mark.parametrize("second", ["a.json", "A.JSON", "a.json/"])
def test_a_name_twice_is_refused(tmp_path, second):
    path = _zip(tmp_path / "dup.zip", {"a.json": b"{}", "x": (zipfile.ZipInfo(second), b"{}")})
    assert _refused(path) == f"dup.zip holds {second!r} twice; zip the folder again."


def test_encrypted_entries_are_refused(tmp_path):
    path = _zip(tmp_path / "locked.zip", {"a.json": b"{}"})
    with zipfile.ZipFile(path) as zf:
        zf.getinfo("a.json").flag_bits |= 0x1
        with pytest.raises(UnsafeZipError, match=r"^locked.zip is encrypted \('a.json'\); export it again"):
            check_entries(zf, "locked.zip", GIB)


def test_read_member_is_bounded(tmp_path):
    path = _zip(tmp_path / "meta.zip", {"a.json": b"x" * 100})
    with zipfile.ZipFile(path) as zf:
        assert read_member(zf, "a.json", 100) == b"x" * 100
        assert read_member(zf, "a.json", 99) is None  # declared too big: not read at all
        assert read_member(zf, "missing.json", 100) is None
        zf.getinfo("a.json").file_size = 10  # a header that under-declares: still at most the limit
        assert read_member(zf, "a.json", 50) in (None, b"x" * 10)


def test_a_clean_zip_extracts_into_the_target_and_nowhere_else(tmp_path):
    path = _zip(
        tmp_path / "clean.zip",
        {"top/": b"", "top/a.json": b"{}", "top/sub/b.txt": b"hello", "top/c.safetensors": b"\x01" * 10},
    )
    dest = tmp_path / "out" / "dest"
    dest.mkdir(parents=True)
    with zipfile.ZipFile(path) as zf:
        entries = check_entries(zf, "clean.zip", GIB)
        written = extract_members(zf, entries, dest, GIB, "clean.zip", root="top/")
    assert written == 2 + 5 + 10
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()) == [
        "clean.zip",
        "out/dest/a.json",
        "out/dest/c.safetensors",
        "out/dest/sub/b.txt",
    ]
    assert (dest / "sub" / "b.txt").read_bytes() == b"hello"


def test_extract_checks_names_itself_and_writes_nothing_outside(tmp_path):
    path = _zip(tmp_path / "bad.zip", {"../escaped.txt": b"evil", "link": _typed("link", stat.S_IFLNK | 0o777)})
    dest = tmp_path / "dest"
    dest.mkdir()
    with zipfile.ZipFile(path) as zf:  # no check_entries first: extract_members still refuses
        for info in zf.infolist():
            with pytest.raises(UnsafeZipError, match="could write outside|link or special file"):
                extract_members(zf, [info], dest, GIB, "bad.zip")
    assert not (tmp_path / "escaped.txt").exists() and list(dest.iterdir()) == []


def test_extract_counts_real_bytes_and_never_overwrites(tmp_path):
    path = _zip(tmp_path / "two.zip", {"a.txt": b"a" * 600, "b.txt": b"b" * 600})
    with zipfile.ZipFile(path) as zf:
        with pytest.raises(UnsafeZipError, match=r"^two.zip unpacks to more than 1,000 B, the import limit.$"):
            extract_members(zf, zf.infolist(), tmp_path / "small", 1000, "two.zip")
        (tmp_path / "again").mkdir()
        (tmp_path / "again" / "a.txt").write_text("mine")
        with pytest.raises(UnsafeZipError, match=r"^two.zip holds 'a.txt' twice; zip the adapter folder again.$"):
            extract_members(zf, zf.infolist(), tmp_path / "again", GIB, "two.zip", folder="the adapter folder")
    assert (tmp_path / "again" / "a.txt").read_text() == "mine"


def test_extract_reports_a_damaged_entry(tmp_path):
    path = _zip(tmp_path / "damaged.zip", {"a.txt": b"hello world" * 100})
    raw = bytearray(path.read_bytes())
    start = raw.index(b"a.txt") + len(b"a.txt")  # the first name is the local header's; data follows
    raw[start : start + 20] = bytes(20)
    path.write_bytes(bytes(raw))
    with zipfile.ZipFile(path) as zf:
        with pytest.raises(UnsafeZipError, match=r"^damaged.zip is damaged \(a.txt: .*\); export it again.$"):
            extract_members(zf, zf.infolist(), tmp_path / "dest", GIB, "damaged.zip")
        assert read_member(zf, "a.txt", GIB) is None


def test_members_outside_root_are_a_callers_mistake(tmp_path):
    path = _zip(tmp_path / "r.zip", {"other/a.txt": b"x"})
    with zipfile.ZipFile(path) as zf, pytest.raises(ValueError, match="is not under 'top/'"):
        extract_members(zf, zf.infolist(), tmp_path / "dest", GIB, "r.zip", root="top/")


def test_sizes_in_messages_use_binary_units():
    assert format_bytes(3 * 1024**2) == "3 MiB" and format_bytes(2 * GIB) == "2.0 GiB" and format_bytes(5000) == "5 KiB"
