"""The lifecycle: every decision about a task's status, in one pure module.

Nothing here reads a file, looks at a process or touches the store. The
supervisor, the service and the runner gather facts; this module says what
they mean; the store applies the answer (`Store.apply`, compare-and-set):

    facts about a task (supervisor) ──decide──> Move | None ──Store.apply──> status + history row
    a person's request (service)    ──answer──> Answer: a Move now, stop the process, remove, or why not
    an event of the task (service, supervisor): submitted, claim, launch_failed, training_began, unstorable_events

A `Move` can only be legal: it is checked against the transition table in
`task.py` when it is made. The actions a status allows (`actions`, the
`actions` field of the task JSON) are the requests `answer` does not refuse,
and `describe` serves statuses, their words and their actions to the page
and the CLI (`GET /api/statuses`, static/lifecycle.js), so nobody keeps a copy.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ftstudio.errors import IllegalTransition
from ftstudio.execution.facts import Cause, ExitRecord, Liveness, Outcome, SchedulerWord
from ftstudio.studio.task import TaskStatus, check_transition

S = TaskStatus

UNEXPECTED = "Training process terminated unexpectedly"
NEVER_STARTED = "the studio stopped before the training process started"
LAUNCH_GRACE_S = 30.0  # a claimed task with no process after this long was never started
# The runner beats every 2 s (runner.HEARTBEAT_S). A live runner with an older beat is stalled: a
# full disk (it keeps training without beating), a machine swapping hard, a frozen filesystem. A
# minute is 30 missed beats, past any hiccup worth hiding; it is shown, never acted on.
HEARTBEAT_STALLED_S = 60.0
# Where the studio cannot check the runner's identity (permissions, an executor whose pids mean
# nothing here), a beat this old stands in for a dead process. Five minutes, not one: a full disk or
# a shared filesystem's attribute cache (up to a minute on NFS) or clock skew between a compute node
# and the file server can age a beat while training goes on, and calling a live task dead kills it.
HEARTBEAT_LOST_S = 300.0
# ...but only once the same stale beat is seen again this long after the first look that found it.
# A laptop that slept an hour wakes with an hour-old beat; its runner beats within 2 s of waking,
# and the studio, waking with it, may look first.
HEARTBEAT_RECHECK_S = 10.0


class Action(enum.StrEnum):
    """What a person can ask of a task (the page's buttons, the CLI's commands), in the page's order."""

    PAUSE = "pause"
    FREEZE = "freeze"
    RESUME = "resume"
    RETRY = "retry"
    EXTEND = "extend"
    CANCEL = "cancel"
    DELETE = "delete"


@dataclass(frozen=True)
class Ask:
    """What a request's answer depends on beyond the task's status."""

    frozen: bool = False
    """Its processes are stopped with SIGSTOP (a frozen pause)."""
    processes: int = 1
    """Training processes it runs (freeze is for single-process runs only)."""
    cluster: str = ""
    """The cluster scheduler that runs it ("slurm"), empty on this machine (freeze is for this machine only)."""
    attempt: int = 1
    checkpoint_step: int | None = None
    """The step of its newest complete checkpoint; None when it has none (or nobody looked)."""
    ran: bool = True
    """Some attempt of it was launched (a task held in the queue before it started has not)."""


