"""The lifecycle's decisions, table by table: every status against every fact it models."""

from __future__ import annotations

import itertools
import re
from pathlib import Path
from typing import Any

import pytest

from ftstudio.errors import IllegalTransition
from ftstudio.execution.facts import Cause, ExitRecord, Liveness, Outcome, SchedulerWord
from ftstudio.execution.runner import HEARTBEAT_S
from ftstudio.studio import lifecycle
from ftstudio.studio.lifecycle import (
    HEARTBEAT_LOST_S,
    HEARTBEAT_RECHECK_S,
    HEARTBEAT_STALLED_S,
    LAUNCH_GRACE_S,
    NEVER_STARTED,
    UNEXPECTED,
    Action,
    Ask,
    Facts,
    Move,
    Recovery,
    answer,
    decide,
)
from ftstudio.studio.task import TRANSITIONS
from ftstudio.studio.task import TaskStatus as S
from ftstudio.web import lifecyclejs

RUNNING = [S.PREPARING, S.TRAINING]
AT = "step 7/20"  # progress in the facts below
LOST = HEARTBEAT_LOST_S + 1  # a heartbeat age past the lost threshold
SILENT = f"{UNEXPECTED}: no heartbeat for 5 minutes (its process cannot be checked) at {AT}"

# (what the supervisor finds, the facts beyond the status, the status it moves to (None: stays), the reason).
# Every scenario is played against every status: a status without a process never moves.
SCENARIOS: list[tuple[str, dict[str, Any], S | None, str]] = [
    ("claimed, no process yet", {"since_launch_s": 5.0}, None, ""),
    ("claimed, no process at the grace", {"since_launch_s": LAUNCH_GRACE_S}, None, ""),
    ("claimed, no process past the grace", {"since_launch_s": LAUNCH_GRACE_S + 1}, S.INTERRUPTED, NEVER_STARTED),
    ("never claimed, no process", {}, None, ""),
    ("alive", {"liveness": Liveness.ALIVE}, None, ""),
    ("alive, cancel asked", {"liveness": Liveness.ALIVE, "cancel_requested": True}, None, ""),
    ("cannot tell", {"liveness": Liveness.UNKNOWN}, None, ""),
    ("cannot tell, long after launch", {"liveness": Liveness.UNKNOWN, "since_launch_s": 1e6}, None, ""),
    ("dead", {"liveness": Liveness.DEAD}, S.INTERRUPTED, f"{UNEXPECTED} at {AT}"),
    (
        "pid reused",
        {"liveness": Liveness.REUSED},
        S.INTERRUPTED,
        f"{UNEXPECTED} (its process id now belongs to another program) at {AT}",
    ),
    ("rebooted", {"liveness": Liveness.REBOOTED}, S.INTERRUPTED, f"{UNEXPECTED}: the machine restarted at {AT}"),
    ("dead, cancel asked", {"liveness": Liveness.DEAD, "cancel_requested": True}, S.CANCELLED, "cancelled on request"),
    (
        "reused, cancel asked",
        {"liveness": Liveness.REUSED, "cancel_requested": True},
        S.CANCELLED,
        "cancelled on request",
    ),
    (
        "rebooted, cancel asked",
        {"liveness": Liveness.REBOOTED, "cancel_requested": True},
        S.CANCELLED,
        "cancelled on request",
    ),
    # The heartbeat: shown when stale, a liveness fact only where identity cannot be checked.
    ("alive, fresh heartbeat", {"liveness": Liveness.ALIVE, "heartbeat_age_s": 1.5}, None, ""),
    ("alive, stalled heartbeat", {"liveness": Liveness.ALIVE, "heartbeat_age_s": HEARTBEAT_STALLED_S + 1}, None, ""),
    (
        "alive, heartbeat lost and seen twice (a laptop that slept)",
        {"liveness": Liveness.ALIVE, "heartbeat_age_s": 3600.0, "lost_seen_s": 3600.0},
        None,
        "",
    ),
    ("cannot tell, no heartbeat yet", {"liveness": Liveness.UNKNOWN, "lost_seen_s": 1e6}, None, ""),
    ("cannot tell, fresh heartbeat", {"liveness": Liveness.UNKNOWN, "heartbeat_age_s": 1.5}, None, ""),
    (
        "cannot tell, heartbeat stalled",
        {"liveness": Liveness.UNKNOWN, "heartbeat_age_s": HEARTBEAT_STALLED_S + 1},
        None,
        "",
    ),
    (
        "cannot tell, heartbeat at the lost threshold",
        {"liveness": Liveness.UNKNOWN, "heartbeat_age_s": HEARTBEAT_LOST_S, "lost_seen_s": 1e6},
        None,
        "",
    ),
    ("cannot tell, heartbeat lost, not seen so", {"liveness": Liveness.UNKNOWN, "heartbeat_age_s": LOST}, None, ""),
    (
        "cannot tell, heartbeat lost, first look",
        {"liveness": Liveness.UNKNOWN, "heartbeat_age_s": LOST, "lost_seen_s": 0.0},
        None,
        "",
    ),
    (
        "cannot tell, heartbeat lost, looked again too soon",
        {"liveness": Liveness.UNKNOWN, "heartbeat_age_s": LOST, "lost_seen_s": HEARTBEAT_RECHECK_S - 0.1},
        None,
        "",
    ),
    (
        "cannot tell, heartbeat lost, seen again",
        {"liveness": Liveness.UNKNOWN, "heartbeat_age_s": LOST, "lost_seen_s": HEARTBEAT_RECHECK_S},
        S.INTERRUPTED,
        SILENT,
    ),
    (
        "cannot tell, heartbeat lost, cancel asked",
        {
            "liveness": Liveness.UNKNOWN,
            "heartbeat_age_s": LOST,
            "lost_seen_s": HEARTBEAT_RECHECK_S,
            "cancel_requested": True,
        },
        S.CANCELLED,
        "cancelled on request",
    ),
    (
        "dead, fresh heartbeat",
        {"liveness": Liveness.DEAD, "heartbeat_age_s": 0.5},
        S.INTERRUPTED,
        f"{UNEXPECTED} at {AT}",
    ),
    (
        "rebooted, fresh heartbeat",
        {"liveness": Liveness.REBOOTED, "heartbeat_age_s": 0.5},
        S.INTERRUPTED,
        f"{UNEXPECTED}: the machine restarted at {AT}",
    ),
    (
        "exit completed, cannot tell, heartbeat lost",
        {
            "exit": ExitRecord("completed", "done"),
            "liveness": Liveness.UNKNOWN,
            "heartbeat_age_s": LOST,
            "lost_seen_s": HEARTBEAT_RECHECK_S,
        },
        S.COMPLETED,
        "done",
    ),
    ("exit completed", {"exit": ExitRecord("completed", "done")}, S.COMPLETED, "done"),
    (
        "exit completed, still alive",
        {"exit": ExitRecord("completed", "done"), "liveness": Liveness.ALIVE},
        S.COMPLETED,
        "done",
    ),
    (
        "exit completed, cancel asked",
        {"exit": ExitRecord("completed", "done"), "cancel_requested": True},
        S.COMPLETED,
        "done",
    ),
    ("exit failed", {"exit": ExitRecord("failed", "out of memory")}, S.FAILED, "out of memory"),
    ("exit failed, no reason", {"exit": ExitRecord("failed")}, S.FAILED, "training failed; see training.log"),
    (
        "exit failed, cancel asked",
        {"exit": ExitRecord("failed", "killed"), "cancel_requested": True},
        S.CANCELLED,
        "killed",
    ),
    # Only a cancel the person asked for ends cancelled: a SIGTERM from elsewhere is an interruption.
    (
        "exit cancelled, cancel asked",
        {"exit": ExitRecord("cancelled", "stopped on request (SIGTERM)"), "cancel_requested": True},
        S.CANCELLED,
        "stopped on request (SIGTERM)",
    ),
    (
        "exit cancelled, no reason, cancel asked",
        {"exit": ExitRecord("cancelled"), "cancel_requested": True},
        S.CANCELLED,
        "cancelled on request",
    ),
    (
        "exit cancelled, nobody asked (an older runner's shutdown)",
        {"exit": ExitRecord("cancelled", "stopped on request (SIGTERM)")},
        S.INTERRUPTED,
        "stopped on request (SIGTERM)",
    ),
    (
        "exit interrupted (a shutdown)",
        {"exit": ExitRecord("interrupted", "stopped by SIGTERM at step 7/20 after saving checkpoint-7")},
        S.INTERRUPTED,
        "stopped by SIGTERM at step 7/20 after saving checkpoint-7",
    ),
    (
        "exit interrupted, cancel asked",
        {"exit": ExitRecord("interrupted", "stopped by SIGTERM"), "cancel_requested": True},
        S.CANCELLED,
        "stopped by SIGTERM",
    ),
    ("exit unreadable outcome", {"exit": ExitRecord("", "")}, S.FAILED, "training failed; see training.log"),
    ("exit of this attempt", {"exit": ExitRecord("completed", "done", attempt=2), "attempt": 2}, S.COMPLETED, "done"),
    (
        "exit of an older attempt, alive",
        {"exit": ExitRecord("completed", "done", attempt=1), "attempt": 2, "liveness": Liveness.ALIVE},
        None,
        "",
    ),
    (
        "exit of an older attempt, dead",
        {"exit": ExitRecord("failed", "old", attempt=1), "attempt": 2, "liveness": Liveness.DEAD},
        S.INTERRUPTED,
        f"{UNEXPECTED} at {AT}",
    ),
    ("exit of an older attempt, no process", {"exit": ExitRecord("completed", "", attempt=1), "attempt": 2}, None, ""),
    # Facts no verdict depends on: a pending pause, a checkpoint (recover() reads those).
    ("alive, pause asked", {"liveness": Liveness.ALIVE, "pause_requested": True}, None, ""),
    ("dead, pause asked", {"liveness": Liveness.DEAD, "pause_requested": True}, S.INTERRUPTED, f"{UNEXPECTED} at {AT}"),
    (
        "dead, checkpoint and restarts left",
        {"liveness": Liveness.DEAD, "has_complete_checkpoint": True, "max_restarts": 3},
        S.INTERRUPTED,
        f"{UNEXPECTED} at {AT}",
    ),
]


