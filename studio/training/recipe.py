"""One training run from start to final status, as named steps (torchtune's recipe_main):

    run_training
        _start          status "running", this process's pid
        _setup          data, model, optimizer (Trainer.setup); what was built goes into the status
        _before_training  the fingerprint, the memory check, the base model's held-out score (for an
                        adapter: right after the first loss point, with the adapter switched off)
        _resume         a resumed run continues from its last checkpoint; a finished one continued
                        to a new total, from its final state on a schedule of its own (schedule.py)
        _train          the loop, until the final step, Stop or early stopping
        _finish         the final eval, the save as the next version vN (with the trainer state),
                        the keep-last-N policy, status "finished"
        _fail           any failure: the traceback to train.log, a sentence and a retry to the status
                        (a second Ctrl-C: status "interrupted", resumable from the last checkpoint)

Every failure ends as a status with a sentence (studio/training/failures.py), never a crash.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from studio.config import RunConfig
from studio.runs import fingerprint, versions
from studio.runs.deployments import Deployments
from studio.runs.files import atomic_write_text
from studio.runs.records import Event, RunStatus
from studio.runs.registry import Run, RunRegistry, process_started_at
from studio.training.failures import failure_message, is_out_of_memory, retry_for
from studio.training.memory_check import check_memory
from studio.training.trainer import EarlyStopped, MetricsSink, Trainer, TrainingStopped

log = logging.getLogger(__name__)


def run_training(
    config: RunConfig,
    run: Run,
    stop_event: threading.Event | None = None,
    on_metrics: MetricsSink | None = None,
    resume: bool = False,
    save_event: threading.Event | None = None,
    continue_to: int | None = None,
) -> RunStatus:
    """Train to the end (or until stopped), save, and leave a final status. Returns the status.

    With ``resume`` the run continues from its last checkpoint in the same folder (weights,
    optimizer, scheduler, RNG and data position), so it ends at the configured final step.
    With ``continue_to`` a finished run trains on from its final state to that many steps in
    all (the caller checked ``run.resume_problem(continue_to)``); its config says the new total.
    """
    checkpoint = run.checkpoints()[-1] if resume and run.checkpoints() else None
    if continue_to is not None:
        checkpoint = run.final_state_dir
        config = copy.deepcopy(config)
        config.training.max_steps = continue_to
        if run.writable:  # the hyperparameters next to the artifact say what it was trained to
            atomic_write_text(run.config_path, config.to_yaml())
    if resume and checkpoint is None:
        return run.set_status("failed", message="This run has no checkpoint to resume from; start a new run.")
    trainer = Trainer(config, run, stop_event, on_metrics, save_event)
    _start(run, checkpoint)
    try:
        _setup(trainer)
        _before_training(trainer, resuming=checkpoint is not None)
        if continue_to is not None:
            _continue(trainer, checkpoint, continue_to)
        elif checkpoint is not None:
            _resume(trainer, checkpoint)
        return _finish(trainer, _train(trainer))
    except BaseException as exc:  # noqa: BLE001 - every failure must end as a status, not a crash
        return _fail(trainer, exc)
    finally:
        del trainer
        _free_memory()


@dataclass
class _Outcome:
    stopped: bool = False  # Stop was pressed (or Ctrl-C / SIGTERM): saved with a checkpoint, resumable
    early: str | None = None  # early stopping's sentence


def _start(run: Run, checkpoint: Path | None) -> None:
    run.set_status(
        "running",
        pid=os.getpid(),
        pid_started=process_started_at(),
        started_at=time.time(),
        stopped=False,
        retry=None,
        message=f"Resuming from {checkpoint.name}..." if checkpoint else "Loading model and data...",
    )


def _setup(trainer: Trainer) -> None:
    trainer.setup()
    trainer.run.set_status(
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
        data_sha256=data_digest(trainer.config),
        compiled_layers=trainer.compiled_layers,
        compile_note=trainer.compile_note,
    )


def _before_training(trainer: Trainer, resuming: bool) -> None:
    run, config = trainer.run, trainer.config
    if run.writable:  # what the adapter means: checked before it is loaded onto any base
        fingerprint.write(run.path, fingerprint.fingerprint(trainer.model.config, trainer.tokenizer, config.model))
    if config.training.memory_check:  # under several processes each checks itself; they agree
        started = time.time()
        run.set_status("running", message="Checking memory: a step on the longest rows...")
        check = check_memory(trainer)
        trainer.timings["memory check"] = time.time() - started
        run.set_status("running", memory_check=check.to_dict(), message="Training...")
        if trainer.dist.main:
            log.info(check.summary())
            trainer.on_metrics(Event("memory_check", trainer.step, time.time(), check.to_dict()))
    if not resuming and trainer.eval_examples:
        # The base's held-out loss is the number the adapter's eval loss is compared with. An
        # adapter can be switched off at any step, so it is scored right after the first loss
        # point: the person who pressed Train sees the run move 4.5 s sooner (30 held-out rows,
        # default model, 2-core CPU). Full fine-tuning changes the base itself: scored first.
        if trainer.base_scorable_later:
            trainer.after_first_step = lambda: _score_base(trainer)
        else:
            _score_base(trainer)


def _score_base(trainer: Trainer) -> None:
    started = time.time()
    trainer.run.set_status("running", message="Scoring the base model on the held-out rows...")
    loss = trainer.evaluate_base()
    trainer.timings["base score"] = time.time() - started
    trainer.run.set_status("running", base_eval_loss=loss, message="Training...")


def _resume(trainer: Trainer, checkpoint: Path) -> None:
    trainer.restore(checkpoint)
    trainer.run.truncate_metrics(trainer.step)
    trainer.run.set_status("running", message=f"Resumed at step {trainer.step}; training...")


def _continue(trainer: Trainer, final_state: Path, total: int) -> None:
    """A finished run trains on: its weights (adapter/ or model/) and optimizer moments, a new
    schedule over the added steps, since the run's own has decayed to zero."""
    run = trainer.run
    trainer.restore(final_state, weights=run.weights_dir())
    trainer.total_steps, trainer.evals_without_gain = total, 0  # early stopping's patience starts again
    plan = trainer.continue_from(trainer.step)
    run.truncate_metrics(trainer.step)
    # A checkpoint at the start, with the new total and schedule: a continuation killed before its
    # first regular checkpoint resumes from here, not from a checkpoint of the run before it.
    trainer.save_checkpoint()
    if trainer.dist.main:  # one process speaks for the run
        with run.log_path.open("a", encoding="utf-8") as f:
            f.write(f"{plan} (optimizer state loaded from {final_state.name}/)\n")
        event = Event("continue", trainer.step, time.time(), {"schedule": plan})
        run.append_metrics(event)
        trainer.on_metrics(event)
    run.set_status("running", message=plan)


