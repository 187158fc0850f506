"""Fencing by attempt number, shared by the runner and the trainer.

The studio writes the task dir's `attempt` file (the attempt it launched last, as text) before it
starts a runner, and passes the number down: `--attempt N` to the runner, FTSTUDIO_ATTEMPT to the
trainer. A process whose number is not the file's belongs to an attempt the studio gave up on (it
woke from a long stop, or outlived a crash the studio could not see through): it must write nothing
more, because a newer attempt owns the task dir. The runner checks at every heartbeat and before its
exit record; the trainer before every event, checkpoint and failure report, and exits EXIT_STALE at
once when it is stale.

Standard library only: the trainer imports it.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

ATTEMPT_ENV = "FTSTUDIO_ATTEMPT"
EXIT_STALE = 77  # EX_NOPERM: the task dir's `attempt` names another attempt; this process wrote nothing more


def named_attempt(task_dir: Path) -> int | None:
    """The attempt the task dir's `attempt` file names; None when it is missing (started by hand, or by a
    studio that predates the file). Raises ValueError / OSError when it cannot be read as one."""
    try:
        named = json.loads((task_dir / "attempt").read_text())
    except FileNotFoundError:
        return None
    if not isinstance(named, int) or isinstance(named, bool):
        raise ValueError(f"holds {named!r}, not an attempt number")
    return named


class Fence:
    """The trainer's check: `check()` before every write to the task dir."""

    def __init__(self, task_dir: Path, attempt: int | None = None) -> None:
        self.task_dir = task_dir
        if attempt is None and os.environ.get(ATTEMPT_ENV, "").isdigit():
            attempt = int(os.environ[ATTEMPT_ENV])
        self.attempt = attempt
        """None: not started by a runner with a number (by hand, or an older studio): never stale."""

    def stale_for(self) -> int | None:
        """The newer attempt that owns the task dir, if this process's is not the one named; never on doubt."""
        if self.attempt is None:
            return None
        try:
            named = named_attempt(self.task_dir)
        except (OSError, ValueError):
            return None
        return None if named is None or named == self.attempt else named

    def check(self) -> None:
        """Exit EXIT_STALE at once, writing nothing more, when a newer attempt owns the task dir."""
        newer = self.stale_for()
        if newer is not None:
            print(
                f"this training process belongs to attempt {self.attempt}, but the task is at attempt {newer} "
                "now: it stops at once and writes nothing more",
                file=sys.stderr,
                flush=True,
            )
            os._exit(EXIT_STALE)  # no finally, no atexit: they would write (events, checkpoints)
