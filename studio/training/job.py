"""Run a training lifecycle, map failures to sentences, and own the server's background job."""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
import traceback
from dataclasses import dataclass, field

from studio import fingerprint
from studio.config import ConfigError, RunConfig
from studio.data import DataError
from studio.models import ModelError
from studio.runs import Run, RunRegistry, checkpoint_step, process_started_at
from studio.training.memory_check import MemoryCheckFailed, check_memory
from studio.training.trainer import EarlyStopped, Trainer, TrainingStopped

log = logging.getLogger(__name__)


def failure_message(exc: BaseException) -> str:
    """A sentence that says what went wrong and what to do; never a traceback."""
    if isinstance(exc, (DataError, ModelError, ConfigError, MemoryCheckFailed)):
        return str(exc)
    if isinstance(exc, FloatingPointError):
        return str(exc)
    if is_out_of_memory(exc):
        return "Ran out of memory. Lower the batch size or max length, or choose QLoRA, then train again."
    if is_compile_failure(exc):
        return (
            f"torch.compile failed on this model ({type(exc).__name__}: {_first_line(exc)}). "
            "Turn Compile off (`training.compile: false`) and train again; the details are in train.log."
        )
    return f"Training failed: {type(exc).__name__}: {_first_line(exc)}. The full error is in the run's train.log."


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""


def is_compile_failure(exc: BaseException) -> bool:
    """An error raised by torch.compile's machinery. Dynamo's suppress_errors turns a failed
    forward compile into eager execution, but the backward graph compiles at the first
    backward and its errors are not suppressed."""
    return type(exc).__module__.startswith(("torch._inductor", "torch._dynamo"))


def is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, MemoryError) or "out of memory" in str(exc).lower()


def _retry(exc: BaseException, config: RunConfig, device: str | None) -> dict | None:
    """The one-click retry offered after a memory or compile failure: {"text", "method", "changes"}."""
    fix = None
    if is_compile_failure(exc) and config.training.compile:
        return {"text": "Train again without Compile.", "method": config.method, "changes": {"training.compile": False}}
    if isinstance(exc, MemoryCheckFailed):
        fix = exc.suggestion
    elif is_out_of_memory(exc):
        from studio import hardware
        from studio.planner import retry_after_oom

        try:
            hw = hardware.detect()
            fix = retry_after_oom(config, hw, device or hw.device)
        except Exception:  # noqa: BLE001 - the failure sentence matters more than the suggestion
            log.warning("could not work out a retry after running out of memory", exc_info=True)
    return None if fix is None else {"text": fix.text, "method": fix.method, "changes": fix.changes}


