"""The server's background job: one training run at a time in a thread, the rest queued."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from studio.config import RunConfig
from studio.runs.records import Record
from studio.runs.registry import Run, RunRegistry, checkpoint_step
from studio.training.recipe import run_training


@dataclass
class Job:
    """The server's view of one background run: its thread, stop flag and live metrics."""

    run: Run
    config: RunConfig
    thread: threading.Thread | None = None
    stop_event: threading.Event = field(default_factory=threading.Event)
    save_event: threading.Event = field(default_factory=threading.Event)
    metrics: list[Record] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add_metrics(self, record: Record) -> None:
        with self.lock:
            self.metrics.append(record)

    def snapshot(self) -> list[Record]:
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

    def start(self, config: RunConfig, resume_run: Run | None = None, continue_to: int | None = None) -> Job:
        """Validate, create the run folder (or reuse ``resume_run``'s) and train in a background
        thread, or queue the job when another is training (``queue_position`` then says where).
        ``continue_to`` trains a finished ``resume_run`` on to that many steps in all.

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
                problem = resume_run.resume_problem(continue_to)
                if problem:
                    raise LookupError(problem)
            run = resume_run or self.registry.create(config)
            job = Job(run=run, config=config)
            if resume_run is not None:  # the live view starts from what the run already drew
                point = run.resume_point(continue_to)
                at = run.status().step if continue_to is not None else checkpoint_step(point)
                job.metrics = [m for m in run.metrics() if m.step <= at]
            job.thread = threading.Thread(
                target=self._run, name=f"train-{run.id}", daemon=True, args=(job, resume_run is not None, continue_to)
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

    def _run(self, job: Job, resume: bool, continue_to: int | None = None) -> None:
        try:
            run_training(
                job.config,
                job.run,
                job.stop_event,
                job.add_metrics,
                resume=resume,
                save_event=job.save_event,
                continue_to=continue_to,
            )
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

    def resume(self, run: Run, continue_to: int | None = None) -> Job:
        """Continue an interrupted or stopped run from its last checkpoint, with its own config;
        with ``continue_to``, a finished run on to that many steps in all."""
        return self.start(run.config(), resume_run=run, continue_to=continue_to)

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
