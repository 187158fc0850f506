"""Reconcile verdicts, with real runner processes and the scripted trainer.

Each scenario plays out with no studio server watching (the "studio is down"
case): the in-process service's `sync` is what the studio runs at start-up.
"""

import logging
import os
import subprocess
import sys
import time

import psutil
import pytest
from support import wait_for

from ftstudio.errors import Conflict
from ftstudio.execution.procs import Liveness, tagged
from ftstudio.home import Home
from ftstudio.studio.service import Service
from ftstudio.studio.supervisor import UNEXPECTED, Supervisor


@pytest.fixture
def service(scripted):
    return Service(Home(scripted))


def submit(service, name):
    return service.submit({"preset": "cpu-demo"}, name)


def interrupted(service, task):
    """The task after a crash the studio found: interrupted with a reason, then queued again as attempt 2
    (these supervisors launch nothing). Returns the reason."""
    got = service.store.get(task.id)
    assert (got.status, got.attempt) == ("queued", 2)
    reasons = [h["reason"] for h in service.store.history(task.id) if h["dst"] == "interrupted"]
    assert len(reasons) == 1
    return reasons[0]


def runner_and_trainer(task):
    return [p for p in tagged(task.id)]


def killed_while_training(service):
    """A long task, once its runner and trainer both run, with both SIGKILLed (nobody told the studio)."""
    task = submit(service, "scripted steps=1000 delay=0.05")
    wait_for(lambda: len(tagged(task.id)) >= 2, what="training")
    for p in tagged(task.id):
        p.kill()
    return task


def test_a_task_runs_to_completed_with_events_in_order(service):
    task = submit(service, "scripted steps=15 delay=0.01")
    assert task.status == "preparing" and task.pid
    wait_for(lambda: service.get(task.id).status == "completed", what="completion")
    evs = service.metrics(task.id)
    assert [e["seq"] for e in evs] == list(range(1, len(evs) + 1))
    steps = [e["step"] for e in evs if e["kind"] == "progress"]
    assert steps == list(range(1, 16))
    final = service.get(task.id)
    assert (final.step, final.total_steps, final.loss) == (15, 15, pytest.approx(2.0 / 15))
    assert [h["dst"] for h in service.store.history(task.id)] == ["queued", "preparing", "training", "completed"]


def test_killed_while_the_studio_is_down_means_interrupted_and_resumed(service):
    task = submit(service, "scripted steps=1000 delay=0.05")
    wait_for(lambda: service.store.get(task.id).status == "preparing" and len(tagged(task.id)) >= 2, what="training")
    for p in tagged(task.id):
        p.kill()
    psutil.wait_procs([psutil.Process(task.pid)], timeout=10) if psutil.pid_exists(task.pid) else None
    verdicts = Supervisor(service.store, service.home, service.executor).reconcile_all()
    assert interrupted(service, task).startswith(UNEXPECTED)
    assert [v.task_id for v in verdicts] == [task.id]


def test_finished_while_the_studio_is_down_means_completed(service):
    task = submit(service, "scripted steps=3 delay=0.01")
    wait_for(lambda: task.dir.exit.exists(), what="exit record")
    assert service.store.get(task.id).status == "preparing"  # nobody has looked yet
    Supervisor(service.store, service.home, service.executor).reconcile_all()
    assert service.store.get(task.id).status == "completed"
    assert service.store.get(task.id).step == 3


def test_a_reused_pid_is_not_adopted(service):
    task = killed_while_training(service)
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        # The record now names a live, unrelated process: a bare `kill -0` would adopt it.
        service.store.update(task.id, pid=stranger.pid)
        Supervisor(service.store, service.home, service.executor).reconcile_all()
        assert "belongs to another program" in interrupted(service, task)
        assert stranger.poll() is None  # and it was left alone
    finally:
        stranger.kill()
        stranger.wait()


def test_a_zombie_runner_without_exit_record_is_dead(service):
    task = killed_while_training(service)
    # The executor reaps its runners at once, so make a zombie of our own: a child nobody waits for.
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        zombie = psutil.Process(child.pid)
        wait_for(lambda: zombie.status() == psutil.STATUS_ZOMBIE, what="zombie")
        service.store.update(task.id, pid=child.pid, pid_start_time=zombie.create_time(), pgid=child.pid)
        Supervisor(service.store, service.home, service.executor).reconcile_all()
        reason = interrupted(service, task)
        assert reason.startswith(UNEXPECTED)
        assert "another program" not in reason  # dead, not reused: same pid, same start time
    finally:
        child.wait()


