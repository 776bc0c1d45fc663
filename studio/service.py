"""The Studio: the one server-owned service object the UI (and scripts) talk to.

It holds the run registry, the background training job and the playground. Handlers in
``studio/ui`` call one method here and turn exceptions into messages at the boundary.
"""

from __future__ import annotations

import hashlib
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from studio.config import RunConfig
from studio.data import DataError, DataReport, mapping_for, read_table, validate
from studio.data.preview import token_segments
from studio.export.adapter_import import import_adapter_zip
from studio.export.gguf_export import export_gguf
from studio.export.zips import export_merged, export_zip
from studio.formatting import slug
from studio.inference.playground import Playground, SamplingSettings, split_ref
from studio.models import load_tokenizer
from studio.planning import hardware
from studio.planning.memory import shape_for_model
from studio.planning.planner import Plan, plan, settings_for
from studio.runs import versions
from studio.runs.deployments import Deployment, Deployments
from studio.runs.records import ACTIVE_STATES, EvalRecord, Retry, TrainRecord
from studio.runs.registry import Run, RunRegistry, checkpoint_step, config_diff
from studio.training import Job, JobManager, batching

PREVIEW_ROWS = 20


@dataclass
class DatasetView:
    """What the Data tab shows: the rows, the mapping's report, or why no mapping works."""

    path: str
    columns: list[str]
    preview: pd.DataFrame
    report: DataReport | None = None
    problem: str | None = None  # set when the columns could not be mapped; report is None then
    tokenizer: object = None

    def usable(self) -> list:
        if self.report is None:
            return []
        rows = self.report.convs if self.report.preference is None else self.report.preference
        return [c for c in rows if c is not None]

    def segments(self, index: int):
        """What the model sees for the index-th usable row (wrapping around)."""
        return self.sides(index)[0][1] if self.sides(index) else []

    def sides(self, index: int) -> list[tuple[str, list]]:
        """(label, segments) for each sequence the index-th usable row trains: one for supervised
        data ("" label); the chosen and the rejected answer after the same prompt for a
        preference pair; the answer marked good or bad for feedback."""
        usable = self.usable()
        if not usable or self.report.stats is None:
            return []
        length = self.report.stats.max_length
        if self.report.preference is None:
            return [("", token_segments(usable[index % len(usable)], self.tokenizer, length))]
        rows = [r for r in self.report.preference if r is not None]
        row = rows[index % len(rows)]
        if hasattr(row, "rejected"):  # a pair
            return [
                (side, token_segments(row.conversation(side), self.tokenizer, length))
                for side in ("chosen", "rejected")
            ]
        label = "marked good" if row.desirable else "marked bad"
        return [(label, token_segments(row.conversation(), self.tokenizer, length))]


@dataclass
class JobView:
    """What the Train tab shows about the current (or last) job: data and plain sentences, which
    ``studio/ui/train_tab.py`` formats."""

    run_id: str | None = None
    state: str = "idle"
    message: str = "No training yet."
    step: int = 0
    total_steps: int = 0
    eta_s: float | None = None
    tokens_per_s: float | None = None
    train: list[TrainRecord] = field(default_factory=list)
    evals: list[EvalRecord] = field(default_factory=list)
    memory_check: str = ""  # the pre-run memory check's summary, once it has run
    memory_peak_mib: float | None = None  # the peak the check measured, on the memory plot's axis
    memory_estimate_mib: float | None = None  # the estimated peak, on the same axis
    retry: Retry | None = None  # after a failure a settings change can fix
    queued: list[str] = field(default_factory=list)  # runs waiting for this one, next first

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES


