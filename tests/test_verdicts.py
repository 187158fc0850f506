"""The supervisor's verdicts, through the real service, store (SQLite) and supervisor, with the in-memory
executor and a manual clock: each scenario of DESIGN.md's reconcile table in milliseconds.

The real LocalExecutor plays the same scenarios with real processes in test_supervisor.py.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
from support import wait_for

from ftstudio.execution.facts import Outcome
from ftstudio.execution.inmemory import InMemoryExecutor, InMemoryRunner, ManualClock
from ftstudio.home import Home
from ftstudio.studio import lifecycle
from ftstudio.studio.lifecycle import (
    HEARTBEAT_LOST_S,
    HEARTBEAT_RECHECK_S,
    HEARTBEAT_STALLED_S,
    LAUNCH_GRACE_S,
    NEVER_STARTED,
    UNEXPECTED,
)
from ftstudio.studio.service import CANCEL_GRACE_S, Service
from ftstudio.studio.store import Task


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def executor(clock: ManualClock) -> InMemoryExecutor:
    return InMemoryExecutor(clock)


@pytest.fixture
def service(tmp_path: Path, executor: InMemoryExecutor, clock: ManualClock) -> Service:
    service = Service(Home(tmp_path / "home"), executor=executor, in_server=True)
    service.supervisor.clock = clock
    return service


def training(
    service: Service, executor: InMemoryExecutor, *, step: int = 4, total: int = 10
) -> tuple[Task, InMemoryRunner]:
    """A submitted task whose runner has reported `step` of `total` (so: training)."""
    task = service.submit({"preset": "cpu-demo"}, "in memory")
    runner = executor.runner(task.id)
    for s in range(1, step + 1):
        runner.progress(s, total)
    sync(service, task)
    assert status(service, task) == "training"
    return service.store.get(task.id), runner


def sync(service: Service, task: Task) -> None:
    service.supervisor.sync(service.store.get(task.id))


def status(service: Service, task: Task) -> str:
    return service.store.get(task.id).status


MACHINE_RESUMED = (
    "resuming by itself after an interruption by the machine (not counted against resume.max_restarts);"
    " attempt 2 starts from the beginning"
)
RUN_RESUMED = "resuming by itself (restart 1 of 3); attempt 2 starts from the beginning"


def assert_resumed(service: Service, task: Task, reason: str, cause: str = "machine") -> None:
    """Interrupted with `reason`, then back through the queue as attempt 2 (the in-memory executor starts it);
    counted against resume.max_restarts only when the run itself (`cause`), not the machine, stopped it."""
    got = service.store.get(task.id)
    assert got.attempt == 2 and got.status == "preparing" and got.error is None
    assert got.restarts == (1 if cause == "run" else 0)
    moves = [(h["dst"], h["reason"]) for h in service.store.history(task.id)]
    assert moves[-3:] == [
        ("interrupted", reason),
        ("queued", RUN_RESUMED if cause == "run" else MACHINE_RESUMED),
        ("preparing", "launching"),
    ]
    first = [a for a in service.store.attempts(task.id) if a["attempt"] == 1]
    if first:  # (a task claimed by hand in a test has no record of attempt 1)
        assert first[0]["end_reason"] == reason and first[0]["ended_at"] is not None
        assert first[0]["end_cause"] == cause


# -- exit records ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("outcome", "reason", "dst"),
    [
        (Outcome.COMPLETED, "training finished and the adapter was saved", "completed"),
        (Outcome.FAILED, "CUDA out of memory", "failed"),
    ],
)
def test_an_exit_record_decides_the_end(
    service: Service, executor: InMemoryExecutor, outcome: Outcome, reason: str, dst: str
):
    task, runner = training(service, executor)
    runner.progress(5, 10)  # its last steps, written before the record: stored, not lost
    runner.finish(outcome, reason)
    sync(service, task)
    got = service.store.get(task.id)
    assert (got.status, got.step) == (dst, 5)
    assert service.store.history(task.id)[-1]["reason"] == reason
    assert got.error == (reason if dst == "failed" else None)


def test_pause_on_request_ends_paused_from_the_runners_record(service: Service, executor: InMemoryExecutor):
    task, runner = training(service, executor)
    assert service.pause(task.id).phase == "pausing"
    assert runner.signals == [signal.SIGUSR1]
    sync(service, task)
    assert status(service, task) == "paused"


def test_cancel_of_a_runner_that_stops_on_sigterm(service: Service, executor: InMemoryExecutor, clock: ManualClock):
    task, runner = training(service, executor)
    before = clock()
    got = service.cancel(task.id, wait=True)
    assert got.status == "cancelled"
    assert runner.signals == [signal.SIGTERM]
    assert executor.stops == [(task.id, CANCEL_GRACE_S)]
    assert clock() == before  # it stopped at once: no grace waited


def test_cancel_escalates_to_sigkill_when_sigterm_is_ignored(
    service: Service, executor: InMemoryExecutor, clock: ManualClock
):
    task, runner = training(service, executor)
    runner.ignore_sigterm()
    before = clock()
    got = service.cancel(task.id, grace=7.0, wait=True)
    assert got.status == "cancelled"
    assert runner.signals == [signal.SIGTERM, signal.SIGKILL]
    assert clock() - before == 7.0  # the whole grace, then the kill
    assert not task.dir.exit.exists()  # killed, so no record: the request decided `cancelled`
    assert service.store.history(task.id)[-1]["reason"] == "cancelled on request"


def test_a_hung_runner_is_killed_on_cancel(service: Service, executor: InMemoryExecutor):
    task, runner = training(service, executor)
    runner.hang()
    assert service.cancel(task.id, grace=1.0, wait=True).status == "cancelled"
    assert runner.signals == [signal.SIGTERM, signal.SIGKILL] and not runner.alive


# -- process identity ------------------------------------------------------------


def test_a_sigterm_nobody_asked_for_is_an_interruption_resumed(service: Service, executor: InMemoryExecutor):
    task, runner = training(service, executor)
    runner.finish(Outcome.INTERRUPTED, "stopped by SIGTERM from outside the studio at step 4/10")
    sync(service, task)
    assert_resumed(service, task, "stopped by SIGTERM from outside the studio at step 4/10")


def test_dead_without_a_record_is_interrupted_with_the_reason_and_resumed(service: Service, executor: InMemoryExecutor):
    task, runner = training(service, executor)
    runner.die()
    sync(service, task)
    assert_resumed(service, task, f"{UNEXPECTED} at step 4/10")


def test_restarts_run_out_and_the_same_step_twice_fails(tmp_path: Path, executor: InMemoryExecutor, clock: ManualClock):
    service = Service(Home(tmp_path / "home"), executor=executor, in_server=True)
    service.supervisor.clock = clock
    task = service.submit({"preset": "cpu-demo", "resume": {"max_restarts": 1}}, "in memory")
    executor.runner(task.id).progress(3, 10)
    sync(service, task)
    executor.runner(task.id).trainer_killed()
    sync(service, task)
    assert service.store.get(task.id).attempt == 2  # restart 1 of 1
    executor.runner(task.id).progress(6, 10)
    sync(service, task)
    executor.runner(task.id).trainer_killed()
    sync(service, task)
    got = service.store.get(task.id)
    assert got.status == "failed" and got.error.startswith("interrupted again; the 1 automatic restart")
    # With restarts left but no progress between two interruptions, it fails too: the run, not the machine.
    retried = service.retry(task.id)
    assert retried.attempt == 3 and retried.restarts == 0
    executor.runner(task.id).trainer_killed()  # at step 6 again, before a new step
    sync(service, task)
    got = service.store.get(task.id)
    assert got.status == "failed" and got.error.startswith("interrupted twice in a row at step 6")


def test_what_the_machine_does_never_fails_a_run(tmp_path: Path, executor: InMemoryExecutor, clock: ManualClock):
    """Ten machine faults in a row (runners gone: a reboot, a kill from outside; a shutdown's SIGTERM), most
    before the attempt made a step: never failed, never counted; it waits longer while attempts stall."""
    service = Service(Home(tmp_path / "home"), executor=executor, in_server=True)
    service.supervisor.clock = clock
    task = service.submit({"preset": "cpu-demo", "resume": {"max_restarts": 1}}, "in memory")
    executor.runner(task.id).progress(3, 10)
    sync(service, task)
    waited = []
    for fault in range(10):
        runner = executor.runner(task.id)
        if fault % 3 == 2:
            runner.finish(Outcome.INTERRUPTED, "stopped by SIGTERM from outside the studio at step 3/10")
        else:
            runner.die()
        sync(service, task)
        # The store stamps ended_at with the real clock: the manual one starts from it at each fault.
        clock.now = t0 = time.time()
        while service.store.get(task.id).status == "interrupted":
            got = service.store.get(task.id)
            assert got.attempt == fault + 1 and got.error, got
            # The page and `show` say when the next attempt starts while the machine is waited out.
            resumes = service.task_json(got)["resumes"]
            assert resumes is not None and resumes["stalled"] >= 2 and resumes["at"] > clock() - 5, resumes
            clock.advance(5)
            service.supervisor.recover_all()
            service.schedule()
        waited.append(clock() - t0)
        got = service.store.get(task.id)
        assert got.status == "preparing" and got.attempt == fault + 2 and got.restarts == 0, got
    assert waited[0] == 0 and waited == sorted(waited) and waited[-1] >= 300, waited
    causes = {a["end_cause"] for a in service.store.attempts(task.id) if a["ended_at"] is not None}
    assert causes == {"machine"}
    # One step of progress and the wait is gone again; a failure of the run itself still counts.
    executor.runner(task.id).progress(4, 10)
    sync(service, task)
    executor.runner(task.id).die()
    sync(service, task)
    assert service.store.get(task.id).attempt == 12
    executor.runner(task.id).trainer_killed()
    sync(service, task)
    got = service.store.get(task.id)
    assert (got.status, got.attempt, got.restarts) == ("preparing", 13, 1), got


def test_resume_auto_off_waits_for_a_person(service: Service, executor: InMemoryExecutor):
    task = service.submit({"preset": "cpu-demo", "resume": {"auto": False}}, "in memory")
    executor.runner(task.id).progress(2, 10)
    sync(service, task)
    executor.runner(task.id).die()
    sync(service, task)
    service.supervisor.recover_all()
    got = service.store.get(task.id)
    assert (got.status, got.attempt) == ("interrupted", 1)
    assert service.task_json(got)["actions"] == ["retry", "cancel", "delete"]


def test_claimed_but_never_launched_is_resumed_after_the_grace(service: Service, clock: ManualClock):
    # The studio stopped between the claim and the executor's submit: a claimed task, no process.
    task = service.store.create_task(
        name="orphan", model="builtin:tiny", dataset="builtin:sample", config={}, tasks_root=service.home.tasks
    )
    service.store.apply(task.id, lifecycle.claim())
    clock.advance(LAUNCH_GRACE_S - 1)
    sync(service, task)
    assert status(service, task) == "preparing"
    clock.advance(2)
    sync(service, task)
    assert_resumed(service, task, NEVER_STARTED)


def test_after_a_reboot_the_task_is_not_adopted(service: Service, executor: InMemoryExecutor, clock: ManualClock):
    task, _ = training(service, executor)
    executor.reboot()
    clock.advance(120)
    verdicts = service.supervisor.reconcile_all()  # the studio starts again
    assert [(v.task_id, v.status) for v in verdicts] == [(task.id, "interrupted")]
    assert_resumed(service, task, f"{UNEXPECTED}: the machine restarted at step 4/10")


# -- the heartbeat -----------------------------------------------------------------


def test_alive_with_a_stale_heartbeat_is_shown_stalled_never_moved(
    service: Service, executor: InMemoryExecutor, clock: ManualClock
):
    task, runner = training(service, executor)
    assert service.task_json(service.get(task.id))["stalled"] is False
    runner.stop_beating()  # a full disk: training goes on, beats do not
    clock.advance(HEARTBEAT_STALLED_S + 1)
    sync(service, task)
    view = service.task_json(service.get(task.id))
    assert (view["status"], view["stalled"], view["heartbeat_age_s"]) == ("training", True, HEARTBEAT_STALLED_S + 1)
    for _ in range(3):  # an hour, looked at twice an hour apart: still alive, still just shown
        clock.advance(HEARTBEAT_LOST_S * 6)
        sync(service, task)
    assert status(service, task) == "training"
    runner.beating = True
    clock.advance(2.0)
    assert service.task_json(service.get(task.id))["stalled"] is False


def test_unknown_identity_with_a_fresh_heartbeat_is_left_alone(
    service: Service, executor: InMemoryExecutor, clock: ManualClock
):
    task, runner = training(service, executor)
    runner.hide()
    for _ in range(40):  # 400 s of looks, past the lost threshold, the runner beating between them
        clock.advance(10.0)
        sync(service, task)
    assert status(service, task) == "training"
    assert runner.alive and runner.signals == []


def test_unknown_identity_with_a_lost_heartbeat_is_the_dead_move(
    service: Service, executor: InMemoryExecutor, clock: ManualClock
):
    task, runner = training(service, executor)
    runner.hide()
    runner.stop_beating()
    clock.advance(HEARTBEAT_LOST_S + 1)
    sync(service, task)
    assert status(service, task) == "training"  # the first look that finds it lost only notes it
    clock.advance(HEARTBEAT_RECHECK_S)
    sync(service, task)
    assert_resumed(
        service, task, f"{UNEXPECTED}: no heartbeat for 5 minutes (its process cannot be checked) at step 4/10"
    )
    assert runner.signals == [signal.SIGKILL]  # whatever it was doing, it must not go on writing


def test_unknown_identity_after_the_laptop_slept_waits_for_the_next_beat(
    service: Service, executor: InMemoryExecutor, clock: ManualClock
):
    task, runner = training(service, executor)
    runner.hide()
    runner.stop_beating()  # everything sleeps an hour...
    clock.advance(3600)
    sync(service, task)  # ...and the studio, waking, looks before the runner beats
    runner.beating = True
    clock.advance(2.0)
    sync(service, task)
    clock.advance(HEARTBEAT_RECHECK_S)
    sync(service, task)
    assert status(service, task) == "training"


def test_unknown_identity_lost_while_cancel_was_asked_ends_cancelled(
    service: Service, executor: InMemoryExecutor, clock: ManualClock
):
    task, runner = training(service, executor)
    runner.hide()  # so the studio's SIGTERM cannot be sent: it cannot tell the process is its own
    runner.stop_beating()
    service.cancel(task.id, grace=1.0, wait=True)
    assert status(service, task) == "training"
    for _ in range(2):
        clock.advance(HEARTBEAT_LOST_S)
        sync(service, task)
    got = service.store.get(task.id)
    assert (got.status, service.store.history(task.id)[-1]["reason"]) == ("cancelled", "cancelled on request")
    assert runner.signals == [signal.SIGKILL]  # no SIGTERM to a process it cannot check; the kill after the grace


def test_a_stopping_studio_requeues_but_launches_nothing(service: Service, executor: InMemoryExecutor):
    """In a machine's shutdown the runners get the studio's SIGTERM too: an attempt launched while the
    studio winds down would only be lost, so the interrupted task waits in the queue for the next studio."""
    task, runner = training(service, executor)
    service.supervisor.stopping.set()
    runner.finish(Outcome.INTERRUPTED, "stopped by SIGTERM from outside the studio at step 4/10")
    sync(service, task)
    got = service.store.get(task.id)
    assert (got.status, got.attempt) == ("queued", 2) and executor.runner(task.id) is runner


def test_a_cancel_that_comes_while_the_runner_is_being_launched_still_stops_it(
    service: Service, executor: InMemoryExecutor
):
    """The launcher claims the task (preparing), clears the last attempt's request files, starts the runner,
    then records its pid. A cancel in between found no pid to signal and its request file deleted, and the
    run trained to the end ("completed"). Now the cancel waits for the pid and stops the runner it names."""
    cancels: list[Task] = []

    def cancel_mid_launch(runner: InMemoryRunner) -> None:  # inside submit: claimed, pid not yet recorded
        assert service.store.get(runner.task_id).pid is None
        cancels.append(service.cancel(runner.task_id))

    executor.on_submit = cancel_mid_launch
    task = service.submit({"preset": "cpu-demo"}, "in memory")
    runner = executor.runner(task.id)
    assert cancels and cancels[0].phase == "cancelling"
    got = wait_for(lambda: service.store.get(task.id).status == "cancelled" and service.store.get(task.id), timeout=10)
    assert runner.signals[:1] == [signal.SIGTERM] and not runner.alive, runner.signals
    assert got.error is None or "cancel" in got.error
