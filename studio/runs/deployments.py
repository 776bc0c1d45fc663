"""Deployments: stable names that point at one adapter version (``support-bot -> RUN@v3``), with
an append-only history, shared by every process on one runs folder.

    <runs>/deployments/<name>.json   {"name", "run", "version", "history": [entry, ...]}
    <runs>/deployments/.lock         one lock over every change (filelock: POSIX and Windows)

An entry is ``{"at", "action", "from", "to", "why"}`` (``action``: set or rollback; refs as
``RUN@vN``). The pointer and its history live in one file, replaced atomically (temp file +
rename) while the lock is held, so a kill -9 mid-change leaves the old file or the new one: the
last entry always names what the pointer holds. Two processes changing one name at once take
turns; each appends its entry and the later one's pointer wins. Readers take no lock (a rename
is atomic) and read the file on every request, so a promotion in one process is what the next
request in any other gets.

Example:
    >>> deployments = Deployments(registry)
    >>> deployments.set("support-bot", "20261206-101500-lora-faq@v2", why="v2 beats v1 on exact match")
    >>> deployments.rollback("support-bot", why="complaints")   # back to what it held before
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from studio.runs import fingerprint, versions
from studio.runs.files import atomic_write_text, read_json
from studio.runs.registry import Run, RunRegistry

FOLDER = "deployments"
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
RESERVED = ("default", "base")  # what a request's model already means
ADAPTER_METHODS = ("lora", "qlora")
LOCK_TIMEOUT_S = 30.0


@dataclass
class Deployment:
    """A name and the version it points at, with every change that led there (oldest first)."""

    name: str
    run: str
    version: int
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ref(self) -> str:
        return ref_of(self.run, self.version)

    @property
    def updated_at(self) -> float:
        return float(self.history[-1]["at"]) if self.history else 0.0

    def rollback_target(self) -> str | None:
        """What a rollback returns to: the ref held before the current one (a set pushes, a
        rollback pops, so rolling back twice goes two steps back, not back and forth)."""
        stack: list[str] = []
        for entry in self.history:
            if entry.get("action") == "rollback" and len(stack) > 1:
                stack.pop()
            else:
                stack.append(entry["to"])
        return stack[-2] if len(stack) > 1 else None


def ref_of(run_id: str, number: int) -> str:
    return f"{run_id}@{versions.label(number)}"


class DeploymentError(ValueError):
    """A deployment that cannot be made: the message says why and what to do."""


class Deployments:
    """The deployments of one runs folder."""

    def __init__(self, registry: RunRegistry):
        self.registry = registry
        self.folder = registry.root / FOLDER

    def _path(self, name: str) -> Path:
        return self.folder / f"{name}.json"

    # ---- reading (no lock) --------------------------------------------------------------
    def get(self, name: str) -> Deployment | None:
        """The deployment called ``name``; None when there is none (or ``name`` cannot be one)."""
        if not isinstance(name, str) or not NAME.match(name):
            return None
        data = read_json(self._path(name))
        if not isinstance(data, dict) or not isinstance(data.get("version"), int):
            return None
        return Deployment(name, str(data.get("run")), data["version"], list(data.get("history") or []))

    def list(self) -> list[Deployment]:
        """Every deployment, by name."""
        if not self.folder.is_dir():
            return []
        found = (self.get(p.stem) for p in sorted(self.folder.glob("*.json")))
        return [d for d in found if d is not None]

    def holding(self, run_id: str, number: int) -> list[str]:
        """The names pointing at ``run_id@vN``: that version may not be deleted."""
        return [d.name for d in self.list() if d.run == run_id and d.version == number]

    def held_versions(self, run_id: str) -> set[int]:
        return {d.version for d in self.list() if d.run == run_id}

    def version_rows(self, run: Run) -> list[dict[str, Any]]:
        """One dict per kept version, oldest first: what `versions` prints and the Registry view shows."""
        rows, previous = [], None
        for v in run.versions():
            r = v.record
            rows.append(
                {
                    "version": v.label,
                    "ref": f"{run.id}@{v.label}",
                    "kind": r.get("kind"),
                    "parent": versions.label(v.parent) if v.parent else None,
                    "step": r.get("step"),
                    "saved": time.strftime("%Y-%m-%d %H:%M", time.localtime(r.get("created_at") or 0)),
                    "disk_bytes": v.disk_bytes(),
                    "eval_loss": r.get("eval_loss"),
                    "data_sha256": (r.get("data") or {}).get("sha256"),
                    "weights_sha256": r.get("weights_sha256"),
                    "deployed_as": self.holding(run.id, v.number),
                    "changed": versions.config_diff(previous.record.get("config"), r.get("config")) if previous else [],
                    "scores": [_score(s) for s in v.scores()],
                    "another_base": another_base(v),
                }
            )
            previous = v
        return rows

    # ---- changing (under the lock) ------------------------------------------------------
    def set(self, name: str, ref: str, why: str = "", *, action: str = "set") -> Deployment:
        """Point ``name`` at ``ref`` (``RUN@vN``, or ``RUN`` for its latest version, recorded as
        the number it is now). Raises DeploymentError with the reason and the fix."""
        self.check_name(name)
        run, number = self.resolve(ref)
        return self._change(name, ref_of(run.id, number), why, action)

    def rollback(self, name: str, why: str = "") -> Deployment:
        """Point ``name`` back at what it held before its current version."""
        return self._change(name, None, why, "rollback")

    def _change(self, name: str, target: str | None, why: str, action: str) -> Deployment:
        """Append the change and point ``name`` at ``target`` (a rollback: the ref before the
        current one, read under the lock), in one atomic write while the lock is held."""
        self.folder.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(self.folder / ".lock"))
        try:
            lock.acquire(timeout=LOCK_TIMEOUT_S)
        except Timeout:
            raise DeploymentError(
                f"Another process has held the deployments lock ({self.folder / '.lock'}) for over "
                f"{LOCK_TIMEOUT_S:.0f} s; try again, or look for a stuck `finetune-studio` process."
            ) from None
        try:
            before = self.get(name)  # read under the lock: another process may just have changed it
            if action == "rollback":
                target = self._rollback_target(name, before)
            entry = {
                "at": time.time(),
                "action": action,
                "from": before.ref if before else None,
                "to": target,
                "why": " ".join(str(why or "").split())[:500],
            }
            history = (before.history if before else []) + [entry]
            run_id, _, point = target.rpartition("@")
            deployment = Deployment(name, run_id, versions.number_of(point) or 0, history)
            body = {"name": name, "run": run_id, "version": deployment.version, "history": history}
            atomic_write_text(self._path(name), json.dumps(body, indent=1))
        finally:
            lock.release()
        return deployment

    def _rollback_target(self, name: str, current: Deployment | None) -> str:
        if current is None:
            raise DeploymentError(f"There is no deployment called {name!r}; `deploy list` shows them.")
        target = current.rollback_target()
        if target is None:
            raise DeploymentError(
                f"{name} has nothing to roll back to (it holds {current.ref}, and every earlier version "
                "was rolled back past already); point it at another version with `deploy set`."
            )
        run, number = self.resolve(target)  # still there, and still an adapter on a base we know
        return ref_of(run.id, number)

    # ---- rules ----------------------------------------------------------------------------
    def check_name(self, name: str) -> None:
        """A deployment name is letters, digits, ``. _ -`` and may not be taken by what a request's
        ``model`` already means: a run id, ``default``, a base model id."""
        if not isinstance(name, str) or not NAME.match(name):
            raise DeploymentError(
                f"{name!r} cannot be a deployment name: use 1-64 letters, digits, '.', '_' or '-', "
                "starting with a letter or digit (for example support-bot)."
            )
        if name.lower() in RESERVED:
            raise DeploymentError(f"{name!r} already means the base model in a request; pick another name.")
        if (self.registry.root / name / "status.json").exists():
            raise DeploymentError(f"{name!r} is a run id; a deployment needs a name of its own.")
        bases = {r.status().model for r in self.registry.list()}
        if name in bases:
            raise DeploymentError(f"{name!r} is a base model's id; a deployment needs a name of its own.")

    def resolve(self, ref: str) -> tuple[Run, int]:
        """The run and version number ``ref`` names, when it can be deployed. Raises
        DeploymentError: no such run or version, a checkpoint, a full fine-tune, not finished."""
        run_id, _, point = str(ref).partition("@")
        try:
            run = self.registry.get(run_id)
        except LookupError as exc:
            raise DeploymentError(str(exc)) from None
        if point and versions.number_of(point) is None:
            raise DeploymentError(
                f"{ref!r} is a checkpoint, not a version: deployments point at kept versions "
                f"({run.id}@vN; `finetune-studio versions {run.id}` lists them)."
            )
        status = run.status()
        if status.method not in ADAPTER_METHODS:
            raise DeploymentError(
                f"Run {run.id} is a full fine-tune: a whole model, and the server serves adapters on one "
                "base. Export it (merged) and serve it on its own."
            )
        kept = run.versions()
        if not kept:
            raise DeploymentError(f"Run {run.id} has no saved version yet (it is {status.state}).")
        number = versions.number_of(point) if point else kept[-1].number
        try:
            run.get_version(number)
        except ValueError as exc:
            raise DeploymentError(str(exc)) from None
        return run, number


def another_base(version: versions.Version) -> bool:
    """The version was trained on a base whose weights have changed since (studio/runs/fingerprint.py)."""
    fp = version.record.get("base_fingerprint") or fingerprint.read(version.path)
    return fingerprint.base_changed(fp, version.record.get("model"))


def _score(brief: dict) -> str:
    pref = brief.get("preference")
    if pref and pref.get("adapter") is not None:  # a preference run: what it was trained to change
        return f"preference accuracy {pref['adapter']:.2f} vs base {pref['base']:.2f} on {pref.get('pairs')} pairs"
    m = (brief.get("metrics") or [{}])[0]
    if not m:
        return ""
    return f"{m.get('name')} {m.get('adapter', 0):.2f} vs base {m.get('base', 0):.2f} on {brief.get('rows')} rows"
