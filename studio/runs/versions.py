"""A run's kept versions: every final save is an immutable ``versions/vN/`` with its lineage.

    versions/v1/        weights (adapter or whole model) + tokenizer + fingerprint.json + version.json
    versions/v2/        ... one folder per final save: the end of training, a Stop that saves,
                        each continuation that finishes, an import

A version exists once its ``version.json`` (the lineage, written last and atomically) is there:
the weights arrive first through a temp folder renamed to ``vN`` (training/checkpoint.py), so a
crash mid-save leaves a folder without ``version.json`` that nothing lists and the next save of
that number replaces. A version's files are never written again; deleting one renames it away
first. Runs from before versions keep their one ``adapter/`` (or ``model/``): it reads as ``v1``.

Refs name a version as ``RUN@vN`` (``RUN`` alone is the latest); ``RUN@step-N`` stays a checkpoint.

This module works on run folders (paths), so the registry can use it without an import cycle.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from studio.config import RunConfig
from studio.runs.files import atomic_write_text, read_json
from studio.runs.records import RunStatus

FOLDER = "versions"
RECORD = "version.json"
SCORES = "scores.json"  # the version's task evaluations, in brief (studio/evaluation/task.py adds them)
SCORES_KEPT = 20
LEGACY_FOLDERS = ("adapter", "model")  # where a run kept its one save before versions
_POINT = re.compile(r"^v([1-9][0-9]*)$")
# Kept by default: an adapter version is megabytes, a full fine-tune's version is a whole model.
DEFAULT_KEEP = {"full": 2}
DEFAULT_KEEP_ADAPTERS = 10


def default_keep(method: str | None) -> int:
    return DEFAULT_KEEP.get(method or "", DEFAULT_KEEP_ADAPTERS)


def number_of(point: str | None) -> int | None:
    """``"v3"`` -> 3; anything else (a checkpoint ``step-N``, None) -> None."""
    m = _POINT.match(point or "")
    return int(m.group(1)) if m else None


def label(number: int) -> str:
    return f"v{number}"


@dataclass(frozen=True)
class Version:
    """One kept version of a run: where its weights are and what it is (``record``, the lineage)."""

    number: int
    path: Path
    record: dict[str, Any] = field(default_factory=dict, compare=False)
    legacy: bool = False  # the adapter/ or model/ of a run from before versions

    @property
    def label(self) -> str:
        return label(self.number)

    @property
    def parent(self) -> int | None:
        p = self.record.get("parent")
        return p if isinstance(p, int) else None

    def scores(self) -> list[dict[str, Any]]:
        """Its task evaluations in brief, newest first."""
        data = read_json(self.path / SCORES)
        return [d for d in data if isinstance(d, dict)] if isinstance(data, list) else []

    def disk_bytes(self) -> int:
        """What deleting it frees: every file in its folder."""
        return folder_bytes(self.path)


def folder_bytes(folder: Path) -> int:
    total = 0
    for f in Path(folder).rglob("*"):
        try:
            if f.is_file() and not f.is_symlink():
                total += f.stat().st_size
        except OSError:  # deleted while we looked
            continue
    return total


def has_weights(folder: Path) -> bool:
    return (folder / "adapter_config.json").exists() or (folder / "config.json").exists()


def listing(run_dir: Path) -> list[Version]:
    """The run's complete versions, oldest first; a legacy ``adapter/``/``model/`` is ``v1``."""
    out: dict[int, Version] = {}
    root = Path(run_dir) / FOLDER
    if root.is_dir():
        for d in root.iterdir():
            n = number_of(d.name)
            record = read_json(d / RECORD) if n is not None else None
            if n is not None and isinstance(record, dict) and has_weights(d):
                out[n] = Version(n, d, record)
    if 1 not in out:
        for name in LEGACY_FOLDERS:
            legacy = Path(run_dir) / name
            if has_weights(legacy):
                out[1] = Version(1, legacy, {}, legacy=True)
                break
    return [out[n] for n in sorted(out)]


def folder_for(run_dir: Path, number: int) -> Path:
    """Where version ``number``'s weights are saved (through a temp folder renamed to it)."""
    return Path(run_dir) / FOLDER / label(number)


def next_number(run_dir: Path) -> int:
    kept = listing(run_dir)
    root = Path(run_dir) / FOLDER
    # Numbers are never reused, even after a delete: a ref once logged always meant one artifact.
    used = [v.number for v in kept] + [n for n in _deleted_numbers(root)]
    return max(used, default=0) + 1


def _deleted_numbers(root: Path) -> list[int]:
    data = read_json(root / "deleted.json")
    return [n for n in data if isinstance(n, int)] if isinstance(data, list) else []


