"""The docs hold together: every relative markdown link in README.md, ARCHITECTURE.md,
tests/README.md and docs/*.md points to a file that exists (and to a heading that exists, when it
names one in a markdown file), and README.md stays short."""

import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]
README_MAX_LINES = 100
# [text](target) and ![alt](target); the target ends at whitespace or ")" (an optional "title" follows).
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^\s*(```|~~~)")


def _doc_files() -> list[Path]:
    files = [ROOT / "README.md", ROOT / "ARCHITECTURE.md", ROOT / "tests" / "README.md"]
    return files + sorted((ROOT / "docs").glob("*.md"))


def _links(text: str) -> list[tuple[int, str]]:
    """(line number, target) of every markdown link outside fenced code and inline code."""
    found, fenced = [], False
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if fenced:
            continue
        prose = re.sub(r"`[^`]*`", "", line)
        found += [(number, m.group(1)) for m in LINK.finditer(prose)]
    return found


def _anchors(text: str) -> set[str]:
    """The #fragments GitHub gives a file's headings: lowercased, punctuation dropped, spaces to
    hyphens, a repeated heading numbered -1, -2, ..."""
    seen: dict[str, int] = {}
    fenced = False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
        heading = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if fenced or not heading:
            continue
        slug = re.sub(r"[^\w\- ]", "", heading.group(1).lower()).replace(" ", "-")
        seen[slug] = seen.get(slug, -1) + 1
        if seen[slug]:
            seen[f"{slug}-{seen[slug]}"] = 0
    return set(seen)


def _is_relative(target: str) -> bool:
    """A path in this repository (or a #heading of the same file), not a URL."""
    return not re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) and not target.startswith("//")


def test_the_doc_files_exist():
    missing = [str(f.relative_to(ROOT)) for f in _doc_files() if not f.is_file()]
    assert not missing, f"doc files missing: {missing}"
    assert len(_doc_files()) > 4, "docs/ has no pages"


def test_every_relative_link_points_to_a_file():
    broken = []
    for doc in _doc_files():
        for number, target in _links(doc.read_text(encoding="utf-8")):
            if not _is_relative(target):
                continue
            path, _, fragment = target.partition("#")
            file = doc.parent / path if path else doc
            if not file.exists():
                broken.append(f"{doc.relative_to(ROOT)}:{number}: {target} (no such file)")
            elif fragment and file.suffix == ".md" and fragment not in _anchors(file.read_text(encoding="utf-8")):
                broken.append(f"{doc.relative_to(ROOT)}:{number}: {target} (no such heading)")
    assert not broken, "links to files that do not exist:\n" + "\n".join(broken)


def test_the_link_reader_finds_links_and_skips_code():
    text = (
        'see [a](docs/a.md#x) and ![img](../assets/b.png "t")\n`[no](c.md)`\n```\n[no](d.md)\n```\n[web](https://x.org)'
    )
    links = [t for _, t in _links(text)]
    assert links == ["docs/a.md#x", "../assets/b.png", "https://x.org"]
    assert [t for t in links + ["#top"] if _is_relative(t)] == ["docs/a.md#x", "../assets/b.png", "#top"]


def test_anchors_follow_github():
    text = "# The Data tab\n## Memory: which method fits\n```\n# not a heading\n```\n## Speed\n## Speed"
    assert _anchors(text) == {"the-data-tab", "memory-which-method-fits", "speed", "speed-1"}


def test_the_readme_stays_short():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, (
        f"README.md has {len(lines)} lines (at most {README_MAX_LINES}): move details into a docs/ page and link it"
    )
