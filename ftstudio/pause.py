"""Pausing a task: the signal, the exit code, and the trainer's flag.

A task is paused by SIGUSR1 to its trainer process(es); the runner forwards it.
The trainer's handler only sets a flag. At the next optimizer-step boundary the
trainer saves a complete checkpoint of that step, writes a `suspended` event and
exits with EXIT_SUSPENDED; resuming with `--resume auto` continues from it.

This module is imported by the runner as well as the trainer, so it imports
nothing heavy (no torch, no transformers).
"""

from __future__ import annotations

import signal
from pathlib import Path
from types import FrameType
from typing import Any

PAUSE_SIGNAL = signal.SIGUSR1
EXIT_SUSPENDED = 76
"""The trainer's exit code after a pause: a checkpoint of the step it stopped at is on disk, no adapter.
Clear of 0/1/2 (the trainer's own), 75 (the runner's EXIT_LOCKED) and 128+N (killed by a signal)."""


class Suspended(Exception):  # not an error: the trainer stopped because it was asked to
    """Raised inside the trainer when training stopped for a pause; train.main turns it into EXIT_SUSPENDED."""

    def __init__(self, step: int, total_steps: int, checkpoint: str | None) -> None:
        super().__init__(f"paused at step {step}")
        self.step = step
        self.total_steps = total_steps
        self.checkpoint = checkpoint
        """`checkpoint-N` holding the state to resume from, or None when no step was ever taken."""


class PauseRequest:
    """Set by PAUSE_SIGNAL, read at safe points. The handler does nothing else: the signal can land
    inside a torch kernel or a file write, where saving or exiting would corrupt the run."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def _handle(self, _signum: int, _frame: FrameType | None) -> None:
        self.requested = True

    def install(self) -> PauseRequest:
        self._previous = signal.signal(PAUSE_SIGNAL, self._handle)
        return self

    def uninstall(self) -> None:
        if self._previous is not None:
            signal.signal(PAUSE_SIGNAL, self._previous)
            self._previous = None


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