def facts(status: S, **extra: Any) -> Facts:
    return Facts(status=status, **{"step": 7, "total_steps": 20, **extra})


@pytest.mark.parametrize("status", list(S))
@pytest.mark.parametrize(("name", "extra", "dst", "reason"), SCENARIOS, ids=[s[0] for s in SCENARIOS])
def test_every_status_against_every_scenario(
    status: S, name: str, extra: dict[str, Any], dst: S | None, reason: str
) -> None:
    move = decide(facts(status, **extra))
    if not status.has_process or dst is None:
        assert move is None, name
        return
    assert move is not None, name
    assert (move.src, move.dst, move.reason) == (status, dst, reason)
    assert move.dst in TRANSITIONS[status]
    assert move.fields.get("error") == (reason if dst in (S.FAILED, S.INTERRUPTED) else None)
    if dst == S.COMPLETED:
        assert move.fields["eta_s"] == 0
    # A runner gone without an exit record may have left its trainer running: that must be stopped.
    # (A runner that cannot be checked only moves once its heartbeat is lost, and then it is gone too.)
    gone = extra.get("liveness") in (Liveness.DEAD, Liveness.REUSED, Liveness.REBOOTED, Liveness.UNKNOWN)
    assert move.stop_processes == (gone and not _exit_of_this_attempt(extra))


