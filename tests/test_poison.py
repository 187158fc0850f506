"""One task's events can never stall the others: a trainer that writes a record the store cannot
hold (step 2**70) fails its own task, with a reason, and nothing else (real studio, scripted trainer)."""

from support import run_cli, wait_for

from ftstudio.execution.procs import tagged

WHY = "the training process wrote a progress record the studio cannot store"


def create(studio, name):
    r = studio.http.post("/api/tasks", json={"name": name, "config": {"preset": "cpu-demo"}})
    assert r.status_code == 201, r.text
    return r.json()["id"]


def keeps_stepping(studio, task_id, by=3):
    start = studio.task(task_id)["step"]
    wait_for(lambda: studio.task(task_id)["step"] >= start + by, timeout=30, what=f"task {task_id} to step on")
    assert studio.task(task_id)["status"] == "training"


def test_an_unstorable_event_fails_its_task_alone(studio_factory, home):
    studio = studio_factory(scripted=True).start("--slots", "2")  # both run at once
    good = create(studio, "scripted steps=3000 delay=0.05")
    bad = create(studio, "scripted steps=3000 delay=0.05 huge=3")

    failed = studio.wait_status(bad, "failed", timeout=60)
    assert failed["error"].startswith(WHY), failed["error"]
    assert "(line 5 of events.jsonl: step is out of range)" in failed["error"]  # status, train_begin, steps 1, 2, 3
    assert "; the task was stopped" in failed["error"] and "\n" not in failed["error"]
    wait_for(lambda: not tagged(bad), timeout=30, what="the failed task's processes to be gone")
    keeps_stepping(studio, good)

    # A poisonous record waiting while the studio is down: start-up must survive it too.
    studio.stop()
    r = run_cli(
        home, "submit", "--preset", "cpu-demo", "--name", "scripted steps=3000 delay=0.02 huge=2", scripted=True
    )
    assert r.returncode == 0, r.stderr
    late = r.stdout.strip()
    events = home / "tasks" / late / "events.jsonl"
    wait_for(lambda: events.exists() and str(2**70) in events.read_text(), what="the poisonous record")
    studio = studio_factory(scripted=True).start()
    assert studio.wait_status(late, "failed", timeout=30)["error"].startswith(WHY)
    keeps_stepping(studio, good)

    r = studio.http.post(f"/api/tasks/{good}/cancel")
    assert r.status_code == 200, r.text
    studio.wait_status(good, "cancelled", timeout=30)
    assert not tagged(good) and not tagged(late)
    log = (home / "studio.log").read_text()
    assert "Traceback" not in log and f"task {bad} failed: {WHY}" in log
