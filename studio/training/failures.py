"""Failures as sentences: what went wrong, what to do, and the one-click retry when a setting fixes it."""

from __future__ import annotations

import logging

from studio.config import ConfigError, RunConfig
from studio.data import DataError
from studio.models import ModelError
from studio.runs.records import Retry
from studio.training.memory_check import MemoryCheckFailed

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


def retry_for(exc: BaseException, config: RunConfig, device: str | None) -> Retry | None:
    """The one-click retry offered after a memory or compile failure, or None."""
    if is_compile_failure(exc) and config.training.compile:
        return Retry("Train again without Compile.", config.method, {"training.compile": False})
    fix = None
    if isinstance(exc, MemoryCheckFailed):
        fix = exc.suggestion
    elif is_out_of_memory(exc):
        from studio.planning import hardware
        from studio.planning.planner import retry_after_oom

        try:
            hw = hardware.detect()
            fix = retry_after_oom(config, hw, device or hw.device)
        except Exception:  # noqa: BLE001 - the failure sentence matters more than the suggestion
            log.warning("could not work out a retry after running out of memory", exc_info=True)
    return None if fix is None else fix.as_retry()
