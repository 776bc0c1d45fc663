"""The run registry: one folder per run, and the list of runs is the directory listing.

runs/<id>/
    config.yaml      the RunConfig that produced the run
    status.json      where the run stands: state, progress, scores (records.RunStatus)
    metrics.jsonl    one JSON object per line: train, eval and event records (studio/runs/records.py)
    fingerprint.json the base model's fingerprint at training time (studio/runs/fingerprint.py)
    evaluation.json  base vs adapter on the held-out rows: loss, perplexity, sample answers
    versions/vN/     every final save, kept and never written again (studio/runs/versions.py): the
                     PEFT adapter (LoRA/QLoRA) or the whole model (full fine-tuning), its tokenizer,
                     fingerprint.json and version.json (the lineage); runs from before versions
                     keep their one adapter/ or model/, which reads as v1
    checkpoints/     resumable saves (step-N/: weights + trainer_state.pt), the latest few kept
    final_state/     a finished run's trainer_state.pt (no weights: those are adapter/ or model/),
                     what continuing it to a new total (`resume --max-steps N`) needs
    train.log        tracebacks and details that the page summarises in a sentence

Status files are written atomically (temp file + rename) so a crash never leaves half a file.

A run's id (its folder name) never changes; ``status.json`` carries what a person may change or
what identifies a result: ``name`` (a display name, renamable), ``version`` (the latest kept
version's number), ``data_sha256``, the eval scores.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from studio.config import RunConfig
from studio.formatting import slug
from studio.runs import files, fingerprint, versions
from studio.runs.files import atomic_write_text, read_json
from studio.runs.records import STATES, EvalRecord, Record, RunStatus, TrainRecord, parse_record

NAME_MAX = 80
STATE_FILE = "trainer_state.pt"  # what resuming needs (training/checkpoint.py writes it)
RUNS_DIR_ENV = "FINETUNE_STUDIO_RUNS_DIR"


def default_runs_dir() -> Path:
    return Path(os.environ.get(RUNS_DIR_ENV, "runs"))


@dataclass
class Run:
    """A handle on one run folder. ``writable=False`` is a read-only view: the other processes
    of a multi-process run see the folder rank 0 writes."""

    path: Path
    writable: bool = True
    pinned: int | None = None  # a view of one kept version (at_version): its weights and number

    def at_version(self, number: int) -> Run:
        """This run seen as its version ``number`` (export, the model card): raises ValueError
        naming the versions it has."""
        self.get_version(number)
        return Run(self.path, writable=False, pinned=number)

    @property
    def id(self) -> str:
        return self.path.name

    @property
    def config_path(self) -> Path:
        return self.path / "config.yaml"

    @property
    def final_state_dir(self) -> Path:
        return self.path / "final_state"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def log_path(self) -> Path:
        return self.path / "train.log"

    def config(self) -> RunConfig:
        """The run's settings; a pinned view's are those its version was trained with."""
        record = self._pinned_record()
        if record and isinstance(record.get("config"), dict):
            try:
                return RunConfig.from_dict(record["config"])
            except ValueError:  # a key this studio no longer knows: the run's file still reads
                pass
        return RunConfig.from_yaml(self.config_path)

    def _pinned_record(self) -> dict[str, Any] | None:
        """A pinned view's version record (None for the run itself, or a legacy v1, whose record
        is the run's own files). Read from the folder, not through status(), which calls this."""
        if self.pinned is None:
            return None
        match = [v for v in versions.listing(self.path) if v.number == self.pinned and not v.legacy]
        return match[0].record if match else None

    @property
    def name(self) -> str:
        """The display name: what the person called it, else the id."""
        return self.status().name or self.id

    @property
    def version(self) -> int:
        """The latest kept version's number (0 before the first save); a pinned view's own."""
        if self.pinned is not None:
            return self.pinned
        kept = self.versions()
        return kept[-1].number if kept else 0

    def versions(self) -> list[versions.Version]:
        """Every kept version, oldest first (a run from before versions: its one save as v1)."""
        kept = versions.listing(self.path)
        if kept and kept[0].legacy:  # what the run's own files still say about it
            kept[0] = versions.Version(1, kept[0].path, self._legacy_record(), legacy=True)
        return kept

    def get_version(self, number: int) -> versions.Version:
        """Version ``number``; raises ValueError with the versions it has."""
        match = [v for v in self.versions() if v.number == number]
        if not match:
            have = ", ".join(v.label for v in self.versions()) or "none yet"
            raise ValueError(f"Run {self.id} has no version v{number} (it has: {have}).")
        return match[0]

    def weights_at(self, point: str | None = None) -> Path:
        """The weights a ref names: the latest version (``point`` None), a version (``vN``) or a
        checkpoint (``step-N``). Raises ValueError with what the run has."""
        if point is None:
            weights = self.weights_dir()
            if weights is None:
                raise ValueError(f"Run {self.id} has no saved weights yet; train it first.")
            return weights
        number = versions.number_of(point)
        if number is not None:
            return self.get_version(number).path
        match = [c for c in self.checkpoints() if c.name == point]
        if not match:
            have = ", ".join(c.name for c in self.checkpoints()) or "none"
            raise ValueError(
                f"Run {self.id} has no checkpoint or version {point!r} (checkpoints: {have}; "
                f"versions: {', '.join(v.label for v in self.versions()) or 'none'})."
            )
        return match[0]

    def next_version_dir(self) -> tuple[int, Path]:
        """The number and folder the next final save goes to."""
        number = versions.next_number(self.path)
        return number, versions.folder_for(self.path, number)

    def commit_version(self, number: int, kind: str, **lineage: Any) -> versions.Version | None:
        """Make the weights just saved as ``number`` a kept version, with its lineage: the base
        (id and fingerprint), the data (file, sha256, rows), the config, device, precision, step,
        scores and the version it grew from. ``kind``: trained, stopped, continued, imported."""
        if not self.writable:
            return None
        kept, fp = self.versions(), self.fingerprint()
        folder = versions.folder_for(self.path, number)
        if fp is not None:
            fingerprint.write(folder, fp)
        record = versions.lineage(self.status(), self.config(), fp) | {
            "kind": kind,
            "parent": kept[-1].number if kept else None,
            "weights_sha256": files.weights_sha256(folder),
        }
        record |= lineage
        return versions.commit(self.path, number, record)

    def _legacy_record(self) -> dict[str, Any]:
        """The lineage a run from before versions can still tell from its own files."""
        status = self.status()
        try:
            config = self.config()
        except (ValueError, OSError):
            config = None
        record = versions.lineage(status, config, self.fingerprint(), at=status.finished_at)
        return record | {"kind": "imported" if status.imported else "trained", "created_at": status.finished_at}

    def delete_version(self, number: int, deployed_as: list[str] = ()) -> versions.Version:
        """Delete one kept version. Raises ValueError (with the reason) for the latest (it is what
        the run's id means; delete the run instead) or one a deployment points at (``deployed_as``:
        the names that do, from studio/runs/deployments.py)."""
        version = self.get_version(number)
        kept = self.versions()
        if version.number == kept[-1].number:
            raise ValueError(
                f"{self.id}@{version.label} is the run's latest version (what `{self.id}` serves); "
                "delete an older one, or delete the run."
            )
        if deployed_as:
            raise ValueError(
                f"{self.id}@{version.label} is deployed as {', '.join(deployed_as)}; point "
                f"{'it' if len(deployed_as) == 1 else 'them'} at another version first "
                "(finetune-studio deploy set NAME RUN@vN)."
            )
        if self.status().active and _pid_alive(self.status().pid, self.status().pid_started):
            raise ValueError(f"Run {self.id} is training; delete versions once it has stopped.")
        versions.remove(self.path, version)
        return version

    def prune_versions(self, keep: int, held: set[int] = frozenset()) -> list[int]:
        """Delete the oldest versions beyond the latest ``keep``, never one in ``held`` (a
        deployment points at it: kept over the count). Returns the numbers deleted."""
        kept = self.versions()
        gone = []
        for v in kept[: max(len(kept) - keep, 0)]:
            if v.number not in held:
                versions.remove(self.path, v)
                gone.append(v.number)
        return gone

    def rename(self, name: str) -> str:
        """Give the run a display name (its id and folder stay). Raises ValueError with the fix."""
        name = clean_name(name)
        self.set_status(self.status().state, name=name)
        return name

    def fingerprint(self) -> dict[str, Any] | None:
        return fingerprint.read(self.path)

    def evaluation(self) -> dict[str, Any] | None:
        """The stored base-vs-adapter evaluation (``evaluation.json``), or None before one ran."""
        data = read_json(self.path / "evaluation.json")
        return data if isinstance(data, dict) else None

    def save_evaluation(self, data: dict[str, Any]) -> None:
        if self.writable:
            atomic_write_text(self.path / "evaluation.json", json.dumps(data, indent=2))

    def status(self) -> RunStatus:
        """Where the run stands; a pinned view's numbers (step, losses, data, precision) are its
        version's, so an export of v1 after a v2 describes v1."""
        data = read_json(self.path / "status.json")
        if not isinstance(data, dict):
            return RunStatus(state="failed", message="status.json is missing or unreadable.")
        status = RunStatus.from_dict(data)
        record = self._pinned_record()
        if record:
            status.version = self.pinned
            data_record = record.get("data") or {}
            for key, value in (
                ("step", record.get("step")),
                ("final_loss", record.get("final_loss")),
                ("eval_loss", record.get("eval_loss")),
                ("precision", record.get("precision")),
                ("device", record.get("device")),
                ("data_sha256", data_record.get("sha256")),
                ("train_rows", data_record.get("train_rows")),
                ("eval_rows", data_record.get("eval_rows")),
            ):
                if value is not None:
                    setattr(status, key, value)
        return status

    def set_status(self, state: str, **fields: Any) -> RunStatus:
        """Change the state and any other RunStatus fields, written atomically. Returns the status."""
        assert state in STATES, state  # programming error, not user input
        unknown = set(fields) - RunStatus.field_names()
        if unknown:  # a typo here would be a key nobody reads
            raise TypeError(f"RunStatus has no field(s) {sorted(unknown)}")
        status = self.status() if (self.path / "status.json").exists() else RunStatus()
        for key, value in fields.items():
            setattr(status, key, value)
        status.state, status.updated_at = state, time.time()
        if self.writable:
            atomic_write_text(self.path / "status.json", json.dumps(status.to_dict(), indent=2))
        return status

    def append_metrics(self, record: Record) -> None:
        if not self.writable:
            return
        with self.metrics_path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record.to_dict()) + "\n")

    def metrics(self) -> list[Record]:
        """Every record, in the order written; a line cut by a crash mid-write is skipped. A
        pinned view's stop at its version's step (what a continuation added came after it)."""
        if not self.metrics_path.exists():
            return []
        pinned = self._pinned_record()
        last = pinned.get("step") if pinned else None
        out = []
        for line in self.metrics_path.read_text(encoding="utf-8").splitlines():
            try:
                record = parse_record(json.loads(line))
            except ValueError:
                continue
            if record is not None and (last is None or record.step <= last):
                out.append(record)
        return out

    def train_metrics(self) -> list[TrainRecord]:
        return [m for m in self.metrics() if isinstance(m, TrainRecord)]

    def eval_metrics(self) -> list[EvalRecord]:
        return [m for m in self.metrics() if isinstance(m, EvalRecord)]

    def weights_dir(self) -> Path | None:
        """The latest version's folder: an adapter for LoRA/QLoRA, a whole model for full
        fine-tuning; None before the first save. A pinned view: its version's folder."""
        kept = versions.listing(self.path)
        if self.pinned is not None:
            kept = [v for v in kept if v.number == self.pinned]
        return kept[-1].path if kept else None

    def is_training(self) -> bool:
        """Running or stopping, in a process that is alive (this one or another)."""
        status = self.status()
        return status.state in ("running", "stopping") and _pid_alive(status.pid, status.pid_started)

    def is_trained(self) -> bool:
        return self.status().state == "finished" and self.weights_dir() is not None

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first (a save in progress is a hidden .tmp folder)."""
        root = self.path / "checkpoints"
        if not root.is_dir():
            return []
        done = [d for d in root.glob("step-*") if (d / STATE_FILE).exists() and _is_step_name(d.name)]
        return sorted(done, key=checkpoint_step)

    def resume_point(self, new_total: int | None = None) -> Path | None:
        """The checkpoint a Resume continues from (a finished run's ``final_state/`` when
        continued to ``new_total`` steps), or None when it cannot (:meth:`resume_problem` says why)."""
        if self.resume_problem(new_total):
            return None
        return self.final_state_dir if self.is_continuable() else self.checkpoints()[-1]

    def is_continuable(self) -> bool:
        """Finished at its final step with the trainer state kept: it can train on to a new total."""
        status = self.status()
        return status.state == "finished" and not status.stopped and (self.final_state_dir / STATE_FILE).exists()

    def resume_problem(self, new_total: int | None = None) -> str | None:
        """Why a Resume cannot continue this run, as a sentence with what to do; None when it can.
        ``new_total`` continues a finished run to that many steps in all.
        Call :meth:`mark_if_orphaned` first: a run whose process was killed still says running."""
        status = self.status()
        state = status.state
        if status.active:
            who = f" (process {status.pid} is alive)" if status.pid else ""
            return (
                f"Run {self.id} cannot be resumed: it is still {state}{who}. Stop it first, or wait for it to finish."
            )
        if state == "finished" and not status.stopped:
            return self._continue_problem(status.step, status.total_steps, new_total)
        if new_total is not None:
            return (
                f"Run {self.id} has not reached its final step ({status.step} of {status.total_steps or '?'}); "
                "resume it without --max-steps first, then continue it to a new total."
            )
        if not self.checkpoints():
            return (
                f"Run {self.id} cannot be resumed: it ended ({state}) before saving its first checkpoint. "
                "Train it again (a smaller `training.save_steps` saves sooner)."
            )
        return None

    def _continue_problem(self, step: int, total: int | None, new_total: int | None) -> str | None:
        if new_total is None:
            return (
                f"Run {self.id} already reached its final step ({step} of {total or '?'}); "
                f"continue it with --max-steps N (N > {step}, the new total)."
            )
        if new_total <= step:
            return (
                f"Run {self.id} finished at step {step}, so the new total must be more than {step} "
                f"(got --max-steps {new_total})."
            )
        if not (self.final_state_dir / STATE_FILE).exists():
            return (
                f"Run {self.id} cannot be continued: it finished before the studio kept a finished run's "
                "trainer state (optimizer, schedule position). Start a new run to train more."
            )
        return None

    def mark_if_orphaned(self, at_startup: bool = False) -> bool:
        """A run left active by a process that is gone can never finish: mark it interrupted, with
        whether it can be resumed. Judged by this run's own folder, wherever it lies. A queued run
        has no process yet, so it is an orphan only when a studio starts (its queue was lost with
        the one before); elsewhere it may be waiting in a live server's queue. Returns True when
        it was marked."""
        status = self.status()
        if status.state == "queued" and not status.pid:
            if not at_startup:
                return False
            self.set_status(
                "interrupted",
                message="It was waiting in the queue when the studio stopped, so it never started; train it again.",
            )
            return True
        if status.active and not _pid_alive(status.pid, status.pid_started):
            ckpts = self.checkpoints()
            hint = (
                f" Resume continues from step {checkpoint_step(ckpts[-1])}."
                if ckpts
                else " It had not saved a checkpoint yet, so it cannot be resumed."
            )
            self.set_status("interrupted", message="The process running this job ended before it finished." + hint)
            return True
        return False

    def truncate_metrics(self, step: int) -> None:
        """Drop records after ``step``: a resumed run redoes those steps and must not draw them twice."""
        if not self.writable:
            return
        kept = [m for m in self.metrics() if m.step <= step]
        atomic_write_text(self.metrics_path, "".join(json.dumps(m.to_dict()) + "\n" for m in kept))

    def summary(self) -> dict[str, Any]:
        """One row of the past-runs table."""
        s = self.status()
        end = s.finished_at or (time.time() if s.active else None)
        return {
            "run": self.id,
            "name": s.name or "",
            "version": s.version,
            "state": s.state,
            "method": s.method,
            "model": s.model,
            "steps": f"{s.step}/{s.total_steps or '?'}",
            "final loss": s.final_loss,
            "eval loss": s.eval_loss,
            "duration s": round(end - s.started_at) if s.started_at and end else None,
            "created": time.strftime("%Y-%m-%d %H:%M", time.localtime(s.created_at)),
        }


def clean_name(name: str | None) -> str:
    """A run's display name with runs of whitespace folded; raises ValueError with the fix for an
    empty, overlong or unprintable one (the one rule for renames and imports)."""
    name = " ".join(str(name or "").split())
    if not name:
        raise ValueError("A run name cannot be empty; type a name, or keep the current one.")
    if len(name) > NAME_MAX:
        raise ValueError(f"A run name can be at most {NAME_MAX} characters (got {len(name)}); shorten it.")
    if any(not ch.isprintable() for ch in name):
        raise ValueError("A run name cannot contain control characters; use letters, digits and punctuation.")
    return name


def config_diff(a: Run, b: Run) -> list[tuple[str, Any, Any]]:
    """The settings that differ between two runs, as (dotted name, a's value, b's value)."""
    fa, fb = a.config().flat(), b.config().flat()
    return [(k, fa[k], fb.get(k)) for k in fa if fa[k] != fb.get(k)]


class RunsFolderError(RuntimeError):
    """The runs folder cannot be created or written; the message names it and the fix."""


def _folder_problem(root: Path, action: str, exc: OSError) -> RunsFolderError:
    return RunsFolderError(
        f"The runs folder {root} {action} ({exc.strerror or exc}). Pick a folder you "
        f"can write to with --runs-dir DIR (or set ${RUNS_DIR_ENV})."
    )


class RunRegistry:
    """Creates, lists and finds runs under one folder."""

    def __init__(self, root: str | Path | None = None):
        """Raises RunsFolderError when the folder does not exist and cannot be created."""
        self.root = Path(root) if root is not None else default_runs_dir()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _folder_problem(self.root, "cannot be created", exc) from None

    def check_writable(self) -> None:
        """Raise RunsFolderError unless a file can be written in the runs folder: a server checks
        before it starts, so an upload or a Train click never meets a read-only folder."""
        probe = self.root / f".write-check-{os.getpid()}"
        try:
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise _folder_problem(self.root, "cannot be written to", exc) from None

    def create(self, config: RunConfig) -> Run:
        stem = slug(Path(config.data.path).stem, 40, fallback="run")
        base = f"{time.strftime('%Y%m%d-%H%M%S')}-{config.method}-{stem}"
        name, n = base, 1
        while (self.root / name).exists():
            n += 1
            name = f"{base}-{n}"
        run = Run(self.root / name)
        try:
            run.path.mkdir(parents=True)
        except FileExistsError:
            raise
        except OSError as exc:  # a read-only or vanished runs folder: a sentence, not a traceback
            raise _folder_problem(self.root, "cannot be written to", exc) from None
        atomic_write_text(run.config_path, config.to_yaml())
        run.set_status("queued", created_at=time.time(), method=config.method, model=config.model)
        return run

    def list(self) -> list[Run]:
        """All runs, newest first."""
        runs = [Run(p) for p in self.root.iterdir() if (p / "status.json").exists()]
        return sorted(runs, key=lambda r: r.status().created_at, reverse=True)

    def trained(self) -> list[Run]:
        return [r for r in self.list() if r.is_trained()]

    def delete(self, ref: str | Path) -> str:
        """Delete a run folder and everything in it. Returns the id. Raises LookupError for an
        unknown run and ValueError for one still training (stop it first)."""
        run = self.get(ref)
        status = run.status()
        if status.active and _pid_alive(status.pid, status.pid_started):
            raise ValueError(f"Run {run.id} is still {status.state}; stop it before deleting it.")
        if run.path.resolve().parent != self.root.resolve():
            raise ValueError(f"{run.path} is not inside the runs folder {self.root}; delete it by hand.")
        # Rename first, then remove: a crash half-way leaves a hidden folder, never half a run.
        doomed = run.path.with_name(f".deleting-{run.id}")
        os.replace(run.path, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
        return run.id

    def get(self, ref: str | Path) -> Run:
        """A run by id (folder name under the registry) or by folder path."""
        candidates = [Path(ref), self.root / str(ref)]
        for c in candidates:
            if (c / "status.json").exists():
                return Run(c)
        known = ", ".join(r.id for r in self.list()[:5]) or "none yet"
        raise LookupError(f"No run called {ref!r} in {self.root}; recent runs: {known}.")

    def version_view(self, ref: str | Path) -> Run:
        """``RUN`` (its latest version) or ``RUN@vN`` (that version, pinned) for what exports a
        version. Raises LookupError (no such run) or ValueError (a checkpoint, or no such version)."""
        run_id, _, point = str(ref).partition("@")
        run = self.get(run_id)
        if not point:
            return run
        number = versions.number_of(point)
        if number is None:
            raise ValueError(
                f"{ref!r} is a checkpoint; exports are made of kept versions ({run.id}@vN, "
                f"`finetune-studio versions {run.id}` lists them), or of the run's latest."
            )
        return run.at_version(number)

    def mark_orphans_interrupted(self) -> None:
        """Runs left active by a process that is gone can never finish: say so on start-up."""
        for run in self.list():
            run.mark_if_orphaned(at_startup=True)


def checkpoint_step(checkpoint: Path) -> int:
    """The step a checkpoint folder (``checkpoints/step-N``) was saved at."""
    return int(checkpoint.name.removeprefix("step-"))


def _is_step_name(name: str) -> bool:
    return name.startswith("step-") and name.removeprefix("step-").isdigit()


def process_started_at() -> float:
    """This process's start time: stored with its pid, so a reused pid is not taken for it."""
    import psutil

    return psutil.Process().create_time()


def _pid_alive(pid: Any, started_at: Any = None) -> bool:
    if not isinstance(pid, int):
        return False
    import psutil

    try:
        proc = psutil.Process(pid)
        # A killed process stays a zombie until its parent reaps it (a torchrun worker whose
        # launcher was killed too, until init does): it is not running.
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        # A pid is reused after its process ends; a different start time means another process.
        return not isinstance(started_at, (int, float)) or abs(proc.create_time() - started_at) < 1.0
    except psutil.Error:
        return False