def commit(run_dir: Path, number: int, record: dict[str, Any]) -> Version:
    """Make the saved weights in ``folder_for(run_dir, number)`` version ``number``: its lineage
    written last, atomically. Raises FileNotFoundError when no weights were saved there."""
    folder = folder_for(run_dir, number)
    if not has_weights(folder):
        raise FileNotFoundError(f"No weights were saved in {folder}.")
    record = dict(record, version=number, created_at=record.get("created_at") or time.time())
    record["disk_bytes"] = folder_bytes(folder)
    atomic_write_text(folder / RECORD, json.dumps(record, indent=2, default=str))
    return Version(number, folder, record)


def remove(run_dir: Path, version: Version) -> None:
    """Delete one version's folder: renamed away first, so a crash never leaves half a version.
    Its number is remembered, never given to another save."""
    root = Path(run_dir) / FOLDER
    root.mkdir(exist_ok=True)
    gone = sorted(set(_deleted_numbers(root)) | {version.number})
    atomic_write_text(root / "deleted.json", json.dumps(gone))
    doomed = version.path.with_name(f".deleting-{version.path.name}-{os.getpid()}")
    os.replace(version.path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def lineage(
    status: RunStatus, config: RunConfig | None, fp: dict[str, Any] | None, at: float | None = None
) -> dict[str, Any]:
    """What a version is, from its run's status and config when it was saved (``at``, default
    now): the base (id and fingerprint), the data (files, sha256, rows), the settings, where and
    how long it trained."""
    end = at or time.time()
    data = config.data if config is not None else None
    return {
        "step": status.step,
        "method": status.method,
        "model": status.model,
        "base_fingerprint": fp,
        "data": {
            "file": Path(data.path).name if data and data.path else None,
            "eval_file": Path(data.eval_path).name if data and data.eval_path else None,
            "sha256": status.data_sha256,
            "train_rows": status.train_rows,
            "eval_rows": status.eval_rows,
        },
        "config": config.to_dict() if config is not None else None,
        "device": status.device,
        "precision": status.precision,
        "train_seconds": round(end - status.started_at, 1) if status.started_at else None,
        "final_loss": status.final_loss,
        "eval_loss": status.eval_loss,
    }


def add_scores(version: Version, brief: dict[str, Any]) -> None:
    """Keep an evaluation's brief with the version it scored (the weights never change; what is
    known about them grows). The newest first, the latest SCORES_KEPT."""
    kept = [brief, *version.scores()][:SCORES_KEPT]
    atomic_write_text(version.path / SCORES, json.dumps(kept, indent=1))


def public(version: Version) -> dict[str, Any]:
    """The lineage as others may read it (GET /v1/models/{id}, a zip): no local paths."""
    r = version.record
    fp = dict(r.get("base_fingerprint") or {})
    if fp.get("model"):
        fp["model"] = _portable_model(fp["model"])
    return {
        "version": version.number,
        "parent": r.get("parent"),
        "kind": r.get("kind"),
        "created_at": r.get("created_at"),
        "step": r.get("step"),
        "method": r.get("method"),
        "base": {"model": _portable_model(r.get("model")), "fingerprint": fp},
        "data": r.get("data"),
        "config": _portable_config(r.get("config")),
        "device": r.get("device"),
        "precision": r.get("precision"),
        "train_seconds": r.get("train_seconds"),
        "final_loss": r.get("final_loss"),
        "eval_loss": r.get("eval_loss"),
        "weights_sha256": r.get("weights_sha256"),
        "disk_bytes": r.get("disk_bytes"),
        "scores": version.scores(),
    }


def _portable_config(config: dict[str, Any] | None) -> dict[str, Any] | None:
    """The settings with the data files named by file name (their folders are this machine's)."""
    if not isinstance(config, dict):
        return config
    out = json.loads(json.dumps(config))
    data = out.get("data") if isinstance(out.get("data"), dict) else {}
    for key in ("path", "eval_path"):
        if data.get(key):
            data[key] = Path(str(data[key])).name
    if out.get("model"):
        out["model"] = _portable_model(out["model"])
    return out


def _portable_model(model: str | None) -> str | None:
    """A base named by a local folder is named by the folder's name: paths stay on this machine."""
    return Path(model).name if model and os.path.isabs(model) else model


def config_diff(old: dict[str, Any] | None, new: dict[str, Any] | None) -> list[tuple[str, Any, Any]]:
    """The settings that differ between two versions' configs, as (dotted name, old, new)."""
    a, b = _flatten(old or {}), _flatten(new or {})
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
