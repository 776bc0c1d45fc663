"""One rule each for sizes, durations, table cells and slugs."""

import pytest

from studio.formatting import GIB, MIB, format_bytes, format_duration, markdown_cell, slug

pytestmark = pytest.mark.unit


def test_sizes_are_binary_so_a_limit_prints_as_itself():
    assert format_bytes(200 * MIB) == "200 MiB"  # never "210 MB" for a 200 MiB limit
    assert format_bytes(1.5 * GIB) == "1.5 GiB" and format_bytes(1.5 * GIB, 2) == "1.50 GiB"
    assert format_bytes(2048 * GIB) == "2,048.0 GiB" and format_bytes(3000) == "3 KiB" and format_bytes(12) == "12 B"


def test_durations():
    assert [format_duration(s) for s in (4.6, 65, 7500)] == ["5s", "1m 05s", "2h 05m"]


def test_a_markdown_cell_cannot_break_the_table_or_inject_markup():
    cell = markdown_cell("a | b <script>x</script>\\ end")
    assert "|" not in cell.replace("\\|", "") and "<script>" not in cell and cell.startswith("a \\| b &lt;script&gt;")
    assert markdown_cell("line one\n\nline  two", multiline=True) == "line one<br><br>line two"
    assert markdown_cell("line one\nline two") == "line one line two"
    assert markdown_cell("x" * 300) == "x" * 200 + "..." and markdown_cell(None, empty="(empty)") == "(empty)"


def test_slugs_are_safe_file_names():
    assert slug("My run: v2/final") == "My-run-v2-final"
    assert slug("../../etc/passwd") == "etc-passwd"
    assert slug("data.v1.csv", None) == "data.v1.csv" and slug("***", fallback="adapter") == "adapter"
    assert slug("a" * 100, 40) == "a" * 40