@dataclass(frozen=True)
class Facts:
    """What the supervisor knows about a task when it looks (`Supervisor.sync`)."""

    status: TaskStatus
    liveness: Liveness | None = None
    """The launched runner's state; None while no process is recorded yet (claimed, not started)."""
    exit: ExitRecord | None = None
    """exit.json, of whichever attempt wrote it; None when there is none."""
    since_launch_s: float | None = None
    """Seconds since the task was claimed for launch (`started_at`); None if it never was."""
    cancel_requested: bool = False
    """A person asked to cancel (recorded before the signal was sent)."""
    step: int = 0
    total_steps: int | None = None
    attempt: int = 1
    heartbeat_age_s: float | None = None
    """Seconds since the runner's last heartbeat; None before its first or when not looked at."""
    lost_seen_s: float | None = None
    """How long ago this studio first found this same last beat older than HEARTBEAT_LOST_S (0: on
    this look); None while it has not."""
    scheduler: SchedulerWord | None = None
    """The cluster scheduler's word on the job; None for a task on this machine."""
    # The facts below are for the later steps of issue 11 (pause on request; resume an interrupted
    # task from its newest complete checkpoint as attempt N+1 while restarts are left). No move
    # depends on them yet: today's outcomes are kept until those land.
    pause_requested: bool = False
    """A person asked to pause (nothing records this yet)."""
    has_complete_checkpoint: bool | None = None
    """Whether a complete checkpoint exists; None when not looked at."""
    max_restarts: int = 0
    """Automatic restarts allowed after failures of the run itself."""


@dataclass(frozen=True)
class Move:
    """A status change: compare-and-set from `src` (None: a new task) to `dst`, with the fields it writes."""

    src: TaskStatus | None
    dst: TaskStatus
    reason: str
    """One line a worried person understands; kept in the task's history."""
    fields: Mapping[str, Any] = field(default_factory=dict)
    """Columns written in the same transaction (`error`, `eta_s`, `phase`)."""
    stop_processes: bool = False
    """Kill whatever is still tagged with the task once the move is made (orphans of a dead runner)."""
    keep_resources: bool = False
    """Keep the task's slot or GPUs and its attempt open although it leaves a running status (a frozen pause)."""
    cause: Cause | None = None
    """Who ended the attempt, for a move to interrupted (kept with the attempt: `recover` counts by it)."""

    @property
    def releases(self) -> bool:
        """The move frees the task's slot or GPUs and ends its attempt (the store does both with the move)."""
        return not self.dst.has_process and not self.keep_resources

    def __post_init__(self) -> None:
        if self.src is None:
            if self.dst != S.QUEUED:
                raise IllegalTransition(f"a new task starts queued, not {self.dst}")
        else:
            check_transition(self.src, self.dst)


@dataclass(frozen=True)
class Answer:
    """What a person's request does to a task in a given status: a move, a stop, a suspend, a removal or a
    refusal; a freeze or a thaw comes with the move to make once the signal is sent."""

    move: Move | None = None
    """Change the status now."""
    stop: bool = False
    """Record the request and signal the process; `decide` ends the task once the process is gone."""
    suspend: bool = False
    """Record the pause and send the trainer SIGUSR1: it checkpoints at the next step boundary and exits."""
    freeze: bool = False
    """SIGSTOP every process of the task, then make `move` (it keeps the task's slot or GPUs)."""
    thaw: bool = False
    """SIGCONT every process of the task, then make `move`; if they are gone, `requeue` instead."""
    requeue: Move | None = None
    """With `thaw`: the move for a frozen task whose processes died meanwhile (a reboot)."""
    remove: bool = False
    """Delete the task and its files."""
    refused: str | None = None
    """Why not, as the end of a sentence starting "task ID ..."."""


# -- moves on events -----------------------------------------------------------


def submitted() -> Move:
    return Move(None, S.QUEUED, "submitted")


def claim() -> Move:
    """A launcher takes a queued task; compare-and-set, so two launchers never both start it."""
    return Move(S.QUEUED, S.PREPARING, "launching", {"error": None, "phase": "starting"})


def launch_failed(error: str) -> Move:
    return _failed(S.PREPARING, error)


def training_began(status: TaskStatus) -> Move | None:
    """The trainer's first `train_begin` or `progress` event was stored."""
    return Move(S.PREPARING, S.TRAINING, "first step") if status == S.PREPARING else None


def unstorable_events(status: TaskStatus, where: str, step: int = 0, total_steps: int | None = None) -> Move | None:
    """The trainer wrote a record the store cannot take (`where` names it): that task alone fails."""
    if not status.has_process:
        return None
    at = f" at {progress_text(step, total_steps)}" if step else ""
    reason = f"the training process wrote a progress record the studio cannot store ({where}); the task was stopped{at}"
    # Stop its processes after the move: an exit record the runner writes as it dies must not decide instead.
    return _failed(status, reason, stop_processes=True)