def _exit_of_this_attempt(extra: dict[str, Any]) -> bool:
    record = extra.get("exit")
    return record is not None and record.attempt in (None, extra.get("attempt", 1))


LIVENESS = [None, *Liveness]
EXITS = [
    None,
    *(ExitRecord(o.value, "why") for o in Outcome),
    ExitRecord("gibberish"),
    ExitRecord("completed", "old", attempt=0),
]


BEAT_AGES = [None, 1.5, HEARTBEAT_STALLED_S + 1, HEARTBEAT_LOST_S, LOST]
LOST_SEEN = [None, 0.0, HEARTBEAT_RECHECK_S]


@pytest.mark.parametrize("status", list(S))
def test_the_whole_fact_space_gives_only_legal_moves_and_keeps_doubt(status: S) -> None:
    """Every combination of the facts that decide today: liveness x exit record x cancel x time since
    launch x heartbeat age x how long its loss has been seen."""
    for liveness, record, cancel, since, age, seen in itertools.product(
        LIVENESS, EXITS, [False, True], [None, 1.0, 1e4], BEAT_AGES, LOST_SEEN
    ):
        f = Facts(
            status,
            liveness=liveness,
            exit=record,
            cancel_requested=cancel,
            since_launch_s=since,
            heartbeat_age_s=age,
            lost_seen_s=seen,
        )
        move = decide(f)
        lost = age is not None and age > HEARTBEAT_LOST_S and seen is not None and seen >= HEARTBEAT_RECHECK_S
        assert lifecycle.heartbeat_lost(f) == lost
        current = record is not None and record.attempt is None
        if not status.has_process:
            assert move is None
            continue
        if move is not None:
            assert move.src == status and move.dst in TRANSITIONS[status]
            # Every verdict ends the task's processes: it ends, it paused as a pause asked (its exit record says
            # so), or it was interrupted (a crash, a reboot, a shutdown) and `recover` decides what comes next.
            paused = move.dst == S.PAUSED and record is not None and record.outcome == "paused"
            assert move.dst.is_final or paused or move.dst == S.INTERRUPTED
            assert move.releases
            assert move.reason
        if not current and (liveness == Liveness.ALIVE or (liveness == Liveness.UNKNOWN and not lost)):
            assert move is None, "never dead on doubt, never dead while alive, whatever the heartbeat"
        if not current and liveness == Liveness.UNKNOWN and lost:
            assert move is not None and move.stop_processes, "a lost heartbeat is the dead move"
        if current:
            assert move is not None
            assert (move.dst == S.COMPLETED) == (record.outcome == "completed")
        if move is not None and move.dst == S.CANCELLED:
            assert cancel, "only a requested cancel ends cancelled"