def run_training(
    config: RunConfig,
    run: Run,
    stop_event: threading.Event | None = None,
    on_metrics=None,
    resume: bool = False,
    save_event: threading.Event | None = None,
) -> dict:
    """Train to the end (or until stopped), save, and leave a final status. Returns the status.

    With ``resume`` the run continues from its last checkpoint in the same folder (weights,
    optimizer, scheduler, RNG and data position), so it ends at the configured final step.
    """
    trainer = Trainer(config, run, stop_event, on_metrics, save_event)
    checkpoint = run.checkpoints()[-1] if resume and run.checkpoints() else None
    if resume and checkpoint is None:
        return run.set_status("failed", message="This run has no checkpoint to resume from; start a new run.")
    run.set_status(
        "running",
        pid=os.getpid(),
        pid_started=process_started_at(),
        started_at=time.time(),
        stopped=False,
        retry=None,
        message=f"Resuming from {checkpoint.name}..." if checkpoint else "Loading model and data...",
    )
    try:
        trainer.setup()
        run.set_status(
            "running",
            total_steps=trainer.total_steps,
            trainable_params=trainer.trainable_params,
            train_rows=len(trainer.train_examples),
            eval_rows=len(trainer.eval_examples),
            device=trainer.device,
            precision=trainer.precision,
            bf16=trainer.use_bf16,
            message=(
                f"Compiling {trainer.compiled_layers} layers (about a minute), then training..."
                if trainer.compiled_layers
                else trainer.compile_note or "Training..."
            ),
            data_warnings=[f.code for f in trainer.data_findings],
            data_sha256=data_digest(config),
            compiled_layers=trainer.compiled_layers,
            compile_note=trainer.compile_note,
        )
        if run.writable:  # what the adapter means: checked before it is loaded onto any base
            fingerprint.write(run.path, fingerprint.fingerprint(trainer.model.config, trainer.tokenizer, config.model))
        if config.training.memory_check and not trainer.dist.enabled:  # one process checks itself only
            run.set_status("running", message="Checking memory: two steps on the longest rows...")
            check = check_memory(trainer)
            run.set_status("running", memory_check=check.to_dict(), message="Training...")
            log.info(check.summary())
            if on_metrics:
                on_metrics({"kind": "memory_check", **check.to_dict()})
        if checkpoint is None and trainer.eval_examples:
            # Step 0 is the base model (LoRA starts as a no-op), so this is the base's held-out
            # loss: the number the adapter's eval loss is compared with.
            run.set_status("running", message="Scoring the base model on the held-out rows...")
            run.set_status("running", base_eval_loss=trainer.evaluate(), message="Training...")
        if checkpoint is not None:
            trainer.restore(checkpoint)
            run.truncate_metrics(trainer.step)
            run.set_status("running", message=f"Resumed at step {trainer.step}; training...")
        stopped, early = False, None
        try:
            trainer.train()
        except EarlyStopped as exc:
            early = str(exc)
        except TrainingStopped:
            stopped = True
            run.set_status("stopping", message=f"Stopping at step {trainer.step}; saving...")
            trainer.save_checkpoint()  # so Resume can take it to the configured final step
        eval_loss = trainer.evaluate()
        trainer.save()
        last = next((m for m in reversed(run.metrics()) if m.get("kind") == "train"), {})
        done = (
            f"Stopped at step {trainer.step} of {trainer.total_steps}; the adapter and a checkpoint "
            "were saved (Resume continues from here)."
            if stopped
            else early or f"Finished {trainer.step} steps."
        )
        return run.set_status(
            "finished",
            finished_at=time.time(),
            step=trainer.step,
            stopped=stopped,
            early_stopped=early is not None,
            version=run.version + 1,
            final_loss=last.get("loss"),
            eval_loss=eval_loss,
            message=done,
            compiled_layers=trainer.compiled_layers,
            compile_note=trainer.compile_note,
        )
    except BaseException as exc:  # noqa: BLE001 - every failure must end as a status, not a crash
        with run.log_path.open("a", encoding="utf-8") as f:
            f.write(traceback.format_exc())
        msg = failure_message(exc)
        retry = _retry(exc, config, getattr(trainer, "device", None))
        if retry and is_out_of_memory(exc):
            msg = f"Ran out of memory at step {trainer.step}. {retry['text']}"
        log.warning("run %s failed: %s", run.id, msg)
        return run.set_status("failed", finished_at=time.time(), step=trainer.step, message=msg, retry=retry)
    finally:
        del trainer
        _free_memory()


def data_digest(config: RunConfig) -> str | None:
    """sha256 (16 hex digits) of the training file and held-out file: which bytes a run saw."""
    h = hashlib.sha256()
    try:
        for path in filter(None, (config.data.path, config.data.eval_path)):
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
    except OSError:
        return None
    return h.hexdigest()[:16]


def _free_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@dataclass
class Job:
    """The server's view of one background run: its thread, stop flag and live metrics."""

    run: Run
    config: RunConfig
    thread: threading.Thread | None = None
    stop_event: threading.Event = field(default_factory=threading.Event)
    save_event: threading.Event = field(default_factory=threading.Event)
    metrics: list[dict] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add_metrics(self, record: dict) -> None:
        with self.lock:
            self.metrics.append(record)

    def snapshot(self) -> list[dict]:
        with self.lock:
            return list(self.metrics)

    @property
    def alive(self) -> bool:
        return self.thread is not None and self.thread.is_alive()