# -- the reconcile verdicts ----------------------------------------------------


def decide(facts: Facts) -> Move | None:
    """The move the facts call for, or None to leave the task as it is (and look again later).

    | facts                                        | move                                            |
    | -------------------------------------------- | ----------------------------------------------- |
    | status without a process                     | none: nothing to watch                          |
    | exit record of this attempt                  | completed / cancelled / failed, as it says      |
    | no process recorded, claimed > grace ago     | interrupted: the studio stopped before it began |
    | no process recorded yet, within the grace    | none                                            |
    | alive, whatever the heartbeat                | none (an old beat is shown: `stalled`)          |
    | cannot tell, heartbeat not lost              | none: never dead on doubt                       |
    | cannot tell, heartbeat lost                  | as dead, saying the heartbeat stopped           |
    | dead, reused or rebooted, no exit record     | cancelled if asked to, else interrupted, why    |
    | cluster: stopped from outside, job not final | none: wait for the scheduler's final word       |
    | cluster: the job was cancelled in it         | cancelled, naming the scheduler and the job     |
    | cluster: job ended otherwise, no exit record | interrupted, with the scheduler's reason        |

    An interrupted task is then `recover`ed: back in the queue from its newest checkpoint while its
    policy allows, failed when it does not.

    Lost (`heartbeat_lost`): the same last beat older than HEARTBEAT_LOST_S on two looks at least
    HEARTBEAT_RECHECK_S apart. No beat yet, a fresh one, or a first stale look is not lost.
    """
    status = facts.status
    if not status.has_process:
        return None
    record = facts.exit
    word = facts.scheduler
    if record is not None and record.attempt in (None, facts.attempt):
        if word is not None and record.outcome in STOPPED_FROM_OUTSIDE and not facts.cancel_requested:
            if word.requeued:  # the scheduler will run the job again: the next attempt runs in it
                return _interrupted(
                    facts.status, f"{word.reason}; {record.reason or 'stopped by a signal'}", Cause.MACHINE
                )
            if not word.final:
                return None  # a cancel in the scheduler and a preemption look alike until its final word
            if word.cancelled:
                return _cancelled_outside(facts, word)
            if word.reason:  # why the scheduler stopped it (a time limit, a preemption), then the runner's account
                return _interrupted(
                    facts.status, f"{word.reason}; {record.reason or 'stopped by a signal'}", Cause.MACHINE
                )
        return _finished(facts, record)
    liveness = facts.liveness
    if liveness is None:
        if facts.since_launch_s is not None and facts.since_launch_s > LAUNCH_GRACE_S:
            return _interrupted(status, NEVER_STARTED, Cause.MACHINE)
        return None
    if liveness == Liveness.ALIVE or (liveness == Liveness.UNKNOWN and not heartbeat_lost(facts)):
        return None
    # Gone without an exit record. Whatever it left running (the trainer of a SIGKILLed runner)
    # must not keep writing into a task that has ended.
    if facts.cancel_requested:
        return Move(status, S.CANCELLED, "cancelled on request", stop_processes=True)
    if word is not None and word.cancelled:
        return _cancelled_outside(facts, word)
    at = progress_text(facts.step, facts.total_steps)
    if word is not None and word.reason:
        return _interrupted(status, f"{word.reason} at {at}", Cause.MACHINE, stop_processes=True)
    if liveness == Liveness.REBOOTED:
        reason = f"{UNEXPECTED}: the machine restarted at {at}"
    elif liveness == Liveness.REUSED:
        reason = f"{UNEXPECTED} (its process id now belongs to another program) at {at}"
    elif liveness == Liveness.UNKNOWN:
        minutes = (facts.heartbeat_age_s or 0) / 60
        reason = f"{UNEXPECTED}: no heartbeat for {minutes:.0f} minutes (its process cannot be checked) at {at}"
    else:
        reason = f"{UNEXPECTED} at {at}"
    # The runner itself is gone (a reboot, a kill from outside, the machine): not the run's doing.
    return _interrupted(status, reason, Cause.MACHINE, stop_processes=True)