@pytest.mark.parametrize("status", list(S))
@pytest.mark.parametrize(
    ("age", "shown"),
    [(None, False), (0.0, False), (HEARTBEAT_STALLED_S, False), (HEARTBEAT_STALLED_S + 0.1, True), (1e6, True)],
)
def test_a_stale_heartbeat_is_shown_as_stalled_only_while_there_is_a_process(
    status: S, age: float | None, shown: bool
) -> None:
    assert lifecycle.stalled(status, age) == (shown and status.has_process)


def test_the_heartbeat_thresholds_keep_their_order() -> None:
    # Shown stalled well before it could count as lost; the recheck outlasts several beats.
    assert HEARTBEAT_S * 5 <= HEARTBEAT_RECHECK_S < HEARTBEAT_STALLED_S < HEARTBEAT_LOST_S


@pytest.mark.parametrize(
    ("step", "total", "text"),
    [(0, None, "still preparing"), (3, None, "step 3"), (0, 10, "step 0/10"), (3, 10, "step 3/10")],
)
def test_progress_text(step: int, total: int | None, text: str) -> None:
    assert lifecycle.progress_text(step, total) == text
    assert decide(Facts(S.TRAINING, liveness=Liveness.DEAD, step=step, total_steps=total)).reason.endswith(text)


def test_moves_on_events() -> None:
    assert lifecycle.submitted() == Move(None, S.QUEUED, "submitted")
    claim = lifecycle.claim()
    assert (claim.src, claim.dst, claim.reason) == (S.QUEUED, S.PREPARING, "launching")
    assert claim.fields == {"error": None, "phase": "starting"}
    failed = lifecycle.launch_failed("no python")
    assert (failed.src, failed.dst, failed.reason, failed.fields) == (
        S.PREPARING,
        S.FAILED,
        "no python",
        {"error": "no python"},
    )
    for status in S:
        began = lifecycle.training_began(status)
        assert (began is not None) == (status == S.PREPARING)
        refused = lifecycle.unstorable_events(status, "line 3 of events.jsonl: too big", step=4, total_steps=9)
        assert (refused is not None) == status.has_process
        if refused is not None:
            assert refused.dst == S.FAILED and refused.stop_processes
            assert (
                refused.reason
                == refused.fields["error"]
                == (
                    "the training process wrote a progress record the studio cannot store "
                    "(line 3 of events.jsonl: too big); the task was stopped at step 4/9"
                )
            )
    assert lifecycle.unstorable_events(S.PREPARING, "x").reason.endswith("the task was stopped")


def test_an_illegal_move_cannot_be_made() -> None:
    with pytest.raises(IllegalTransition, match="from completed to training"):
        Move(S.COMPLETED, S.TRAINING, "no")
    with pytest.raises(IllegalTransition, match="starts queued"):
        Move(None, S.TRAINING, "no")


@pytest.mark.parametrize(
    ("record", "read"),
    [
        ({"outcome": "completed", "reason": "done", "attempt": 2}, ExitRecord("completed", "done", 2)),
        ({"outcome": "failed"}, ExitRecord("failed", "", None)),
        ({"outcome": 3, "reason": None, "attempt": "2"}, ExitRecord("", "", 0)),
        ({"attempt": None}, ExitRecord("", "", 0)),
        ({"attempt": True}, ExitRecord("", "", 0)),
    ],
)
def test_exit_records_are_read_without_trusting_them(record: dict[str, Any], read: ExitRecord) -> None:
    assert ExitRecord.from_json(record) == read


# -- requests and actions ------------------------------------------------------

