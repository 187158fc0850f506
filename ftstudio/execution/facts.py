"""What the execution side reports about a task's processes, in words the lifecycle decides on.

The runner writes an `Outcome` into exit.json, process identity says a `Liveness`, and a cluster
scheduler gives a `SchedulerWord`; `studio.lifecycle.decide` reads these, and nothing here decides.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


class Liveness(enum.StrEnum):
    """What process identity (procs.check) says about the runner the studio launched."""

    ALIVE = "alive"
    """Same pid, same start time, same boot, not a zombie."""
    DEAD = "dead"
    """No such process, or a zombie."""
    REUSED = "reused"
    """The pid now belongs to a different process."""
    REBOOTED = "rebooted"
    """The machine restarted since launch: whatever has that pid now is not ours."""
    UNKNOWN = "unknown"
    """Could not tell (permission, I/O error): never treat as dead on this alone; the heartbeat decides."""


class Outcome(enum.StrEnum):
    """How the trainer ended, as the runner writes it into exit.json."""

    COMPLETED = "completed"
    """Exit code 0: the final adapter is on disk."""
    FAILED = "failed"
    """Anything else; the record's reason says what."""
    CANCELLED = "cancelled"
    """The runner was asked to stop by a signal (the studio's cancel sends SIGTERM)."""
    PAUSED = "paused"
    """Asked to pause (SIGUSR1): the trainer stopped at a step boundary after saving a complete checkpoint
    of that step (the record's `checkpoint`; null when it stopped before its first step), no adapter."""
    INTERRUPTED = "interrupted"
    """Stopped by a SIGTERM (SIGINT, SIGHUP) that was not a person's cancel: a shutdown, `docker stop`, a
    scheduler's preemption. The trainer saved a checkpoint of the step it reached when it could within the
    runner's grace, else it was killed; the record's `checkpoint` is the newest complete one (null: none)."""


class Cause(enum.StrEnum):
    """Who stopped an interrupted attempt: what decides whether it counts against the run's restart budget."""

    MACHINE = "machine"
    """What the machine did to a healthy run: a reboot, a shutdown's or a scheduler's SIGTERM, a preemption,
    a killed studio or runner. Never counted: the task resumes after each, however many there are."""
    RUN = "run"
    """The run itself: its trainer crashed or was killed (the OOM killer's way). Counted against
    `resume.max_restarts` and the same-step rule."""


RUN_KILLED = ("the training process was killed", "training process rank", "training processes ranks")
"""How a runner that did not write `cause` began the reason of a trainer killed under it (a run's end)."""


@dataclass(frozen=True)
class ExitRecord:
    """The parts of exit.json a decision needs."""

    outcome: str
    """An `Outcome` value; anything else is read as failed."""
    reason: str = ""
    attempt: int | None = None
    """The attempt that wrote it; None in records that do not say (they count as the current one)."""
    cause: Cause = Cause.MACHINE
    """Who stopped it, for an interrupted one: the trainer's own death (`run`), or the machine."""

    @classmethod
    def from_json(cls, record: Mapping[str, Any]) -> ExitRecord:
        """Read a parsed exit.json. A record is written by our runner, but a bad one must not crash a decision."""
        outcome = record.get("outcome")
        attempt = record.get("attempt")
        if "attempt" in record and (not isinstance(attempt, int) or isinstance(attempt, bool)):
            attempt = 0  # unreadable: attempts count from 1, so it belongs to no attempt
        reason = str(record.get("reason") or "")
        cause = record.get("cause")
        if cause not in tuple(Cause):  # written by a runner from before causes: told by its wording
            cause = Cause.RUN if reason.startswith(RUN_KILLED) else Cause.MACHINE
        return cls(
            outcome=outcome if isinstance(outcome, str) else "",
            reason=reason,
            attempt=attempt,
            cause=Cause(cause),
        )


@dataclass(frozen=True)
class SchedulerWord:
    """What a cluster scheduler (Slurm) says of a task's job, for the ends a runner cannot see: a job
    cancelled in the scheduler (`scancel` by someone) gets the same SIGTERM as a preemption, so only
    the scheduler's final state tells a cancel, to be kept, from an interruption, to be resumed."""

    final: bool
    """The job has ended for the scheduler (its state will not change); False while it still runs or
    is being cleaned up, or when the scheduler cannot be asked."""
    cancelled: bool = False
    """Someone cancelled the job in the scheduler, outside the studio."""
    requeued: bool = False
    """The scheduler holds the job for another run (requeued: by hand, a preemption, a node failure)."""
    reason: str = ""
    """One line naming the scheduler and the job: "the Slurm job 17 was cancelled outside the studio"."""