def heartbeat_lost(facts: Facts) -> bool:
    """The heartbeat says the runner is gone: past HEARTBEAT_LOST_S, and seen so on two looks."""
    age, seen = facts.heartbeat_age_s, facts.lost_seen_s
    return age is not None and age > HEARTBEAT_LOST_S and seen is not None and seen >= HEARTBEAT_RECHECK_S


def stalled(status: TaskStatus, heartbeat_age_s: float | None) -> bool:
    """A fact for the page (the task JSON's `stalled`), never a move: the runner has not beaten lately."""
    return status.has_process and heartbeat_age_s is not None and heartbeat_age_s > HEARTBEAT_STALLED_S


def _finished(facts: Facts, record: ExitRecord) -> Move:
    if record.outcome == Outcome.COMPLETED:
        return Move(facts.status, S.COMPLETED, record.reason, {"eta_s": 0})
    if record.outcome == Outcome.PAUSED and not facts.cancel_requested:
        return Move(facts.status, S.PAUSED, record.reason or "paused on request", {"phase": "paused", "eta_s": None})
    # A cancel the person asked for ends cancelled even when the trainer died of something else on the way;
    # only that one: a SIGTERM from anywhere else (a shutdown; an older runner recorded it as cancelled) is
    # an interruption, resumed later.
    if facts.cancel_requested:
        return Move(facts.status, S.CANCELLED, record.reason or "cancelled on request")
    if record.outcome in (Outcome.INTERRUPTED, Outcome.CANCELLED):
        return _interrupted(facts.status, record.reason or "stopped by a signal the studio did not send", record.cause)
    return _failed(facts.status, record.reason or "training failed; see training.log")


STOPPED_FROM_OUTSIDE = (Outcome.INTERRUPTED, Outcome.CANCELLED)
"""Exit records of a runner stopped by a signal the studio did not send."""


def _cancelled_outside(facts: Facts, word: SchedulerWord) -> Move:
    at = progress_text(facts.step, facts.total_steps)
    reason = f"{word.reason} at {at}; `ftstudio retry` continues from its newest checkpoint"
    return Move(facts.status, S.CANCELLED, reason, {"error": reason}, stop_processes=True)


def _interrupted(src: TaskStatus, reason: str, cause: Cause, *, stop_processes: bool = False) -> Move:
    fields = {"error": reason, "phase": None}
    return Move(src, S.INTERRUPTED, reason, fields, stop_processes=stop_processes, cause=cause)


# -- after an interruption -----------------------------------------------------


@dataclass(frozen=True)
class Recovery:
    """What deciding an interrupted task's next attempt needs (`recover`)."""

    auto: bool = True
    """resume.auto: resume by itself (off: it waits for `ftstudio retry`)."""
    max_restarts: int = 3
    """resume.max_restarts: automatic restarts allowed since the last one a person asked for."""
    restarts: int = 0
    """Automatic restarts so far (a retry by hand starts the count again)."""
    attempt: int = 1
    checkpoint_step: int | None = None
    """The newest complete checkpoint's step; None: none (the next attempt starts from the beginning)."""
    end_steps: tuple[int, ...] = ()
    """The step each attempt that the run itself stopped (cause `run`) ended at, oldest first."""
    cause: Cause = Cause.RUN
    """Who ended the attempt that was just interrupted."""
    stalled: int = 0
    """How many attempts in a row, newest first, the machine stopped before they made any progress."""
    since_end_s: float | None = None
    """Seconds since the last attempt ended; None when unknown."""