class JobManager:
    """One training job at a time per server, owned by the server process (not by a browser tab).

    A Train pressed while a job runs is queued: its run folder exists in state ``queued`` and
    it starts by itself when the jobs before it end (finished, stopped or failed). Resumes are
    not queued: they continue a folder that may change meanwhile, so they wait for a free device.
    """

    def __init__(self, registry: RunRegistry):
        self.registry = registry
        self.current: Job | None = None
        self.queue: list[Job] = []  # waiting jobs, first to start first
        self._lock = threading.Lock()

    def start(self, config: RunConfig, resume_run: Run | None = None) -> Job:
        """Validate, create the run folder (or reuse ``resume_run``'s) and train in a background
        thread, or queue the job when another is training (``queue_position`` then says where).

        Raises:
            ConfigError: the config has problems (all listed).
            RuntimeError: a resume was asked for while a job is training.
            LookupError: ``resume_run`` cannot be resumed (the message says why).
        """
        config.check()
        with self._lock:
            busy = self.current is not None and self.current.alive
            if busy and resume_run is not None:
                raise RuntimeError(
                    f"Run {self.current.run.id} is still training; stop it or wait "
                    "for it to finish before resuming another."
                )
            if resume_run is not None:
                resume_run.mark_if_orphaned()
                problem = resume_run.resume_problem()
                if problem:
                    raise LookupError(problem)
            run = resume_run or self.registry.create(config)
            job = Job(run=run, config=config)
            if resume_run is not None:  # the live view starts from what the run already drew
                job.metrics = [m for m in run.metrics() if m.get("step", 0) <= checkpoint_step(run.resume_point())]
            job.thread = threading.Thread(
                target=self._run, name=f"train-{run.id}", daemon=True, args=(job, resume_run is not None)
            )
            if busy:
                self.queue.append(job)
                run.set_status(
                    "queued",
                    message=f"Queued: starts when {self.current.run.id} "
                    f"{'and the runs before it end' if len(self.queue) > 1 else 'ends'}.",
                )
                return job
            self.current = job
            job.thread.start()
            return job

    def _run(self, job: Job, resume: bool) -> None:
        try:
            run_training(job.config, job.run, job.stop_event, job.add_metrics, resume=resume, save_event=job.save_event)
        finally:
            self._start_next()

    def _start_next(self) -> None:
        with self._lock:
            if self.queue:
                self.current = self.queue.pop(0)
                self.current.thread.start()

    def queue_position(self, job: Job) -> int | None:
        """1 for the next job to start, None when ``job`` is not waiting."""
        with self._lock:
            return self.queue.index(job) + 1 if job in self.queue else None

    def cancel_queued(self, run_id: str | None = None) -> list[str]:
        """Drop the waiting job of ``run_id`` (default: every waiting job) and its run folder
        (nothing was trained); returns the ids dropped."""
        with self._lock:
            dropped = [j for j in self.queue if run_id is None or j.run.id == run_id]
            self.queue = [j for j in self.queue if j not in dropped]
        for job in dropped:
            self.registry.delete(job.run.id)
        return [job.run.id for job in dropped]

    def resume(self, run: Run) -> Job:
        """Continue an interrupted or stopped run from its last checkpoint, with its own config."""
        return self.start(run.config(), resume_run=run)

    def save_now(self) -> bool:
        """Ask the running job to save a checkpoint after its current step; False when none runs."""
        job = self.current
        if job is None or not job.alive:
            return False
        job.save_event.set()
        return True

    def stop(self) -> bool:
        """Ask the running job to stop after its current step; False when none is running.
        Queued jobs still start afterwards (``cancel_queued`` drops them)."""
        job = self.current
        if job is None or not job.alive:
            return False
        job.stop_event.set()  # the trainer writes the "stopping" status itself, in order
        return True
