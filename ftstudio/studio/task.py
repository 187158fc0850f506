"""Task states and the one table of legal moves between them.

    queued ──> preparing ──> training ──> completed
       │           │  └────────┬──┴──> failed / cancelled / paused / interrupted
       └───────────┴──> cancelled / failed / paused (held in the queue)
    paused / interrupted ──> queued (resume)        paused (frozen) ──> training (thaw)
    failed / cancelled ──> queued (retry)           completed ──> queued (extend)

Every status change in the store goes through `check_transition`; an illegal
move raises instead of silently overwriting (rq's unguarded set_status is the
counter-example). Which legal move a task makes, and when, is lifecycle.py's
decision.
"""

from __future__ import annotations

import enum

from ftstudio.errors import IllegalTransition


class TaskStatus(enum.StrEnum):
    QUEUED = "queued"
    """Accepted and waiting for a launch slot; no process exists yet."""
    PREPARING = "preparing"
    """The runner is up; the trainer is loading the model and the data."""
    TRAINING = "training"
    """The trainer has taken its first step; progress events are flowing."""
    COMPLETED = "completed"
    """The trainer exited 0 and the final adapter is on disk (`extend` can train it further)."""
    PAUSED = "paused"
    """Stopped on request: suspended (a checkpoint saved, no process left, resumes from it), frozen
    (every process stopped with SIGSTOP, its memory and GPUs still held) or held before it started."""
    FAILED = "failed"
    """The trainer reported an error or died and cannot resume; `error` says why."""
    CANCELLED = "cancelled"
    """Stopped on request; no process tagged with the task is left."""
    INTERRUPTED = "interrupted"
    """The process died without an exit record (crash, reboot); waits to resume from its checkpoint."""

    @property
    def is_final(self) -> bool:
        return self in FINAL

    @property
    def has_process(self) -> bool:
        """A process may be running for a task in this state, so the supervisor watches it."""
        return self in (TaskStatus.PREPARING, TaskStatus.TRAINING)


S = TaskStatus
FINAL = frozenset({S.COMPLETED, S.FAILED, S.CANCELLED})

TRANSITIONS: dict[TaskStatus, frozenset[TaskStatus]] = {
    S.QUEUED: frozenset({S.PREPARING, S.CANCELLED, S.FAILED, S.PAUSED}),
    S.PREPARING: frozenset({S.TRAINING, S.COMPLETED, S.FAILED, S.CANCELLED, S.PAUSED, S.INTERRUPTED}),
    S.TRAINING: frozenset({S.COMPLETED, S.FAILED, S.CANCELLED, S.PAUSED, S.INTERRUPTED}),
    S.PAUSED: frozenset({S.QUEUED, S.CANCELLED, S.TRAINING}),
    S.INTERRUPTED: frozenset({S.QUEUED, S.FAILED, S.CANCELLED}),
    S.FAILED: frozenset({S.QUEUED}),
    S.COMPLETED: frozenset({S.QUEUED}),
    S.CANCELLED: frozenset({S.QUEUED}),
}


def check_transition(src: TaskStatus, dst: TaskStatus) -> None:
    if dst not in TRANSITIONS[src]:
        raise IllegalTransition(f"a task cannot go from {src} to {dst}")
