"""Ctrl-C and SIGTERM as the Stop button, for a run trained from the command line.

The first SIGINT or SIGTERM sets the run's stop flag, the very flag the server's Stop sets
(studio/training/job.py): the trainer finishes its current step, saves a checkpoint and the
adapter, and the run ends *stopped* and resumable (studio/training/recipe.py). A second Ctrl-C
aborts at once. Under several processes the trainer agrees on the flag every step, so every
process stops at the same step wherever the signal landed first (Trainer._stop_requested).

Only the CLI's training process installs these handlers, and only around the run: the server
keeps Python's own, and its Stop button is the way to stop there.

Example:
    with StopOnSignals(stop_event) as signals:
        status = run_training(config, run, stop_event)
    exit_code = signals.exit_code if status.stopped else 0
"""

from __future__ import annotations

import os
import signal
import threading

# Conventional: 128 + the signal's number, what a shell reports for a process the signal ended.
EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}

STOPPING = (
    "{name}: stopping after the current step and saving a checkpoint "
    "(`finetune-studio resume` continues from it). Press Ctrl-C again to abort now.\n"
)


class StopOnSignals:
    """Within the ``with`` block, SIGINT and SIGTERM ask ``stop_event`` to stop the run; a second
    SIGINT raises KeyboardInterrupt (abort now). The previous handlers come back on exit.

    A second SIGTERM only stops, as the first did: a scheduler may signal a launcher and its
    workers alike, and torchrun forwards the signal it got, so one request can arrive twice.

    Args:
        stop_event: the run's stop flag (run_training's ``stop_event``).
        announce: print the one line that says what happens next (rank 0 only, under a launcher).
    """

    def __init__(self, stop_event: threading.Event, announce: bool = True):
        self.stop_event = stop_event
        self.announce = announce
        self.received: signal.Signals | None = None  # the first signal, once one arrived
        self._previous: dict[signal.Signals, object] = {}

    def __enter__(self) -> StopOnSignals:
        # Python runs signal handlers on the main thread only and refuses to install them
        # elsewhere: a run trained from another thread keeps the default behaviour.
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in EXIT_CODES}
        return self

    def __exit__(self, *exc_info) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}

    @property
    def exit_code(self) -> int | None:
        """130 after SIGINT, 143 after SIGTERM, None when no signal arrived."""
        return EXIT_CODES.get(self.received)

    def _handle(self, signum: int, frame) -> None:
        sig = signal.Signals(signum)
        if self.received is None:
            self.received = sig
            self.stop_event.set()
            self._say(STOPPING.format(name="Ctrl-C" if sig == signal.SIGINT else sig.name))
        elif sig == signal.SIGINT:
            raise KeyboardInterrupt  # recipe._fail turns it into an "interrupted" status with a sentence

    def _say(self, line: str) -> None:
        # os.write, not print: the handler may run while the main thread is inside a write to
        # the same buffered stream, and a buffered stream refuses to be re-entered.
        if self.announce:
            try:
                os.write(2, line.encode())
            except OSError:  # stderr closed (a detached process): the status still says it all
                pass
