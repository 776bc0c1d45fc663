"""Imports point one way, from a higher layer down (ARCHITECTURE.md), counting imports inside
functions; and ARCHITECTURE.md's module map lists exactly the modules in studio/."""

import re
from pathlib import Path

import pytest

from tests.test_dependencies import _imports

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]

# Lowest first. A module may import its own layer and those below, never one above.
LAYERS: list[tuple[str, ...]] = [
    ("studio", "studio.config", "studio.formatting"),
    ("studio.models", "studio.data", "studio.planning", "studio.runs"),
    ("studio.training",),
    ("studio.inference",),
    ("studio.serving",),
    ("studio.evaluation",),
    ("studio.export",),
    ("studio.service",),
    ("studio.ui", "studio.cli", "studio.cli_registry", "studio.launch", "studio.__main__"),
]
ENTRY_POINTS = {"studio.ui", "studio.cli", "studio.cli_registry", "studio.launch", "studio.__main__"}


def _layer(module: str) -> int:
    """The layer of a module: that of the longest package or module named in LAYERS that holds it
    (``studio`` itself is only the package's ``__init__``: a new package must be placed)."""
    best, found = -1, None
    for level, names in enumerate(LAYERS):
        for name in names:
            if (module == name or (name != "studio" and module.startswith(name + "."))) and len(name) > best:
                best, found = len(name), level
    if found is None:
        raise AssertionError(f"{module} is in no layer: add it (or its package) to LAYERS and ARCHITECTURE.md")
    return found


def _upward(graph: dict[str, set[str]]) -> list[str]:
    return [
        f"{src} (layer {_layer(src) + 1}) imports {dst} (layer {_layer(dst) + 1})"
        for src, targets in sorted(graph.items())
        for dst in sorted(targets)
        if _layer(dst) > _layer(src)
    ]


def test_imports_point_down_the_layers():
    upward = _upward(_imports())
    assert not upward, "imports against the layers (ARCHITECTURE.md):\n" + "\n".join(upward)


def test_the_core_never_imports_an_entry_point():
    graph = _imports()
    core = {m for m in graph if not any(m == e or m.startswith(e + ".") for e in ENTRY_POINTS)}
    bad = [f"{m} -> {t}" for m in sorted(core) for t in sorted(graph[m]) if _layer(t) == len(LAYERS) - 1]
    assert not bad, bad


def test_the_layer_check_catches_an_upward_import():
    assert _upward({"studio.data.load": {"studio.training.trainer"}}) == [
        "studio.data.load (layer 2) imports studio.training.trainer (layer 3)"
    ]
    assert _upward({"studio.training.trainer": {"studio.data.load", "studio.config"}}) == []
    with pytest.raises(AssertionError, match="in no layer"):
        _layer("studio.newpackage.thing")


def _mapped_paths(text: str) -> set[str]:
    """Paths in the module map: the first fenced block under '## Module map', indentation = folders."""
    block = text.split("## Module map", 1)[1].split("```", 2)[1]
    paths, folders = set(), []
    for line in block.splitlines():
        match = re.match(r"^( *)(\S+)", line)
        if not match:
            continue
        depth, name = len(match.group(1)) // 2, match.group(2)
        folders = folders[:depth]
        if name.endswith("/"):
            folders.append(name.rstrip("/"))
        elif name.endswith(".py"):
            paths.add("/".join(folders + [name]))
    return paths


def test_the_module_map_matches_the_tree():
    mapped = _mapped_paths((ROOT / "ARCHITECTURE.md").read_text(encoding="utf-8"))
    tree = {p.relative_to(ROOT).as_posix() for p in (ROOT / "studio").rglob("*.py") if p.name != "__init__.py"}
    assert not tree - mapped, f"modules missing from ARCHITECTURE.md's map: {sorted(tree - mapped)}"
    assert not mapped - tree, f"ARCHITECTURE.md maps modules that do not exist: {sorted(mapped - tree)}"


def test_the_map_reader_reads_folders():
    text = "## Module map\n```\nstudio/\n  a.py   x\n  sub/\n    b.py   y\n  c.py\n```\n"
    assert _mapped_paths(text) == {"studio/a.py", "studio/sub/b.py", "studio/c.py"}


def test_the_root_stays_small():
    """The root keeps what every layer shares and the entry points; the rest lives in packages."""
    root = sorted(p.name for p in (ROOT / "studio").glob("*.py"))
    assert len(root) <= 10, root