def test_a_runner_we_started_is_reaped_at_once_and_its_end_is_told(service):
    told = []
    service.executor.on_exit = lambda: told.append(time.monotonic())
    task = submit(service, "scripted steps=1000 delay=0.05")
    wait_for(lambda: len(tagged(task.id)) >= 2, what="training")
    runner = psutil.Process(task.pid)
    runner.kill()
    wait_for(lambda: told, what="the executor to tell of the end")
    assert not psutil.pid_exists(task.pid) or runner.status() != psutil.STATUS_ZOMBIE  # collected, no zombie
    for p in tagged(task.id):
        p.kill()


def test_after_a_reboot_the_task_is_not_adopted(service, monkeypatch):
    task = killed_while_training(service)  # a reboot kills everything...
    monkeypatch.setenv("FTSTUDIO_BOOT_ID", "the-next-boot")  # ...and comes back as another boot
    Supervisor(service.store, service.home, service.executor).reconcile_all()
    assert "the machine restarted" in interrupted(service, task)


class UnsureExecutor:
    name = "local"
    cluster = ""

    def poll(self, task, launch):
        return Liveness.UNKNOWN

    def kill_all(self, task_id):
        raise AssertionError("must not kill on doubt")


def test_when_it_cannot_tell_it_leaves_the_task_alone(service, caplog):
    task = submit(service, "scripted steps=1000 delay=0.05")
    sup = Supervisor(service.store, service.home, UnsureExecutor())
    with caplog.at_level(logging.WARNING, logger="ftstudio"):
        assert sup.reconcile_all() == []
        sup.reconcile_all()
    assert service.store.get(task.id).status in ("preparing", "training")
    assert sum("cannot tell" in r.message for r in caplog.records) == 1  # said once, not every tick


def test_cancel_kills_every_tagged_process_even_one_ignoring_sigterm(service):
    task = submit(service, "scripted steps=1000 delay=0.05 hang=1 child=1")
    wait_for(lambda: len(tagged(task.id)) >= 3, what="runner, trainer and grandchild")
    t0 = time.monotonic()
    got = service.cancel(task.id, grace=2.0)
    assert got.status == "cancelled"
    assert tagged(task.id) == []
    assert time.monotonic() - t0 < 15


def test_cancel_of_a_quick_stopper_uses_sigterm(service):
    task = submit(service, "scripted steps=1000 delay=0.05")
    wait_for(lambda: len(tagged(task.id)) >= 2, what="training")
    assert service.cancel(task.id).status == "cancelled"
    assert tagged(task.id) == []
    with pytest.raises(Conflict, match="already cancelled"):
        service.cancel(task.id)


def test_delete_is_refused_while_running_and_removes_everything_after(service):
    task = submit(service, "scripted steps=1000 delay=0.05")
    with pytest.raises(Conflict, match="cancel it before deleting"):
        service.delete(task.id)
    service.cancel(task.id)
    service.delete(task.id)
    assert not task.dir.path.exists()
    assert service.store.page_of_tasks()[1] == 0


def test_train_py_reproduces_the_task_without_user_strings(service):
    task = submit(service, 'scripted steps=2 delay=0.01 x"); import os #{__import__("os")}')
    text = task.dir.train_py.read_text()
    assert "scripted" not in text and "import os #" not in text
    wait_for(lambda: service.get(task.id).status == "completed", what="completion")
    os.environ.get("PATH")


def test_a_full_disk_at_submit_is_one_clear_error_and_leaves_nothing(service, monkeypatch):
    import errno

    from ftstudio.errors import StorageError
    from ftstudio.studio import service as service_mod

    def full(*_a, **_k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(service_mod, "write_json_atomic", full)
    with pytest.raises(StorageError, match=r"is full: nothing was saved for this request.*free some space"):
        submit(service, "scripted steps=1")
    assert service.store.page_of_tasks()[1] == 0
    assert list(service.home.tasks.iterdir()) == []


def test_a_running_task_shows_its_heartbeat(service):
    task = submit(service, "scripted steps=1000 delay=0.05")
    wait_for(lambda: task.dir.heartbeat.exists(), what="first heartbeat")
    view = service.task_json(service.get(task.id))
    assert 0 <= view["heartbeat_age_s"] < 5
    service.cancel(task.id)
    assert service.task_json(service.get(task.id))["heartbeat_age_s"] is None
