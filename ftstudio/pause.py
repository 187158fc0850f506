"""Pausing a task: the signal, the exit code, and the trainer's flag.

A task is paused by SIGUSR1 to its trainer process(es); the runner forwards it.
The trainer's handler only sets a flag. At the next optimizer-step boundary the
trainer saves a complete checkpoint of that step, writes a `suspended` event and
exits with EXIT_SUSPENDED; resuming with `--resume auto` continues from it.

A shutdown takes the same way out. SIGTERM that reaches the trainer directly (a
machine shutdown or `docker stop` signals every process at once; torchrun's agent
passes its SIGTERM on to the ranks) sets the flag too, marked as a shutdown, so the
trainer checkpoints at the next step and exits rather than losing the work since
the last checkpoint. Only a person's cancel stops it at once: the studio writes
the task dir's `cancel.request` before it signals, and with that file present the
handler lets SIGTERM kill the process as if there were no handler.

This module is imported by the runner as well as the trainer, so it imports
nothing heavy (no torch, no transformers).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from types import FrameType
from typing import Any

PAUSE_SIGNAL = signal.SIGUSR1
SHUTDOWN_SIGNAL = signal.SIGTERM
CANCEL_FILE = "cancel.request"  # TaskDir.cancel_request, named here so the trainer needs no more of the studio
EXIT_SUSPENDED = 76
"""The trainer's exit code after a pause: a checkpoint of the step it stopped at is on disk, no adapter.
Clear of 0/1/2 (the trainer's own), 75 (the runner's EXIT_LOCKED) and 128+N (killed by a signal)."""


class Suspended(Exception):  # not an error: the trainer stopped because it was asked to
    """Raised inside the trainer when training stopped for a pause; train.main turns it into EXIT_SUSPENDED."""

    def __init__(self, step: int, total_steps: int, checkpoint: str | None, shutdown: bool = False) -> None:
        super().__init__(f"{'stopped for a shutdown' if shutdown else 'paused'} at step {step}")
        self.step = step
        self.total_steps = total_steps
        self.checkpoint = checkpoint
        """`checkpoint-N` holding the state to resume from, or None when no step was ever taken."""
        self.shutdown = shutdown
        """Stopped by a SIGTERM that was not a person's cancel, not by a pause."""


class PauseRequest:
    """Set by PAUSE_SIGNAL or a shutdown's SIGTERM, read at safe points. The handlers do nothing else: the
    signal can land inside a torch kernel or a file write, where saving or exiting would corrupt the run.

    `task_dir`: where a person's cancel leaves CANCEL_FILE; None handles no SIGTERM (SIGTERM kills)."""

    NONE, PAUSE, SHUTDOWN = 0, 1, 2
    """`level()`: ordered so that under torchrun an all-reduce MAX gives every rank the strongest request."""

    def __init__(self, task_dir: Path | None = None) -> None:
        self.requested = False
        self.shutdown = False
        self.task_dir = task_dir
        self._previous: dict[int, Any] = {}

    def level(self) -> int:
        return self.SHUTDOWN if self.shutdown else self.PAUSE if self.requested else self.NONE

    def _handle(self, _signum: int, _frame: FrameType | None) -> None:
        self.requested = True

    def _handle_shutdown(self, signum: int, _frame: FrameType | None) -> None:
        if self.task_dir is not None and (self.task_dir / CANCEL_FILE).exists():
            # A person's cancel: die of the signal at once, exactly as without a handler.
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.requested = self.shutdown = True

    def install(self) -> PauseRequest:
        self._previous[PAUSE_SIGNAL] = signal.signal(PAUSE_SIGNAL, self._handle)
        if self.task_dir is not None:
            self._previous[SHUTDOWN_SIGNAL] = signal.signal(SHUTDOWN_SIGNAL, self._handle_shutdown)
        return self

    def uninstall(self) -> None:
        for signum, previous in self._previous.items():
            if previous is not None:
                signal.signal(signum, previous)
        self._previous = {}


def catches_pause(pid: int) -> bool | None:
    """Whether process `pid` has a handler for PAUSE_SIGNAL (Linux: the SigCgt mask in /proc); None when unknown.

    The runner forwards a pause only to a trainer that catches it: a trainer still starting Python
    would be killed by SIGUSR1's default action, so the request waits until its handler is in place."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) >> (PAUSE_SIGNAL - 1) & 1)
    except (OSError, ValueError, IndexError):
        return None
    return None