# (status, action) -> what happens to a task that ran once, single-process, not frozen:
# "move:<dst>", "stop", "suspend", "freeze", "remove" or "refused".
REQUESTS: dict[tuple[S, Action], str] = {
    (S.QUEUED, Action.PAUSE): "move:paused",
    (S.PREPARING, Action.PAUSE): "suspend",
    (S.TRAINING, Action.PAUSE): "suspend",
    (S.TRAINING, Action.FREEZE): "freeze",
    (S.PAUSED, Action.RESUME): "move:queued",
    (S.FAILED, Action.RETRY): "move:queued",
    (S.CANCELLED, Action.RETRY): "move:queued",
    (S.INTERRUPTED, Action.RETRY): "move:queued",
    (S.COMPLETED, Action.EXTEND): "move:queued",
    (S.QUEUED, Action.CANCEL): "move:cancelled",
    (S.PREPARING, Action.CANCEL): "stop",
    (S.TRAINING, Action.CANCEL): "stop",
    (S.PAUSED, Action.CANCEL): "move:cancelled",
    (S.INTERRUPTED, Action.CANCEL): "move:cancelled",
    **{(s, Action.DELETE): "remove" for s in S if not s.has_process},
}
REQUESTS = {(s, a): REQUESTS.get((s, a), "refused") for s in S for a in Action}


def test_the_request_table_covers_every_status_and_action() -> None:
    assert set(REQUESTS) == set(itertools.product(S, Action))


@pytest.mark.parametrize(("status", "action"), list(REQUESTS))
def test_requests(status: S, action: Action) -> None:
    got = answer(status, action, Ask(attempt=3, checkpoint_step=40))
    want = REQUESTS[status, action]
    if want.startswith("move:"):
        assert got.move is not None and got.move.src == status and got.move.dst == want[5:]
        assert not (got.stop or got.suspend or got.freeze or got.thaw or got.remove or got.refused)
        if want == "move:queued":  # the next attempt, from the checkpoint, with the last attempt's marks cleared
            assert got.move.fields["attempt"] == 4 and got.move.fields["error"] is None
            assert got.move.reason.endswith("on request; attempt 4 continues from step 40")
            assert got.move.fields["cancel_requested_at"] is None and got.move.fields["finished_at"] is None
    elif want == "stop":
        assert got.stop and got.move is None
        # ...and the process's end is then decided cancelled, whatever killed it.
        assert decide(Facts(status, liveness=Liveness.DEAD, cancel_requested=True)).dst == S.CANCELLED
    elif want == "suspend":
        assert got.suspend and got.move is None
        # ...and the trainer's paused exit is then decided paused, freeing what it held.
        move = decide(Facts(status, liveness=Liveness.DEAD, exit=ExitRecord("paused", "paused at step 7")))
        assert move is not None and move.dst == S.PAUSED and move.releases and move.reason == "paused at step 7"
    elif want == "freeze":
        assert got.freeze and got.move is not None and got.move.dst == S.PAUSED
        assert got.move.keep_resources and not got.move.releases  # its memory and GPUs are still in use
    elif want == "remove":
        assert got.remove and got.move is None
    else:
        assert got.refused and got.refused.startswith(("is ", "runs ")) and got.move is None


def test_requests_that_depend_on_more_than_the_status() -> None:
    # Freeze is for single-process runs: stopping some ranks of a torchrun job would hang the others.
    refused = answer(S.TRAINING, Action.FREEZE, Ask(processes=2)).refused
    assert refused == "runs 2 processes; freeze is for single-process runs, use pause (it checkpoints)"
    # A frozen task thaws in place, or goes back to the queue when its processes died meanwhile.
    thaw = answer(S.PAUSED, Action.RESUME, Ask(frozen=True, attempt=1, checkpoint_step=20))
    assert thaw.thaw and thaw.move is not None and thaw.move.dst == S.TRAINING and thaw.move.fields["frozen_at"] is None
    assert thaw.requeue is not None and thaw.requeue.dst == S.QUEUED and thaw.requeue.fields["attempt"] == 2
    # A frozen task's processes are killed when it is cancelled, and it cannot be deleted with them alive.
    cancel = answer(S.PAUSED, Action.CANCEL, Ask(frozen=True)).move
    assert cancel is not None and cancel.stop_processes and cancel.dst == S.CANCELLED
    assert answer(S.PAUSED, Action.DELETE, Ask(frozen=True)).refused
    # Held before it ever started: resuming puts it back as the same first attempt.
    held = answer(S.PAUSED, Action.RESUME, Ask(ran=False)).move
    assert held is not None and held.dst == S.QUEUED and "attempt" not in held.fields
    # No checkpoint: the next attempt says it starts over; a completed task continues from its final state.
    fresh = answer(S.FAILED, Action.RETRY, Ask(attempt=1)).move
    assert fresh is not None and fresh.reason == "retried on request; attempt 2 starts from the beginning"
    more = answer(S.COMPLETED, Action.EXTEND, Ask(attempt=1)).move
    assert more is not None and more.reason == "extended on request; attempt 2 continues from its final state"