def _train(trainer: Trainer) -> _Outcome:
    try:
        trainer.train()
    except EarlyStopped as exc:
        return _Outcome(early=str(exc))
    except TrainingStopped:
        trainer.run.set_status("stopping", message=f"Stopping at step {trainer.step}; saving...")
        trainer.save_checkpoint()  # so Resume can take it to the configured final step
        return _Outcome(stopped=True)
    return _Outcome()


def _finish(trainer: Trainer, outcome: _Outcome) -> RunStatus:
    run = trainer.run
    if trainer.after_first_step is not None:  # stopped before its first step: the base is still unscored
        trainer.after_first_step, pending = None, trainer.after_first_step
        pending()
    eval_loss = trainer.evaluate()
    number, folder = run.next_version_dir()
    trainer.save(folder)  # a new version's weights: the ones before it stay as they were
    if not outcome.stopped:  # what continuing it needs: the optimizer and schedule position, not the weights again
        trainer.save(run.final_state_dir, with_state=True, weights=False)
    train = run.train_metrics()
    final_loss = train[-1].loss if train else None
    if trainer.dist.main:
        run.set_status(run.status().state, step=trainer.step)  # the version's lineage reads the final step
        kind = "stopped" if outcome.stopped else "continued" if trainer.continued_from is not None else "trained"
        run.commit_version(number, kind, final_loss=final_loss, eval_loss=eval_loss)
        _prune_versions(run, trainer.config)
    saved = f"saved as v{number}"
    done = (
        f"Stopped at step {trainer.step} of {trainer.total_steps}; {saved}, with a checkpoint "
        "(Resume continues from here)."
        if outcome.stopped
        else f"{outcome.early or f'Finished {trainer.step} steps.'} {saved[0].upper()}{saved[1:]}."
    )
    return run.set_status(
        "finished",
        startup=trainer.startup(),
        finished_at=time.time(),
        step=trainer.step,
        stopped=outcome.stopped,
        early_stopped=outcome.early is not None,
        version=number,
        final_loss=final_loss,
        eval_loss=eval_loss,
        message=done,
        compiled_layers=trainer.compiled_layers,
        compile_note=trainer.compile_note,
    )


def _prune_versions(run: Run, config: RunConfig) -> None:
    """The keep-last-N policy (``training.keep_versions``); a deployed version is always kept."""
    keep = config.training.keep_versions or versions.default_keep(config.method)
    held = Deployments(RunRegistry(run.path.parent)).held_versions(run.id)
    gone = run.prune_versions(keep, held)
    if gone:
        with run.log_path.open("a", encoding="utf-8") as f:
            f.write(f"Deleted versions {', '.join(f'v{n}' for n in gone)} (keeping the latest {keep}).\n")


def _fail(trainer: Trainer, exc: BaseException) -> RunStatus:
    run = trainer.run
    with run.log_path.open("a", encoding="utf-8") as f:
        f.write("".join(traceback.format_exception(exc)))
    if isinstance(exc, KeyboardInterrupt):  # a second Ctrl-C (signals.py): nothing failed, it was cut short
        return _interrupted(trainer)
    msg = failure_message(exc)
    retry = retry_for(exc, trainer.config, getattr(trainer, "device", None))
    if retry and is_out_of_memory(exc):
        msg = f"Ran out of memory at step {trainer.step}. {retry.text}"
    log.warning("run %s failed: %s", run.id, msg)
    return run.set_status(
        "failed", startup=trainer.startup(), finished_at=time.time(), step=trainer.step, message=msg, retry=retry
    )


def _interrupted(trainer: Trainer) -> RunStatus:
    run = trainer.run
    saved = run.checkpoints()
    after = (
        f"`finetune-studio resume` continues from its last checkpoint ({saved[-1].name})."
        if saved
        else "No checkpoint was saved yet; train it again."
    )
    return run.set_status(
        "interrupted",
        startup=trainer.startup(),
        finished_at=time.time(),
        step=trainer.step,
        message=f"Aborted at step {trainer.step} by a second Ctrl-C; the steps since the last checkpoint "
        f"were not saved. {after}",
    )


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