class Studio:
    """The server-owned service: the run registry, the training job and its queue, and the chat
    playground with its loaded base model. One per server process, created at start-up and
    passed to every tab; the UI and scripts call its methods, never its parts."""

    def __init__(self, runs_dir: str | Path | None = None):
        self.registry = RunRegistry(runs_dir)
        self.deployments = Deployments(self.registry)  # the same folder every server process reads
        self.registry.mark_orphans_interrupted()
        self.jobs = JobManager(self.registry)
        self.hardware = hardware.detect()
        self.playground = Playground(self.hardware.device)
        self._tokenizers: dict = {}
        self._tables: dict = {}  # (path, size, mtime) -> Table: remapping must not re-read the file
        self._longest: dict = {}  # (path, mapping, model) -> longest row in tokens, for memory plans
        self.serving = None  # the OpenAI-compatible API's context once it is mounted (studio/serving)
        self._busy: tuple[float, str | None] = (0.0, None)  # training_busy's answer and when
        self._evaluations_running: set[threading.Event] = set()  # each running evaluation's stop

    @staticmethod
    def _key(path: Path):
        st = path.stat() if path.is_file() else None
        return (str(path.resolve()), st.st_size, st.st_mtime_ns) if st else None

    def _read(self, path: str | Path):
        key = self._key(Path(path))
        if key is None or key not in self._tables:
            table = read_table(path)  # raises DataError with a sentence (missing files included)
            self._tables = {key: table}  # keep one: the file this person is looking at
            return table
        return self._tables[key]

    # ---- data -------------------------------------------------------------------------------
    def tokenizer(self, model: str):
        """Tokenizers are cached per model: validation re-runs on every mapping change."""
        if model not in self._tokenizers:
            self._tokenizers[model] = load_tokenizer(model)
        return self._tokenizers[model]

    def inspect_dataset(
        self, path: str | Path, mapping: str = "", model: str = "default", max_length: int = 512
    ) -> DatasetView:
        """Load, map, validate and count tokens.

        Raises:
            DataError: the file cannot be read at all. A file whose columns cannot be mapped
                still returns a view (with ``problem`` set) so the person can map them by hand.
            ModelError: the model's tokenizer cannot be loaded.
        """
        table = self._read(path)
        view = DatasetView(str(path), list(table.df.columns), table.df.head(PREVIEW_ROWS))
        try:
            cm = mapping_for(table.df, mapping)
        except DataError as exc:
            view.problem = str(exc)
            return view
        view.tokenizer = self.tokenizer(model)
        view.report = validate(table, cm, view.tokenizer, max_length)
        stats = view.report.stats
        if stats is not None and len(stats.lengths):
            self._longest[(str(path), mapping, model)] = int(stats.lengths.max())
        return view

    # ---- memory -------------------------------------------------------------------------------
    def memory_plan(self, config: RunConfig) -> tuple[Plan, str]:
        """Which methods fit, for these settings, and the batch shape the estimate assumes.

        Training's peak comes from its longest batch, so when the dataset has been inspected
        the estimate uses its longest row (when shorter than max length) instead of max length.

        Raises:
            ModelError: the model's config cannot be read.
        """
        shape = shape_for_model(config.model, config.trust_remote_code)
        longest = self._longest.get((config.data.path, config.data.mapping, config.model))
        seq, basis = config.data.max_length, f"max length {config.data.max_length}"
        if longest is not None and longest < seq:
            seq, basis = longest, f"your data's longest row, {longest} tokens"
        hw = hardware.detect()  # free memory now, not at start-up
        t = config.training
        if batching.layout(t.packing, hw.device, t.batch_size, config.data.max_length, shape.model_type).packed:
            seq, basis = config.data.max_length, "packed: every row filled with examples up to max length"
        plan_ = plan(shape, hw, settings_for(config, hw, seq_len=seq))
        return plan_, (
            f"Estimated for micro-batch {t.batch_size} x {seq} tokens ({basis})"
            f"{', gradient checkpointing' if t.gradient_checkpointing else ''}."
        )

    def import_dataset(self, uploaded: str | Path) -> str:
        """Copy an upload next to the runs, named by content hash, so runs keep pointing at the
        exact bytes they trained on after the browser's temp file is gone. Returns the copy's
        path. Raises DataError when the file cannot be read at all (nothing is copied then)."""
        src = Path(uploaded)
        table = self._read(src)
        digest = hashlib.sha256(src.read_bytes()).hexdigest()[:12]
        dest_dir = self.registry.root / "datasets"
        dest_dir.mkdir(parents=True, exist_ok=True)
        safe = slug(src.name, None, fallback="data")[-80:]
        dest = dest_dir / f"{digest}-{safe}"
        if not dest.exists():
            shutil.copyfile(src, dest)
        self._tables = {self._key(dest): table}  # the copy holds the same bytes: no second read
        return str(dest.resolve())

    # ---- training ---------------------------------------------------------------------------
    def start_training(self, config: RunConfig) -> Job:
        return self.jobs.start(config)

    def stop_training(self) -> bool:
        return self.jobs.stop()

    def save_now(self) -> bool:
        return self.jobs.save_now()

    def resumable_runs(self) -> list[tuple[Run, int]]:
        """Runs a Resume can continue (interrupted, failed or stopped, with a checkpoint, or
        finished with its trainer state: Continue training), each with the step it would continue from."""
        out = []
        for run in self.registry.list():
            point = run.resume_point()
            if point is not None:
                out.append((run, checkpoint_step(point)))
            elif run.is_continuable():
                out.append((run, run.status().step))
        return out

    def resume_training(self, run_id: str, continue_to: int | None = None) -> Job:
        """Resume a run, or continue a finished one to ``continue_to`` steps in all.
        Raises LookupError (unknown or not resumable run), ConfigError, or RuntimeError (busy)."""
        return self.jobs.resume(self.registry.get(run_id), continue_to)

    def job_view(self) -> JobView:
        view = self._job_view()
        view.queued = [j.run.id for j in list(self.jobs.queue)]
        return view

    def queue_position(self, job: Job) -> int | None:
        """1 for the next job to start, None when ``job`` is not waiting."""
        return self.jobs.queue_position(job)

    def cancel_queued(self) -> list[str]:
        return self.jobs.cancel_queued()

    def _job_view(self) -> JobView:
        job = self.jobs.current
        if job is None:
            return JobView()
        status = job.run.status()
        metrics = job.snapshot()
        train = [m for m in metrics if isinstance(m, TrainRecord)]
        view = JobView(
            run_id=job.run.id,
            state=status.state,
            message=status.message,
            train=train,
            evals=[m for m in metrics if isinstance(m, EvalRecord)],
            total_steps=status.total_steps or 0,
            memory_check=(status.memory_check or {}).get("summary", ""),
            retry=status.retry if status.state == "failed" else None,
        )
        check = status.memory_check or {}
        if check.get("peak_bytes"):
            view.memory_peak_mib = check["peak_bytes"] / 2**20
            cpu = check.get("device") != "cuda"  # on CPU the estimate compared is on top of the baseline
            view.memory_estimate_mib = (check["estimate_bytes"] + (check["baseline_bytes"] if cpu else 0)) / 2**20
        if job.stop_event.is_set() and view.state == "running":
            view.state, view.message = "stopping", "Stopping after the current step..."
        if train:
            last = train[-1]
            view.step, view.total_steps = last.step, last.total_steps
            recent = train[-10:]
            view.tokens_per_s = sum(m.tokens for m in recent) / max(
                sum(m.tokens / max(m.tokens_per_s, 1e-9) for m in recent), 1e-9
            )
            # A resumed run's clock starts at the resume: time per step counts this session's steps.
            per_step = last.elapsed_s / max(last.steps_this_session or last.step, 1)
            view.eta_s = per_step * (view.total_steps - view.step)
        return view

    # ---- past runs ----------------------------------------------------------------------------
    def runs(self) -> list[Run]:
        """Every run, newest first."""
        return self.registry.list()

    def run(self, ref: str) -> Run:
        """A run by id or folder; raises LookupError naming recent runs."""
        return self.registry.get(ref)

    @property
    def runs_root(self) -> Path:
        return self.registry.root

    def curves(self, run_ids: list[str]) -> dict[str, tuple[list[TrainRecord], list[EvalRecord]]]:
        """run id -> (train records, eval records), for overlaying runs' curves."""
        out = {}
        for rid in run_ids:
            metrics = self.registry.get(rid).metrics()
            out[rid] = (
                [m for m in metrics if isinstance(m, TrainRecord)],
                [m for m in metrics if isinstance(m, EvalRecord)],
            )
        return out

    def config_diff(self, a: str, b: str) -> list[tuple[str, object, object]]:
        return config_diff(self.registry.get(a), self.registry.get(b))

    # ---- runs, chat, export -----------------------------------------------------------------
    def trained_runs(self) -> list[Run]:
        return self.registry.trained()

    def chat_runs(self) -> list[tuple[Run, list[Path]]]:
        """Every trained run with its intermediate checkpoints (newest first): what Chat offers."""
        return [(run, list(reversed(run.checkpoints()))) for run in self.trained_runs()]

    def playground_stats(self) -> tuple[int, float | None]:
        """(adapters loaded on the chat base, seconds the last adapter load took)."""
        return self.playground.copies(), self.playground.last_load_s

    def activate_run(self, ref: str) -> tuple[Run, list[str]]:
        """Load a run (``id``) or a checkpoint (``id@step-N``) onto the adapted pane.
        Returns the run and warnings; raises LookupError, ValueError or ModelError."""
        run_id, checkpoint = split_ref(ref)
        run = self.registry.get(run_id)
        return run, self.playground.activate(run, checkpoint)

    def chat(self, base_history, adapted_history, settings: SamplingSettings, ref: str | None = None):
        """Stream both panes' replies; ``ref`` (run id or ``id@step-N``) is loaded if it is not."""
        if ref is not None and ref not in self.playground.loaded() + list(self.playground.full_models):
            self.activate_run(ref)
        return self.playground.stream_pair(base_history, adapted_history, settings, ref)

    def training_busy(self) -> str | None:
        """A sentence while a training run (of this server or another process) has the device,
        else None: the API answers 503 with it, since training keeps priority. Rechecked at most
        every 2 s (it reads every run's status)."""
        checked, answer = self._busy
        if time.monotonic() - checked < 2.0:
            return answer
        job = self.jobs.current
        running = [job.run] if job is not None and job.alive else [r for r in self.registry.list() if r.is_training()]
        answer = (
            f"Training run {running[0].id} is using this machine; the API answers again when it ends "
            "(or stop it in the Train tab)."
            if running
            else None
        )
        self._busy = (time.monotonic(), answer)
        return answer

    def chat_memory_note(self) -> str:
        """A sentence when chatting next to a running job could run short of memory, else ''."""
        job = self.jobs.current
        if job is None or not job.alive:
            return ""
        hw = hardware.detect()
        free = hw.cuda[0].free_bytes if hw.device == "cuda" and hw.cuda else hw.ram_available_bytes
        try:
            need = shape_for_model(job.config.model).total_params * 4 * 1.3  # fp32 base + cache headroom
        except Exception:  # noqa: BLE001 - a note, not a gate
            return ""
        if free < need:
            return (
                f"Training is running and only {free / 2**30:.1f} GiB is free; the chat model needs "
                f"about {need / 2**30:.1f} GiB, so chatting now could run out of memory. Wait for "
                "training to finish, or stop it."
            )
        return "Training is running: chat works alongside it, but both will be slower."

    def evaluate(self, ref: str, samples: int = 3, progress=lambda msg: None) -> dict:
        """Base vs adapter on the run's held-out rows (studio/evaluation/heldout.py); raises ValueError."""
        from studio.evaluation import heldout

        run, _ = self.activate_run(ref)
        return heldout.evaluate(self.playground, run, samples=samples, progress=progress)

    def evaluate_task(self, ref: str, *, against: str | None = None, progress=None, stop=None, **options) -> dict:
        """Task scores on generated answers, base vs adapter, with intervals; stored with the run
        (studio/evaluation/task.py: ``options`` are its rows, metrics, judge and regression
        settings). ``ref`` is a run id, a run folder or ``id@step-N``; so is ``against``, another
        adapter to compare with instead of the base. The page and ``finetune-studio eval`` both
        call this. Raises LookupError, ValueError or ModelError with a sentence,
        EvaluationStopped when ``stop`` is set."""
        from studio.evaluation import task

        run_id, checkpoint = split_ref(ref)
        run = self.registry.get(run_id)
        stop = stop or threading.Event()  # stop_evaluations() reaches every running evaluation
        other = None
        if against and against != "base":
            other_id, other_checkpoint = split_ref(against)
            other = (self.registry.get(other_id), other_checkpoint)
            if (other[0].id, other_checkpoint) == (run.id, checkpoint):
                raise ValueError(f"{ref} would be compared with itself: name another run or checkpoint.")
        self._evaluations_running.add(stop)
        try:
            return task.evaluate_task(
                self.playground, run, checkpoint=checkpoint, against=other, progress=progress, stop=stop, **options
            )
        finally:
            self._evaluations_running.discard(stop)

    def reevaluate(self, ref: str, *, progress=None, stop=None) -> dict:
        """A version trained on a base whose weights have changed since, scored on the base there
        is now with the settings of its last evaluation (the defaults if it had none). Chat and
        serving keep refusing it; this says whether it still helps. Raises as evaluate_task does."""
        from studio.evaluation import stored, task

        run_id, point = split_ref(ref)
        run = self.registry.get(run_id)
        number = versions.number_of(point) if point else run.version
        if point and number is None:
            raise ValueError(f"Re-evaluate a version (RUN@vN), not a checkpoint ({ref}).")
        last = next(iter(stored.of_version(run, number)), None)
        options = task.stored_options(last)
        return self.evaluate_task(f"{run.id}@v{number}", progress=progress, stop=stop, on_changed_base=True, **options)

    def retrain(self, run_id: str) -> Job:
        """A new run with the same settings as ``run_id`` (on the base there is now)."""
        return self.start_training(self.registry.get(run_id).config())

    def evaluate_checkpoints(self, run_id: str, *, progress=None, stop=None, **options) -> dict:
        """Every checkpoint of the run and its final weights scored against the base on the same
        rows, and which is best at the task (studio/evaluation/checkpoints.py). ``options`` are
        the rows and metrics ``evaluate_task`` takes. Raises LookupError, ValueError, ModelError."""
        from studio.evaluation.checkpoints import evaluate_checkpoints

        run = self.registry.get(run_id)
        stop = stop or threading.Event()
        self._evaluations_running.add(stop)
        try:
            return evaluate_checkpoints(self.playground, run, progress=progress, stop=stop, **options)
        finally:
            self._evaluations_running.discard(stop)

    def stop_evaluations(self) -> int:
        """Stop every running evaluation (the page's Stop); how many there were."""
        running = list(self._evaluations_running)
        for stop in running:
            stop.set()
        return len(running)

    def evaluations(self, run_id: str) -> list[dict]:
        """The run's stored task evaluations, newest first (studio/evaluation/stored.py)."""
        from studio.evaluation import stored

        return stored.evaluations(self.registry.get(run_id))

    def evaluation_comparison(self, eval_set_sha256: str):
        """Every run/version scored on this eval set, side by side (a DataFrame)."""
        from studio.evaluation import stored

        return stored.comparison(self.registry.list(), eval_set_sha256)

    def rename_run(self, run_id: str, name: str) -> str:
        return self.registry.get(run_id).rename(name)

    def delete_run(self, run_id: str) -> str:
        """Delete a run, first unloading it from the playground. Refuses the running job's run."""
        job = self.jobs.current
        if job is not None and job.alive and job.run.id == run_id:
            raise ValueError(f"Run {run_id} is training now; stop it before deleting it.")
        if self.jobs.cancel_queued(run_id):  # a waiting run: out of the queue, folder removed
            return run_id
        run = self.registry.get(run_id)
        held = [d.name for d in self.deployments.list() if d.run == run.id]
        if held:
            raise ValueError(
                f"Run {run.id} is deployed as {', '.join(held)}; point "
                f"{'it' if len(held) == 1 else 'them'} at another version first (Registry tab)."
            )
        self.playground.unload(run.id)
        return self.registry.delete(run.id)

    # ---- versions and deployments (studio/runs/versions.py, studio/runs/deployments.py) -------
    def version_rows(self, run_id: str) -> list[dict]:
        """A run's kept versions with their lineage, disk use, scores and deployments."""
        return self.deployments.version_rows(self.registry.get(run_id))

    def delete_version(self, ref: str):
        """Delete ``RUN@vN``. Raises LookupError (no run) or ValueError (the latest, a deployed
        one, no such version) with the reason."""
        run_id, point = split_ref(ref)
        run = self.registry.get(run_id)
        number = versions.number_of(point)
        if number is None:
            raise ValueError(f"Pick a version to delete (RUN@vN), not {ref!r}.")
        # A copy still loaded in memory is never used again: every request resolves its version first.
        return run.delete_version(number, self.deployments.holding(run.id, number))

    def deploy(self, name: str, ref: str, why: str = "") -> Deployment:
        """Point deployment ``name`` at ``ref`` (RUN@vN; RUN: its latest). Raises DeploymentError."""
        return self.deployments.set(name.strip() if isinstance(name, str) else name, ref, why)

    def rollback(self, name: str, why: str = "") -> Deployment:
        return self.deployments.rollback(name, why)

    def export_run(
        self, run_id: str, out: str | Path | None = None, merged: bool = False, gguf: str | None = None
    ) -> Path:
        """The run's adapter zip; with ``merged`` the standalone merged model zip; with ``gguf``
        (f16, bf16, q8_0, q4_0) the GGUF zip for llama.cpp and Ollama, checked against the merged model.
        Raises LookupError (unknown run) or ExportError (not finished, base missing, not convertible,
        or the GGUF does not answer like the merged model)."""
        run = self.registry.version_view(run_id)  # RUN@vN: that version
        if gguf:
            return export_gguf(run, gguf, out)
        return export_merged(run, out) if merged else export_zip(run, out)

    def import_adapter(self, zip_path: str | Path, name: str | None = None) -> Run:
        """Add an uploaded adapter zip as a finished run (it then shows in Chat and Export).
        Raises AdapterImportError with the reason; a refused zip leaves nothing behind."""
        return import_adapter_zip(zip_path, self.registry, name=name)
