"""The heart of the product, end to end with the real trainer: a studio that is
killed, restarted (several times) or finds the machine rebooted, while a real
fine-tune of builtin:tiny runs in its own processes."""

import json
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import psutil
import pytest
from support import cli_json, home_env, run_cli, wait_for

from ftstudio.execution.procs import tagged
from ftstudio.home import Home, read_json
from ftstudio.studio.store import Store

pytestmark = [pytest.mark.slow, pytest.mark.process]


def submit(studio, steps, **extra):
    config = {"preset": "cpu-demo", "optim": {"max_steps": steps}, "checkpoint": {"every_steps": 50}, **extra}
    r = studio.http.post("/api/tasks", json={"name": "restart test", "config": config})
    assert r.status_code == 201, r.text
    return r.json()


def alive(pid):
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def progress_on_stream(studio, task_id, after, count):
    """Steps of the next `count` progress events the stream delivers after seq `after`."""
    steps = []
    url = f"{studio.url}/api/tasks/{task_id}/stream"
    with httpx.stream("GET", url, params={"after": after}, headers=studio.auth, timeout=60) as r:
        event = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: ") and event == "progress":
                steps.append(json.loads(line[6:])["step"])
                if len(steps) >= count:
                    break
    return steps


def assert_complete_history(home, task_id, steps):
    store = Store(home / "studio.db")
    evs = store.events(task_id)
    assert [e["seq"] for e in evs] == list(range(1, len(evs) + 1))  # nothing lost, nothing twice
    progress = [e["step"] for e in evs if e["kind"] == "progress"]
    assert progress == list(range(1, steps + 1))
    assert all(isinstance(e["loss"], float) for e in evs if e["kind"] == "progress")


@pytest.mark.timeout(900)  # ~40 s on an idle 2-core machine; torch slows many-fold when the cores are shared
def test_training_survives_sigkill_and_restarts_of_the_studio(home, studio_factory):
    first = studio_factory().start()
    task = submit(first, 360)
    tid = task["id"]
    running = wait_for(lambda: (t := first.task(tid))["step"] >= 15 and t, timeout=90, what="training to start")
    runner_pid = running["pid"]
    trainer_pid = read_json(home / "tasks" / tid / "launch.json")["trainer_pid"]

    # 1. SIGKILL the studio: the training (same pids) keeps going while it is down.
    first.kill(signal.SIGKILL)
    events_file = home / "tasks" / tid / "events.jsonl"
    size = events_file.stat().st_size
    wait_for(lambda: events_file.stat().st_size > size, timeout=30, what="events while the studio is down")
    assert alive(runner_pid) and alive(trainer_pid)

    second = studio_factory(port=first.port).start()
    seen = second.task(tid)
    assert seen["status"] == "training" and seen["pid"] == runner_pid and seen["reattached"] is True
    assert seen["step"] >= running["step"]
    steps = progress_on_stream(second, tid, seen["events_seq"], 5)
    assert steps == sorted(steps) and steps[0] > running["step"]
    shown = cli_json(home, "show", tid)
    assert shown["status"] == "training" and shown["pid"] == runner_pid

    # 2. `ftstudio studio restart`, twice, during the same run.
    for _ in range(2):
        before = cli_json(home, "show", tid)["step"]
        r = run_cli(home, "studio", "restart", "--port", str(first.port))
        assert r.returncode == 0 and "studio running at" in r.stdout, r.stdout + r.stderr
        after = wait_for(lambda b=before: (t := second.task(tid))["step"] > b and t, timeout=60, what="step rising")
        assert after["pid"] == runner_pid and after["reattached"] is True and after["status"] == "training"

    done = second.wait_status(tid, "completed", "failed", timeout=700)
    assert done["status"] == "completed", done["error"]
    assert done["step"] == 360 and done["pid"] == runner_pid
    adapter = home / "tasks" / tid / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file() and (adapter / "adapter_config.json").is_file()
    assert_complete_history(home, tid, 360)
    log = (home / "studio.log").read_text()
    assert log.count(f"reattached to task {tid}, pid {runner_pid}, step ") == 3
    assert tagged(tid) == []
    run_cli(home, "studio", "stop")


def crash_while_training(studio_factory, **restart_env):
    """Train, then SIGKILL the studio and every process of the task at once; start a new studio."""
    studio = studio_factory().start()
    tid = submit(studio, 2000)["id"]
    wait_for(lambda: studio.task(tid)["step"] >= 5, timeout=90, what="training")
    studio.kill(signal.SIGKILL)
    for p in tagged(tid):
        p.kill()
    return tid, studio_factory(port=studio.port, **restart_env).start()


def test_killed_while_the_studio_is_down_is_interrupted_with_the_reason_and_resumed(home, studio_factory):
    tid, again = crash_while_training(studio_factory)
    got = again.task(tid)
    assert got["attempt"] == 2 and got["status"] in ("queued", "preparing", "training"), got
    first = got["attempts"][0]
    assert first["end_reason"].startswith("Training process terminated unexpectedly at step ")
    assert f"task {tid} interrupted: Training process terminated unexpectedly" in again.log_tail()
    # Every process gone at once, as in a crash: the machine's doing, so no restart of the run's is used.
    assert first["end_cause"] == "machine" and got["restarts"] == 0, got
    resumed = "resuming by itself after an interruption by the machine (not counted against resume.max_restarts)"
    assert f"task {tid} queued: {resumed}; attempt 2 starts from the beginning" in again.log_tail()
    again.http.post(f"/api/tasks/{tid}/cancel").raise_for_status()
    assert again.wait_status(tid, "cancelled", timeout=60)["status"] == "cancelled"