def test_a_cancel_wins_over_a_paused_exit() -> None:
    facts = Facts(S.TRAINING, liveness=Liveness.DEAD, exit=ExitRecord("paused", "paused"), cancel_requested=True)
    move = decide(facts)
    assert move is not None and move.dst == S.CANCELLED


def test_actions_are_the_requests_not_refused() -> None:
    assert {s: lifecycle.actions(s) for s in S} == {
        S.QUEUED: ("pause", "cancel", "delete"),
        S.PREPARING: ("pause", "cancel"),
        S.TRAINING: ("pause", "freeze", "cancel"),
        S.PAUSED: ("resume", "cancel", "delete"),
        S.INTERRUPTED: ("retry", "cancel", "delete"),
        S.COMPLETED: ("extend", "delete"),
        S.FAILED: ("retry", "delete"),
        S.CANCELLED: ("retry", "delete"),
    }
    assert lifecycle.actions(S.TRAINING, Ask(processes=4)) == ("pause", "cancel")
    assert lifecycle.actions(S.PAUSED, Ask(frozen=True)) == ("resume", "cancel")
    assert lifecycle.deletable() == {s for s in S if not s.has_process}


def test_describe_serves_every_status_and_action_in_plain_words() -> None:
    table = lifecycle.describe()
    assert [s["status"] for s in table["statuses"]] == [s.value for s in S]
    for row in table["statuses"]:
        status = S(row["status"])
        assert row["final"] == status.is_final and row["has_process"] == status.has_process
        assert row["actions"] == list(lifecycle.actions(status))
        assert row["label"] and row["hint"]
        # Glyphs and colours are the page's: the words must read alone (a screen reader, the CLI).
        assert row["label"].isalpha() and row["label"][0].isupper()
    assert [a["action"] for a in table["actions"]] == [a.value for a in Action]
    for row in table["actions"]:
        assert row["label"] and row["hint"].endswith(".") and row["pending"]


STATIC = Path(lifecyclejs.__file__).with_name("static")


def test_the_pages_lifecycle_module_is_generated_from_the_lifecycle() -> None:
    assert lifecyclejs.JS_PATH.read_text(encoding="utf-8") == lifecyclejs.render(), (
        "run: python -m ftstudio.web.lifecyclejs"
    )


def test_the_page_keeps_no_copy_of_the_lifecycle_only_a_glyph_and_a_colour_a_status() -> None:
    status_js = (STATIC / "status.js").read_text(encoding="utf-8")
    glyphs = status_js[status_js.index("const GLYPHS") :]
    assert set(re.findall(r"^\s+(\w+): \"", glyphs[: glyphs.index("};")], re.M)) == {s.value for s in S}
    css = (STATIC / "app.css").read_text(encoding="utf-8")
    assert {s.value for s in S} <= set(re.findall(r"\.st-(\w+)", css))
    for path in STATIC.glob("*.js"):
        if path.name != "lifecycle.js":
            text = path.read_text(encoding="utf-8")
            # A table of statuses or actions (a "cancelled" key, a list of action names) belongs in lifecycle.js.
            assert not re.search(r"\b(?:cancelled|interrupted|preparing)\s*:\s*\{", text), path.name
            assert not re.search(r"\[\s*\"(?:cancel|delete|pause|resume|retry)\",", text), path.name
            assert not re.search(rf"\[\s*\"(?:{'|'.join(S)})\"", text), path.name


# -- after an interruption ---------------------------------------------------------

RETRY_HINT = "see training.log, then `ftstudio retry TASK` continues it from its newest checkpoint"