MACHINE_WAIT_S = (0.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0)
"""How long an interrupted task waits before its next attempt, by how many attempts in a row the machine
stopped before they progressed (`Recovery.stalled`; the last figure from then on). Never a failure: a
machine that reboots faster than an attempt can load its model is waited out, not given up on."""


def machine_wait_s(stalled: int) -> float:
    return MACHINE_WAIT_S[min(max(stalled - 1, 0), len(MACHINE_WAIT_S) - 1)]


def recover(status: TaskStatus, r: Recovery) -> Move | None:
    """The move for an interrupted task: its next attempt, from its newest complete checkpoint, while its
    policy allows; None when it waits (for a person, or out a machine that keeps stopping it).

    What the machine does (`Cause.MACHINE`) never fails a run: it resumes after each, waiting longer
    (MACHINE_WAIT_S) while attempts are stopped before they progress. Failures of the run itself
    (`Cause.RUN`) count: failed when `resume.max_restarts` are used up, or when two of them in a row
    ended at the same step (something in the run, not the machine, stops it there)."""
    if status != S.INTERRUPTED or not r.auto:
        return None
    ask = Ask(attempt=r.attempt, checkpoint_step=r.checkpoint_step)
    if r.cause == Cause.MACHINE:
        wait = machine_wait_s(r.stalled)
        if wait and (r.since_end_s is None or r.since_end_s < wait):
            return None
        why = "resuming by itself after an interruption by the machine (not counted against resume.max_restarts)"
        if wait:
            why += f"; waited {wait:.0f}s, as the machine stopped {r.stalled} attempts in a row before they progressed"
        return _requeue(status, ask, why)
    retry = "see training.log, then `ftstudio retry TASK` continues it from its newest checkpoint"
    if r.restarts >= r.max_restarts:
        used = f"the {r.max_restarts} automatic restart{'s' if r.max_restarts != 1 else ''}"
        return _failed(status, f"interrupted again; {used} (resume.max_restarts) are used up; {retry}")
    if len(r.end_steps) >= 2 and r.end_steps[-1] == r.end_steps[-2]:
        at = f"step {r.end_steps[-1]}" if r.end_steps[-1] else "the start"
        return _failed(status, f"interrupted twice in a row at {at} with no progress between; {retry}")
    why = f"resuming by itself (restart {r.restarts + 1} of {r.max_restarts})"
    move = _requeue(status, ask, why)
    return Move(move.src, move.dst, move.reason, {**move.fields, "restarts": r.restarts + 1})


def _failed(src: TaskStatus, reason: str, *, stop_processes: bool = False) -> Move:
    return Move(src, S.FAILED, reason, {"error": reason}, stop_processes=stop_processes)


REBUILT = "rebuilt from its folder, where its end was not recorded"


def rebuilt(outcome: str | None, reason: str, *, launched: bool, alive: bool) -> tuple[TaskStatus, str | None]:
    """The status (and error) of a task put back in the index from a folder without a journal (one from before
    the journal was kept): its last attempt's exit record, else whether its runner still runs. Nothing the
    folder cannot show starts again by itself: an end other than completed or paused is failed, and
    `ftstudio retry` continues it from its newest checkpoint."""
    retry = "`ftstudio retry` continues it from its newest checkpoint"
    if outcome == Outcome.COMPLETED:
        return S.COMPLETED, None
    if outcome == Outcome.PAUSED:
        return S.PAUSED, None
    if outcome:
        return S.FAILED, f"{reason or outcome} ({REBUILT}); {retry}"
    if alive:
        return S.TRAINING, None  # the start-up look reattaches it
    if launched:
        return S.FAILED, f"{REBUILT}: it had stopped; {retry}"
    return S.QUEUED, None


def progress_text(step: int, total_steps: int | None) -> str:
    if total_steps:
        return f"step {step}/{total_steps}"
    return f"step {step}" if step else "still preparing"


# -- a person's requests -------------------------------------------------------