def test_finished_while_the_studio_is_down_is_completed(home, studio_factory):
    studio = studio_factory().start()
    tid = submit(studio, 20)["id"]
    studio.kill(signal.SIGKILL)
    wait_for(lambda: (home / "tasks" / tid / "exit.json").exists(), timeout=120, what="training to finish")
    again = studio_factory(port=studio.port).start()
    got = again.task(tid)
    assert got["status"] == "completed" and got["step"] == 20 and got["error"] is None


@pytest.mark.timeout(900)
def test_a_simulated_reboot_mid_run_ends_completed_as_if_nothing_happened(home, studio_factory):
    """A reboot: every process gone at once, and the machine comes back with a new boot id. The task is
    resumed from its newest checkpoint with no human action, loses at most one checkpoint interval, and
    ends where an uninterrupted run ends."""
    steps, every = 40, 10
    config = {"preset": "cpu-demo", "optim": {"max_steps": steps, "seed": 11}, "checkpoint": {"every_steps": every}}
    studio = studio_factory().start()
    r = studio.http.post("/api/tasks", json={"name": "rebooted", "config": config})
    tid = r.json()["id"]
    wait_for(lambda: studio.task(tid)["step"] >= 15, timeout=300, what="training past a checkpoint")
    studio.kill(signal.SIGKILL)
    for p in tagged(tid):
        p.kill()
    crashed_at = Store(home / "studio.db").get(tid).step
    again = studio_factory(port=studio.port, FTSTUDIO_BOOT_ID="boot-after-the-crash").start()
    done = again.wait_status(tid, "completed", "failed", timeout=600)
    assert done["status"] == "completed" and done["step"] == steps and done["attempt"] == 2, done
    first, second = done["attempts"]
    # The new studio reads what the dead attempt wrote after the last look of the old one: it ended at or past
    # the step the store had when the machine went down.
    assert "the machine restarted at step" in first["end_reason"] and first["end_step"] >= crashed_at
    crashed_at = first["end_step"]
    resumed = second["resumed_from_step"]
    # From a checkpoint, at most one interval lost (the progress event of a checkpoint's step comes before the
    # checkpoint is complete: a crash between them resumes from the one before).
    assert resumed % every == 0 and resumed >= every and 0 <= crashed_at - resumed <= every
    evs = Store(home / "studio.db").events(tid)
    seqs = [e["seq"] for e in evs]
    assert seqs == sorted(set(seqs))  # in order; the dead attempt's steps past the checkpoint were replaced
    assert [e["step"] for e in evs if e["kind"] == "progress"] == list(range(1, steps + 1))  # each step once
    # The same config, never interrupted: the same end.
    plain = again.http.post("/api/tasks", json={"name": "uninterrupted", "config": config}).json()["id"]
    baseline = again.wait_status(plain, "completed", "failed", timeout=600)
    assert baseline["status"] == "completed" and baseline["step"] == steps
    assert done["loss"] == pytest.approx(baseline["loss"], abs=1e-3)


def test_a_cli_submitted_fine_tune_runs_to_completed(home):
    r = run_cli(home, "submit", "--preset", "cpu-demo", "--max-steps", "25", "--wait", timeout=300)
    assert r.returncode == 0, r.stderr
    tid = r.stdout.strip().splitlines()[0]
    shown = cli_json(home, "show", tid)
    assert shown["status"] == "completed" and shown["step"] == 25
    assert (home / "tasks" / tid / "adapter" / "adapter_model.safetensors").is_file()
    assert_complete_history(home, tid, 25)
    tdir = Home(home).task(tid)
    assert tdir.exit.exists()
    assert "Warning" not in tdir.log.read_text()  # people read this log; library noise does not belong there
    # train.py reproduces the task by hand; with --resume auto it continues from the last checkpoint.
    by_hand = subprocess.run(
        [sys.executable, "train.py", "--resume", "auto"],
        cwd=tdir.path,
        env=home_env(home),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert by_hand.returncode == 0, by_hand.stdout[-2000:]
    reply = run_cli(home, "generate", tid, "--prompt", "Reverse the word: stone", "--max-new-tokens", "8")
    assert reply.returncode == 0 and reply.stdout.strip(), reply.stderr
    merged = run_cli(home, "merge", tid)
    assert merged.returncode == 0, merged.stderr
    assert (Path(merged.stdout.strip()) / "config.json").is_file()
    out = home / "exports"
    out.mkdir()
    for fmt, needed in (("adapter", "adapter_model.safetensors"), ("merged", "model.safetensors")):
        exported = run_cli(home, "export", tid, "--format", fmt, "--out", str(out / fmt))
        assert exported.returncode == 0, exported.stderr
        assert Path(exported.stdout.strip()) == out / fmt and (out / fmt / needed).is_file()
        assert f"task `{tid}`" in (out / fmt / "README.md").read_text()
    again = run_cli(home, "export", tid, "--out", str(out / "adapter"))
    assert again.returncode == 2 and f"{out / 'adapter'} already exists; name a new folder with --out" in again.stderr