@pytest.mark.parametrize(
    ("name", "r", "dst", "reason"),
    [
        (
            "first interruption, a checkpoint",
            Recovery(attempt=1, checkpoint_step=20, end_steps=(27,)),
            S.QUEUED,
            "resuming by itself (restart 1 of 3); attempt 2 continues from step 20",
        ),
        (
            "before the first checkpoint",
            Recovery(attempt=1, end_steps=(4,)),
            S.QUEUED,
            "resuming by itself (restart 1 of 3); attempt 2 starts from the beginning",
        ),
        (
            "progress between two interruptions",
            Recovery(restarts=1, attempt=2, checkpoint_step=40, end_steps=(27, 45)),
            S.QUEUED,
            "resuming by itself (restart 2 of 3); attempt 3 continues from step 40",
        ),
        (
            "restarts used up",
            Recovery(restarts=3, attempt=4, checkpoint_step=80, end_steps=(27, 45, 70, 90)),
            S.FAILED,
            f"interrupted again; the 3 automatic restarts (resume.max_restarts) are used up; {RETRY_HINT}",
        ),
        (
            "no restarts allowed",
            Recovery(max_restarts=0, end_steps=(5,)),
            S.FAILED,
            f"interrupted again; the 0 automatic restarts (resume.max_restarts) are used up; {RETRY_HINT}",
        ),
        (
            "the same step twice in a row",
            Recovery(restarts=1, attempt=2, checkpoint_step=20, end_steps=(27, 27)),
            S.FAILED,
            f"interrupted twice in a row at step 27 with no progress between; {RETRY_HINT}",
        ),
        (
            "twice before any step",
            Recovery(restarts=1, attempt=2, end_steps=(0, 0)),
            S.FAILED,
            f"interrupted twice in a row at the start with no progress between; {RETRY_HINT}",
        ),
        ("resume.auto off", Recovery(auto=False, end_steps=(27,)), None, ""),
    ],
)
def test_recover(name: str, r: Recovery, dst: S | None, reason: str) -> None:
    move = lifecycle.recover(S.INTERRUPTED, r)
    if dst is None:
        assert move is None, name
        return
    assert move is not None and (move.src, move.dst, move.reason) == (S.INTERRUPTED, dst, reason), name
    if dst == S.QUEUED:
        assert move.fields["attempt"] == r.attempt + 1 and move.fields["restarts"] == r.restarts + 1
        assert move.fields["error"] is None
    for status in S:
        if status != S.INTERRUPTED:
            assert lifecycle.recover(status, r) is None  # only an interrupted task is recovered


MACHINE = "resuming by itself after an interruption by the machine (not counted against resume.max_restarts)"


@pytest.mark.parametrize(
    ("name", "r", "reason"),
    [
        ("a reboot, restarts used up", Recovery(cause=Cause.MACHINE, restarts=3, attempt=4), f"{MACHINE}; attempt 5 starts from the beginning"),
        ("no restarts allowed", Recovery(cause=Cause.MACHINE, max_restarts=0, checkpoint_step=10), f"{MACHINE}; attempt 2 continues from step 10"),
        ("the same step as the run's last failure", Recovery(cause=Cause.MACHINE, restarts=1, attempt=2, end_steps=(27, 27)), f"{MACHINE}; attempt 3 starts from the beginning"),
        ("one stalled attempt", Recovery(cause=Cause.MACHINE, stalled=1, since_end_s=0.0), f"{MACHINE}; attempt 2 starts from the beginning"),
        ("three stalled, waited", Recovery(cause=Cause.MACHINE, stalled=3, since_end_s=31.0), f"{MACHINE}; waited 30s, as the machine stopped 3 attempts in a row before they progressed; attempt 2 starts from the beginning"),
    ],
)  # fmt: skip
def test_what_the_machine_does_is_resumed_and_not_counted(name: str, r: Recovery, reason: str) -> None:
    move = lifecycle.recover(S.INTERRUPTED, r)
    assert move is not None and (move.dst, move.reason) == (S.QUEUED, reason), name
    assert "restarts" not in move.fields, name  # the run's budget is untouched


@pytest.mark.parametrize(("stalled", "wait"), [(0, 0), (1, 0), (2, 15), (3, 30), (6, 300), (7, 600), (50, 600)])
def test_attempts_the_machine_keeps_stopping_wait_longer_and_never_fail(stalled: int, wait: float) -> None:
    assert lifecycle.machine_wait_s(stalled) == wait
    if wait:
        early = Recovery(cause=Cause.MACHINE, stalled=stalled, since_end_s=wait - 1)
        assert lifecycle.recover(S.INTERRUPTED, early) is None  # waits: neither requeued nor failed
        unknown = Recovery(cause=Cause.MACHINE, stalled=stalled, since_end_s=None)
        assert lifecycle.recover(S.INTERRUPTED, unknown) is None
    late = lifecycle.recover(S.INTERRUPTED, Recovery(cause=Cause.MACHINE, stalled=stalled, since_end_s=wait))
    assert late is not None and late.dst == S.QUEUED