def answer(status: TaskStatus, action: Action, ask: Ask | None = None) -> Answer:
    """What `action` does to a task in `status`.

    | action | from                          | does                                                         |
    | ------ | ----------------------------- | ------------------------------------------------------------ |
    | pause  | queued                        | paused at once: held, it keeps its place but does not start   |
    | pause  | preparing / training          | SIGUSR1: checkpoint at the next step, exit, `paused` (decide) |
    | freeze | training, one process         | SIGSTOP to every process; paused, slot/GPUs still held        |
    | resume | paused (suspended or held)    | queued, attempt N+1 if one ran; continues from its checkpoint  |
    | resume | paused (frozen)               | SIGCONT; training again in the same processes                |
    | retry  | failed / cancelled / interrupted | queued, attempt N+1, from the newest complete checkpoint   |
    | extend | completed                     | queued with more epochs, attempt N+1, from its final state    |
    | cancel | not final                     | stop (SIGTERM, then SIGKILL), or cancelled at once            |
    | delete | without a process             | removed with its files                                        |
    """
    ask = ask or Ask()
    if action == Action.PAUSE:
        if status == S.QUEUED:
            return Answer(move=Move(status, S.PAUSED, "held in the queue on request", {"phase": "held"}))
        if status.has_process:
            check_transition(status, S.PAUSED)  # `decide` makes it when the trainer's paused exit arrives
            return Answer(suspend=True)
        return Answer(refused=f"is {status}; only a queued or running task can be paused")
    if action == Action.FREEZE:
        if status != S.TRAINING:
            return Answer(refused=f"is {status}; only a training task can be frozen (a queued one can be paused)")
        if ask.cluster:
            return Answer(
                refused=f"runs as a {ask.cluster.title()} job; freeze is for tasks on this machine, use pause (it checkpoints)"
            )
        if ask.processes > 1:
            return Answer(
                refused=f"runs {ask.processes} processes; freeze is for single-process runs, use pause (it checkpoints)"
            )
        frozen = Move(status, S.PAUSED, "frozen on request", {"phase": "frozen"}, keep_resources=True)
        return Answer(freeze=True, move=frozen)
    if action == Action.RESUME:
        if status != S.PAUSED:
            return Answer(refused=f"is {status}; only a paused task can be resumed")
        if ask.frozen:
            thaw = Move(status, S.TRAINING, "resumed on request", {"frozen_at": None, "phase": "training"})
            gone = _requeue(status, ask, "resumed on request, but its frozen processes were gone")
            return Answer(thaw=True, move=thaw, requeue=gone)
        return Answer(move=_requeue(status, ask, "resumed on request"))
    if action == Action.RETRY:
        if status not in (S.FAILED, S.CANCELLED, S.INTERRUPTED):
            return Answer(refused=f"is {status}; only a failed, cancelled or interrupted task can be retried")
        move = _requeue(status, ask, "retried on request")
        # A person took it on: automatic restarts count again from none.
        return Answer(move=Move(move.src, move.dst, move.reason, {**move.fields, "restarts": 0}))
    if action == Action.EXTEND:
        if status != S.COMPLETED:
            return Answer(refused=f"is {status}; only a completed task can be extended")
        return Answer(move=_requeue(status, ask, "extended on request"))
    if action == Action.CANCEL:
        if status.is_final:
            return Answer(refused=f"is already {status}; there is nothing to cancel")
        if status.has_process:
            # Only legal because `decide` can end a running task cancelled: checked here, not assumed.
            check_transition(status, S.CANCELLED)
            return Answer(stop=True)
        # A frozen task's stopped processes are killed (SIGKILL ends a stopped process; SIGTERM would wait).
        return Answer(move=Move(status, S.CANCELLED, "cancelled on request", stop_processes=ask.frozen))
    if action == Action.DELETE:
        if ask.frozen:
            return Answer(refused="is frozen and its processes still hold memory; cancel it before deleting it")
        if status.has_process:
            return Answer(refused=f"is {status}; cancel it before deleting it")
        return Answer(remove=True)
    raise ValueError(f"unknown action {action!r}")


