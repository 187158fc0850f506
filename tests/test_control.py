"""Pause, resume, retry and extend: their logic over the in-memory executor (the fast tier), and with real
processes through a real studio (a scripted trainer under the real runner; the suspend checkpoint of the
real trainer has its own tests)."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from support import Studio, cli_json, in_memory, paced, run_cli, wait_for

from ftstudio.errors import Conflict, ValidationError
from ftstudio.execution.procs import tagged
from ftstudio.home import read_json


def submit(studio: Studio, name: str, **config: Any) -> str:
    r = studio.http.post("/api/tasks", json={"name": name, "config": {"preset": "cpu-demo", **config}})
    assert r.status_code == 201, r.text
    return r.json()["id"]


def post(studio: Studio, path: str, **kw: Any) -> dict[str, Any]:
    r = studio.http.post(path, **kw)
    assert r.status_code == 200, r.text
    return r.json()


def trainer_pid(home: Path, task_id: str) -> int:
    return read_json(home / "tasks" / task_id / "launch.json")["trainer_pid"]


@pytest.mark.timeout(300)
def test_freeze_holds_the_same_process_still_through_a_studio_restart(home: Path, studio_factory: Any) -> None:
    studio = studio_factory(scripted=True).start()
    tid = submit(studio, "scripted steps=60 delay=0.1")
    waiting = submit(studio, "scripted steps=3 delay=0.05")
    wait_for(lambda: studio.task(tid)["step"] >= 3, what="training to start")
    pid = trainer_pid(home, tid)
    frozen = post(studio, f"/api/tasks/{tid}/pause", params={"freeze": "true"})
    assert frozen["status"] == "paused" and frozen["phase"] == "frozen" and frozen["frozen"] is True
    assert frozen["actions"] == ["resume", "cancel"] and frozen["resources"] == ["slot:0"]
    assert psutil.Process(pid).status() == psutil.STATUS_STOPPED
    step = studio.task(tid)["step"]
    time.sleep(1.5)
    assert studio.task(tid)["step"] == step  # frozen: not one step more
    assert studio.task(waiting)["status"] == "queued"  # its slot is still held: the memory is in use

    studio.kill(signal.SIGKILL)
    again = studio_factory(scripted=True, port=studio.port).start()
    still = again.task(tid)
    assert still["status"] == "paused" and still["frozen"] is True and still["resources"] == ["slot:0"]
    assert psutil.Process(pid).status() == psutil.STATUS_STOPPED

    resumed = post(again, f"/api/tasks/{tid}/resume")
    assert resumed["status"] == "training" and resumed["frozen"] is False and resumed["attempt"] == 1
    wait_for(lambda: again.task(tid)["step"] > step, what="the same process to go on")
    assert trainer_pid(home, tid) == pid  # the same process, not a new attempt
    assert again.wait_status(tid, "completed", "failed")["status"] == "completed"
    assert again.wait_status(waiting, "completed", "failed")["status"] == "completed"
    history = again.http.get(f"/api/tasks/{tid}/history").json()
    assert [t["dst"] for t in history["transitions"]] == [
        "queued",
        "preparing",
        "training",
        "paused",
        "training",
        "completed",
    ]


@pytest.mark.timeout(300)
def test_a_frozen_task_is_cancelled_with_every_process_and_frees_its_slot(home: Path, studio_factory: Any) -> None:
    studio = studio_factory(scripted=True).start()
    tid = submit(studio, "scripted steps=200 delay=0.1 child=1")
    nxt = submit(studio, "scripted steps=3 delay=0.05")
    wait_for(lambda: studio.task(tid)["step"] >= 2, what="training to start")
    post(studio, f"/api/tasks/{tid}/pause", params={"freeze": "true"})
    assert studio.http.delete(f"/api/tasks/{tid}").status_code == 409  # its processes still hold memory
    cancelled = post(studio, f"/api/tasks/{tid}/cancel")
    assert cancelled["status"] == "cancelled" and cancelled["resources"] == []
    assert tagged(tid) == []
    assert studio.wait_status(nxt, "completed", "failed")["status"] == "completed"


def test_a_queued_task_can_be_held_and_released(home: Path) -> None:
    service = in_memory(home)
    first, held, third = (service.submit({"preset": "cpu-demo"}, name).id for name in ("first", "held", "third"))
    paused = service.task_json(service.pause(held))
    assert (
        paused["status"] == "paused"
        and paused["phase"] == "held"
        and paused["actions"] == ["resume", "cancel", "delete"]
    )
    assert service.task_json(service.get(third))["queue"]["position"] == 1  # the held task gave up its place
    assert service.cancel(first, wait=True).status == "cancelled"
    assert service.get(third).status == "preparing"  # the free slot went to the next one
    service.executor.runner(third).complete(steps=3)
    assert service.get(third).status == "completed"
    assert service.get(held).status == "paused"  # held: the free slot did not start it
    back = service.resume(held)
    assert back.attempt == 1 and back.status == "preparing"  # it never ran: the same first attempt
    service.executor.runner(held).complete(steps=3)
    assert service.get(held).status == "completed"


def test_a_cancel_that_loses_the_race_to_the_tasks_launch_stops_the_launched_task(home: Path) -> None:
    """The queued task is claimed by the launcher between the cancel's read and its write (here: the slot the cancel
    of the task before it frees, as when a person cancels a queue from the top): the cancel asks again, with the
    task now preparing, and stops it. It was a 409 ("is preparing now, not queued"), and the task trained on."""
    service = in_memory(home)
    first = service.submit({"preset": "cpu-demo"}, "first").id
    queued = service.submit({"preset": "cpu-demo"}, "queued").id
    apply = service.store.apply

    def claimed_meanwhile(task_id: str, move: Any, **fields: Any) -> Any:
        if task_id == queued and move.dst == "cancelled" and service.store.get(queued).status == "queued":
            service.cancel(first, wait=True)  # its slot goes to `queued` at once
            assert service.store.get(queued).status == "preparing"
        return apply(task_id, move, **fields)

    service.store.apply = claimed_meanwhile  # type: ignore[method-assign]
    service.cancel(queued, wait=True)
    assert service.get(queued).status == "cancelled" and service.get(first).status == "cancelled"


def test_retry_and_extend_are_new_attempts_of_the_same_task(home: Path) -> None:
    """Through the service over the in-memory executor (the real command and runner:
    test_a_retry_from_the_cli_continues_from_the_newest_checkpoint)."""
    service = in_memory(home)
    runner = service.executor.runner
    tid = service.submit({"preset": "cpu-demo"}, "fails").id
    runner(tid).train(2, total_steps=3)
    runner(tid).fail("scripted failure with exit code 3", exit_code=3)
    assert service.get(tid).status == "failed"
    retried = service.retry(tid)
    assert (retried.attempt, retried.status) == (2, "preparing") and runner(tid).attempt == 2
    runner(tid).complete(steps=3)
    done = service.task_json(service.get(tid))
    assert done["status"] == "completed" and [a["attempt"] for a in done["attempts"]] == [1, 2]
    first, second = done["attempts"]
    assert first["end_reason"] == "scripted failure with exit code 3" and first["ended_at"] <= second["started_at"]

    oid = service.submit({"preset": "cpu-demo"}, "completes").id
    runner(oid).complete(steps=3)
    with pytest.raises(ValidationError, match="extend it with --epochs N instead"):
        service.extend(oid, steps=5)
    with pytest.raises(ValidationError, match="give either --epochs N or --steps N"):
        service.extend(oid)
    extended = service.extend(oid, epochs=2)
    assert extended.attempt == 2 and runner(oid).attempt == 2
    assert service.get(oid).config_dict["optim"]["epochs"] == 6.0  # cpu-demo's 4, and 2 more
    assert read_json(home / "tasks" / oid / "spec.json")["config"]["optim"]["epochs"] == 6.0
    with pytest.raises(Conflict, match="only a failed, cancelled or interrupted task can be retried"):
        service.retry(oid)
    reasons = [t["reason"] for t in service.history(oid)["transitions"]]
    assert any("extended on request; attempt 2" in (r or "") for r in reasons), reasons


@pytest.mark.process
@pytest.mark.timeout(300)
def test_a_retry_from_the_cli_continues_from_the_newest_checkpoint(home: Path) -> None:
    """The real command and runner: a failed task retried is attempt 2, and its runner starts the trainer with
    `--resume auto` (the logic of retry and extend: test_retry_and_extend_are_new_attempts_of_the_same_task)."""
    failed = run_cli(
        home, "submit", "--preset", "cpu-demo", "--name", "scripted steps=3 exit=3", "--wait", scripted=True
    )
    assert failed.returncode == 1
    tid = failed.stdout.strip()
    retried = run_cli(home, "retry", tid, scripted=True)
    assert retried.returncode == 0 and f"task {tid}" in retried.stdout and "(attempt 2)" in retried.stdout
    done = wait_for(
        lambda: (t := cli_json(home, "show", tid, scripted=True))["status"] in ("failed", "completed") and t
    )
    assert done["attempt"] == 2 and [a["attempt"] for a in done["attempts"]] == [1, 2]
    # Runner arguments: a later attempt continues from the newest complete checkpoint.
    assert read_json(home / "tasks" / tid / "launch.json")["argv"][-2:] == ["--resume", "auto"]
    text = run_cli(home, "history", tid, scripted=True).stdout
    assert "attempt 1" in text and "attempt 2" in text


@pytest.mark.process
def test_the_task_says_which_mechanism_enforces_its_memory_limit(home: Path) -> None:
    r = run_cli(
        home, "submit", "--preset", "cpu-demo", "--name", "scripted steps=2", "--memory", "2G", "--wait", scripted=True
    )
    assert r.returncode == 0, r.stderr
    shown = cli_json(home, "show", r.stdout.strip(), scripted=True)
    assert shown["memory_limit"]["bytes"] == 2 << 30
    assert shown["memory_limit"]["mechanism"] in ("cgroup", "systemd", "watchdog")
    assert cli_json(home, "show", r.stdout.strip(), scripted=True)["config"]["resources"]["memory"] == "2G"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_suspend_frees_the_slot_and_resume_continues_the_same_run(home: Path, studio_factory: Any) -> None:
    """The real trainer: pause checkpoints at the next step and exits; the next queued task gets the slot;
    resume is attempt 2 from that checkpoint, and the history has every step exactly once."""
    # Paced (0.2 s a step at least): a fast machine trains 40 steps of builtin:tiny before the pause arrives.
    studio = studio_factory(**paced()).start()
    # Cheap where it does not matter here (no validation, short rows): the pause's checkpoint is the point.
    cheap = {"data": {"validation": "0", "max_length": 64}, "logging": {"eval_on_start": False}}
    steps = {"max_steps": 40, "seed": 7, "batch_size": 4}
    tid = submit(studio, "paused run", optim=steps, checkpoint={"every_steps": 100}, **cheap)
    other = submit(studio, "short run", optim={"max_steps": 3, "batch_size": 4}, **cheap)
    wait_for(lambda: studio.task(tid)["step"] >= 4, timeout=180, what="training to start")
    pausing = post(studio, f"/api/tasks/{tid}/pause")
    assert pausing["phase"] == "pausing" and pausing["status"] == "training"
    paused = studio.wait_status(tid, "paused", "failed", timeout=120)
    assert paused["status"] == "paused" and paused["phase"] == "paused", paused
    assert paused["resources"] == [] and tagged(tid) == []  # every process gone, its slot free
    at = paused["step"]
    assert (home / "tasks" / tid / "checkpoints" / f"checkpoint-{at}").is_dir()
    assert paused["actions"] == ["resume", "cancel", "delete"]
    assert studio.wait_status(other, "completed", "failed", timeout=180)["status"] == "completed"

    post(studio, f"/api/tasks/{tid}/resume")
    done = studio.wait_status(tid, "completed", "failed", timeout=300)
    assert done["status"] == "completed" and done["step"] == 40 and done["attempt"] == 2
    first, second = done["attempts"]
    assert first["end_reason"].startswith(f"paused at step {at}/40") and second["resumed_from_step"] == at
    progress = [
        e["step"] for e in studio.http.get(f"/api/tasks/{tid}/metrics").json()["events"] if e["kind"] == "progress"
    ]
    assert progress == list(range(1, 41))  # no step twice, none missing


@pytest.mark.slow
@pytest.mark.process
@pytest.mark.timeout(600)
def test_a_two_process_task_from_the_studio_is_cancelled_with_every_rank(home: Path) -> None:
    """--processes 2: torchrun under the runner (gloo on the CPU); cancel reaches the agent and both ranks."""
    r = run_cli(home, "submit", "--preset", "cpu-demo", "--processes", "2", "--max-steps", "400", "--json")
    assert r.returncode == 0, r.stderr
    tid = json.loads(r.stdout)["id"]
    wait_for(lambda: cli_json(home, "show", tid)["step"] >= 2, timeout=300, what="both ranks to train")
    launch = read_json(home / "tasks" / tid / "launch.json")
    assert "torch.distributed.run" in launch["argv"] and "--nproc_per_node=2" in launch["argv"]
    assert len(tagged(tid)) >= 4  # runner, torchrun's agent, two ranks
    r = run_cli(home, "cancel", tid)
    assert r.returncode == 0 and f"task {tid} cancelled" in r.stdout
    assert tagged(tid) == []  # checked across the whole process table
    assert cli_json(home, "show", tid)["resources"] == []