@pytest.mark.parametrize(
    ("record", "cause"),
    [
        ({"outcome": "interrupted", "reason": "stopped by SIGTERM from outside the studio", "cause": "machine"}, Cause.MACHINE),
        ({"outcome": "interrupted", "reason": "the training process was killed by SIGKILL", "cause": "run"}, Cause.RUN),
        # Runners from before causes were written: told by their wording.
        ({"outcome": "interrupted", "reason": "the training process was killed by SIGKILL (often ...)"}, Cause.RUN),
        ({"outcome": "interrupted", "reason": "training process rank 1 of 2 was killed by a signal"}, Cause.RUN),
        ({"outcome": "interrupted", "reason": "stopped by SIGTERM from outside the studio at step 3"}, Cause.MACHINE),
        ({"outcome": "cancelled", "reason": "stopped on request (SIGTERM)"}, Cause.MACHINE),
        ({"outcome": "interrupted", "reason": "x", "cause": "the moon"}, Cause.MACHINE),
    ],
)  # fmt: skip
def test_an_exit_records_cause_decides_what_the_interruption_counts_as(record: dict[str, str], cause: Cause) -> None:
    parsed = ExitRecord.from_json(record)
    assert parsed.cause == cause
    move = lifecycle.decide(lifecycle.Facts(S.TRAINING, exit=parsed))
    assert move is not None and move.dst == S.INTERRUPTED and move.cause == cause


def test_a_runner_gone_without_a_record_is_the_machines_doing() -> None:
    for liveness in (Liveness.DEAD, Liveness.REBOOTED, Liveness.REUSED):
        move = lifecycle.decide(lifecycle.Facts(S.TRAINING, liveness=liveness, step=3))
        assert move is not None and (move.dst, move.cause) == (S.INTERRUPTED, Cause.MACHINE), liveness


def test_a_retry_by_hand_counts_restarts_from_none() -> None:
    move = answer(S.FAILED, Action.RETRY, Ask(attempt=4)).move
    assert move is not None and move.fields["restarts"] == 0


# -- a cluster scheduler's word (Slurm) -------------------------------------------------------------

_CANCELLED = SchedulerWord(True, cancelled=True, reason="the Slurm job 17 was cancelled outside the studio (scancel)")
_TIMEOUT = SchedulerWord(True, reason="the Slurm job 17 reached its time limit (01:00:00)")
_RUNNING = SchedulerWord(False)
_REQUEUED = SchedulerWord(False, requeued=True, reason="Slurm requeued the Slurm job 17")
_STOPPED = ExitRecord(
    "interrupted", "stopped by SIGTERM from outside the studio at step 40/300 after saving checkpoint-40"
)


@pytest.mark.parametrize(
    ("record", "liveness", "word", "dst", "words"),
    [
        # A SIGTERM from outside: a cancel in Slurm and a preemption look alike until Slurm's final state.
        (_STOPPED, Liveness.ALIVE, _RUNNING, None, ""),
        # ... unless the scheduler has already requeued the job: the next attempt runs in it.
        (
            _STOPPED,
            Liveness.ALIVE,
            _REQUEUED,
            "interrupted",
            "Slurm requeued the Slurm job 17; stopped by SIGTERM",
        ),
        (
            _STOPPED,
            Liveness.DEAD,
            _CANCELLED,
            "cancelled",
            "cancelled outside the studio (scancel) at step 40/300; `ftstudio retry`",
        ),
        (_STOPPED, Liveness.DEAD, _TIMEOUT, "interrupted", "time limit (01:00:00); stopped by SIGTERM from"),
        # The job gone without a record: Slurm's state says why.
        (None, Liveness.DEAD, _CANCELLED, "cancelled", "the Slurm job 17 was cancelled outside the studio"),
        (
            None,
            Liveness.DEAD,
            _TIMEOUT,
            "interrupted",
            "the Slurm job 17 reached its time limit (01:00:00) at step 40/300",
        ),
        (None, Liveness.UNKNOWN, _RUNNING, None, ""),
        # What the runner recorded otherwise stands, whatever Slurm says.
        (ExitRecord("completed", "done"), Liveness.ALIVE, _RUNNING, "completed", "done"),
        (ExitRecord("failed", "bad data"), Liveness.DEAD, _CANCELLED, "failed", "bad data"),
    ],
)
def test_a_schedulers_word_tells_a_cancel_in_it_from_an_interruption(record, liveness, word, dst, words):
    facts = lifecycle.Facts(
        S.TRAINING, liveness=liveness, exit=record, step=40, total_steps=300, attempt=1, scheduler=word
    )
    move = lifecycle.decide(facts)
    if dst is None:
        assert move is None
        return
    assert move is not None and move.dst == dst, move
    assert words in move.reason, move.reason


def test_a_persons_cancel_stays_a_cancel_whatever_the_scheduler_says():
    facts = lifecycle.Facts(S.TRAINING, exit=_STOPPED, cancel_requested=True, scheduler=_RUNNING)
    assert lifecycle.decide(facts).dst == "cancelled"