def _requeue(status: TaskStatus, ask: Ask, why: str) -> Move:
    """Back into the queue; a task that ran comes back as its next attempt, from its newest complete checkpoint."""
    if not ask.ran:
        return Move(status, S.QUEUED, why, {"phase": None, "error": None})
    where = f"continues from step {ask.checkpoint_step}" if ask.checkpoint_step else "starts from the beginning"
    if ask.checkpoint_step is None and status == S.COMPLETED:
        where = "continues from its final state"
    fields = {"attempt": ask.attempt + 1, "phase": None, "error": None, "pause_requested_at": None}
    fields |= {"cancel_requested_at": None, "frozen_at": None, "finished_at": None}
    return Move(status, S.QUEUED, f"{why}; attempt {ask.attempt + 1} {where}", fields)


def actions(status: TaskStatus, ask: Ask | None = None) -> tuple[str, ...]:
    """The requests a task in `status` can take, in the order the page shows them."""
    return tuple(a.value for a in Action if answer(status, a, ask).refused is None)


def deletable() -> frozenset[TaskStatus]:
    """Statuses whose tasks may be removed (the store deletes only while the task is still in one)."""
    return frozenset(s for s in S if answer(s, Action.DELETE).remove)


# -- words for people ----------------------------------------------------------

STATUS_WORDS: dict[TaskStatus, tuple[str, str]] = {
    S.QUEUED: ("Queued", "waiting for a launch slot"),
    S.PREPARING: ("Preparing", "loading the model and the data"),
    S.TRAINING: ("Training", "training steps are running"),
    S.COMPLETED: ("Completed", "the adapter is ready"),
    S.PAUSED: ("Paused", "stopped on request; resume continues it"),
    S.FAILED: ("Failed", "stopped with an error"),
    S.CANCELLED: ("Cancelled", "stopped on request"),
    S.INTERRUPTED: ("Interrupted", "stopped by a crash, reboot or shutdown; resumes from its newest checkpoint"),
}

# label, hint (a button's tooltip), what the page says while it runs, and whether it destroys work.
ACTION_WORDS: dict[Action, tuple[str, str, str, bool]] = {
    Action.PAUSE: (
        "Pause",
        "Save a checkpoint at the next step and stop; its slot or GPUs are freed. Resume continues from there.",
        "Pausing: saving a checkpoint at the next step…",
        False,
    ),
    Action.FREEZE: (
        "Freeze",
        "Stop the process where it is (instant); its memory and GPUs stay held until resumed.",
        "Freezing…",
        False,
    ),
    Action.RESUME: ("Resume", "Continue training: back into the queue, or thaw a frozen run.", "Resuming…", False),
    Action.RETRY: (
        "Retry",
        "Run it again as a new attempt, from its newest complete checkpoint.",
        "Queueing the retry…",
        False,
    ),
    Action.EXTEND: (
        "Extend",
        "Train a completed task for more epochs, from its final state, as a new attempt.",
        "Queueing more epochs…",
        False,
    ),
    Action.CANCEL: (
        "Cancel",
        "Stop training now; the task ends as cancelled.",
        "Cancelling: stopping the training process…",
        True,
    ),
    Action.DELETE: ("Delete", "Remove the task and its files.", "Deleting…", True),
}


def describe() -> dict[str, Any]:
    """Every status and action with its words, as `GET /api/statuses` serves it. Labels and hints
    are plain text: the page adds its own glyphs and colours."""
    return {
        "statuses": [
            {
                "status": s.value,
                "label": STATUS_WORDS[s][0],
                "hint": STATUS_WORDS[s][1],
                "final": s.is_final,
                "has_process": s.has_process,
                "actions": list(actions(s)),
            }
            for s in S
        ],
        "actions": [
            {
                "action": a.value,
                "label": ACTION_WORDS[a][0],
                "hint": ACTION_WORDS[a][1],
                "pending": ACTION_WORDS[a][2],
                "destructive": ACTION_WORDS[a][3],
            }
            for a in Action
        ],
    }
