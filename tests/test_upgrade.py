"""An upgrade in the middle of a fine-tune, end to end with real processes (issue 20, item 4).

The previous release (OLD, the last commit before the package moved into subpackages) is extracted
from git into a temporary folder and run from there with the same Python and packages (PYTHONPATH
first, and that folder as the working one, which `python -m` puts before everything). Its studio
starts a real fine-tune of builtin:tiny; mid-run the new CLI stops the old studio and the new studio
starts on the same home. The new one must reattach to the old runner, pause it (the old trainer saves
the checkpoint) and resume it (the new code loads it), resume it by itself after its new trainer is
SIGKILLed, and finish it with each step once; and every record the old release made (the task, its
config, its metrics and its history) must still be there, unchanged.
"""

import io
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tarfile
from pathlib import Path

import psutil
import pytest
from slurm_cluster import in_ci
from support import ROOT, SCRIPTED, Studio, cli_json, home_env, is_trainer, paced, run_cli, wait_for

from ftstudio import checkpoints
from ftstudio.execution.procs import tagged
from ftstudio.home import read_json

pytestmark = pytest.mark.slow

OLD = "917d48e"  # the previous release: the last commit with the flat package
STEPS, EVERY = 40, 5
CONFIG = {
    "preset": "cpu-demo",
    "data": {"validation": "0", "max_length": 64},
    "optim": {"max_steps": STEPS, "seed": 11, "batch_size": 4},
    "checkpoint": {"every_steps": EVERY},
    "logging": {"eval_on_start": False},
}
FINAL = ("completed", "failed", "cancelled")


# -- the previous release ------------------------------------------------------


def unavailable(why):
    if in_ci():
        pytest.fail(f"CI needs the previous release {OLD} in git: {why}", pytrace=False)
    pytest.skip(f"the previous release {OLD} is not at hand: {why}")


def extract_old_release(dest):
    """`git archive OLD ftstudio | tar -x -C dest`, run in the repository root: dest/ftstudio is the old package."""
    git = shutil.which("git")
    if git is None:
        unavailable("no git on PATH")
    found = subprocess.run([git, "cat-file", "-e", f"{OLD}^{{commit}}"], cwd=ROOT, capture_output=True, text=True)
    if found.returncode != 0:
        unavailable(f"git cat-file in {ROOT}: {found.stderr.strip() or 'no such commit'}")
    archive = subprocess.run([git, "archive", "--format=tar", OLD, "ftstudio"], cwd=ROOT, capture_output=True)
    assert archive.returncode == 0, archive.stderr.decode(errors="replace")
    dest.mkdir()
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(dest, filter="data")
    return dest


def package_of(env, cwd):
    """The ftstudio package that `python -m ftstudio...` imports with this environment in this folder."""
    code = "import ftstudio, ftstudio.train, ftstudio.runner; print(ftstudio.__file__)"
    r = subprocess.run([sys.executable, "-c", code], env=env, cwd=cwd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return Path(r.stdout.strip()).parent


def package_run_by(proc):
    """The ftstudio package a running `python -m ftstudio.X` process imported, found the way Python finds it:
    its working folder first (`-m`), then PYTHONPATH, then the installed one (the editable install: ROOT)."""
    env = proc.environ()
    for entry in [proc.cwd(), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]:
        if (Path(entry) / "ftstudio" / "__init__.py").is_file():
            return Path(entry) / "ftstudio"
    return ROOT / "ftstudio"


def processes(tid, attempt):
    """The runner of the task and the trainer of one attempt, by the task's process tag (the runner carries
    the task's; the trainer also its attempt's, which the runner sets)."""
    runners = [p for p in tagged(tid) if "ftstudio.runner" in p.cmdline()]
    trainers = [p for p in tagged(tid, attempt) if is_trainer(p.cmdline())]
    return runners, trainers


# -- waiting, and saying why not -------------------------------------------------


def explain(studio, tid):
    t = studio.task(tid)
    keys = ("status", "phase", "step", "total_steps", "attempt", "pid", "error", "attempts")
    tlog = studio.home / "tasks" / tid / "training.log"
    return "\n".join(
        [
            json.dumps({k: t.get(k) for k in keys}, default=str),
            "training.log: " + (tlog.read_text(errors="replace")[-2500:] if tlog.exists() else "(none)"),
            "studio: " + studio.log_tail()[-2500:],
        ]
    )


def wait_task(studio, tid, pred, what, *, timeout=240, bad=FINAL):
    """Wait until pred(task) holds; fail at once, with the task's state and the tail of its training log,
    when it reaches a status in `bad` first, or at the timeout."""

    def look():
        t = studio.task(tid)
        if pred(t):
            return t
        if t["status"] in bad:
            raise AssertionError(f"task {tid} is {t['status']} while waiting for {what}:\n{explain(studio, tid)}")
        return None

    try:
        return wait_for(look, timeout=timeout, interval=0.2, what=what)
    except AssertionError as e:
        if "timed out" not in str(e):
            raise
        raise AssertionError(f"{e}:\n{explain(studio, tid)}") from None


# -- the records ---------------------------------------------------------------


def rows(db, table, tid):
    """The raw rows of one task in a table of studio.db, read with sqlite3 (no studio code of either release)."""
    column = "id" if table == "tasks" else "task_id"
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        conn.row_factory = sqlite3.Row
        return [dict(r) for r in conn.execute(f"SELECT * FROM {table} WHERE {column} = ?", (tid,))]


def records(studio, tid):
    """What the API shows of a task: the row, its metrics and its history."""
    return {
        "task": studio.task(tid),
        "events": studio.http.get(f"/api/tasks/{tid}/metrics").json()["events"],
        "history": studio.http.get(f"/api/tasks/{tid}/history").json(),
        "listed": studio.http.get("/api/tasks").json(),
    }


def listed(page, tid):
    return next((t for t in page["tasks"] if t["id"] == tid), None)


# -- the test ------------------------------------------------------------------


@pytest.fixture
def studios():
    """Makes real studio servers (support.Studio) in a folder of choice; stops each at the end."""
    made = []

    def make(home, env, cwd, port=None):
        made.append(Studio(home, env, port=port, cwd=cwd))
        return made[-1]

    yield make
    for s in made:
        s.stop()


@pytest.mark.slow
@pytest.mark.process
@pytest.mark.timeout(900)  # ~2-3 min on an idle 2-core machine; torch slows many-fold when the cores are shared
def test_an_upgrade_mid_fine_tune_reattaches_pauses_resumes_and_keeps_every_record(home, tmp_path, studios):
    old = extract_old_release(tmp_path / "old")
    # Both releases' trainers with a floor on each step: the steps below act on the run midway, and on a
    # fast machine 40 steps of builtin:tiny end in the time it takes to restart a studio.
    pace = paced(FTSTUDIO_TEST_PACE_S="0.3")
    old_env = home_env(home, PYTHONPATH=os.pathsep.join([str(old), str(SCRIPTED)]), **pace)
    new_env = home_env(home, **pace)
    elsewhere = tmp_path / "cwd"  # the new studio runs in a neutral folder: it imports the installed package
    elsewhere.mkdir()
    assert package_of(old_env, old) == old / "ftstudio"
    assert package_of(new_env, elsewhere) == ROOT / "ftstudio"
    assert not (old / "ftstudio" / "training").exists() and (ROOT / "ftstudio" / "training").is_dir()

    # 1. The old studio starts a real fine-tune, which trains past its first complete checkpoint.
    first = studios(home, old_env, cwd=old).start()
    r = first.http.post("/api/tasks", json={"name": "upgraded mid-run", "config": CONFIG})
    assert r.status_code == 201, r.text
    tid = r.json()["id"]
    tdir = home / "tasks" / tid
    ckpts = tdir / "checkpoints"
    wait_task(
        first,
        tid,
        lambda t: (
            t["status"] == "training" and t["step"] > EVERY and checkpoints.is_complete(ckpts / f"checkpoint-{EVERY}")
        ),
        f"the old release to train past checkpoint-{EVERY}",
    )
    runners, trainers = processes(tid, 1)
    assert len(runners) == 1 and len(trainers) == 1, (runners, trainers)
    runner_pid = runners[0].pid
    assert [package_run_by(p) for p in (*runners, *trainers)] == [old / "ftstudio"] * 2
    assert first.task(tid)["pid"] == runner_pid
    before = records(first, tid)

    # 2. The upgrade as a user makes it, the new package installed while the old studio serves: the new CLI
    # finds the old studio (its server record, its process identity) and stops it; the training stays.
    shown = cli_json(home, "studio", "status")
    assert shown["running"] is True and shown["pid"] == first.proc.pid, shown
    r = run_cli(home, "studio", "stop")
    assert r.returncode == 0 and f"studio stopped (pid {first.proc.pid})" in r.stdout, r.stdout + r.stderr
    assert first.proc.wait(timeout=30) is not None
    assert psutil.pid_exists(runner_pid) and runners[0].is_running(), "the training ended with the old studio"
    db = home / "studio.db"
    old_rows = {table: rows(db, table, tid) for table in ("tasks", "events", "transitions", "attempts")}
    assert old_rows["events"] and old_rows["transitions"] and len(old_rows["attempts"]) == 1

    # 3. The new studio on the same home reattaches to the old runner, which goes on training.
    second = studios(home, new_env, elsewhere, port=first.port).start()
    seen = second.task(tid)
    assert seen["status"] == "training" and seen["pid"] == runner_pid and seen["reattached"] is True, seen
    at = seen["step"]
    going = wait_task(second, tid, lambda t: t["step"] >= at + 2, "the step to advance under the new studio")
    assert going["pid"] == runner_pid and going["attempt"] == 1 and going["status"] == "training"
    assert f"reattached to task {tid}, pid {runner_pid}, step " in second.log_tail()

    # 4. What the old release recorded opens without loss.
    after = records(second, tid)
    old_task, new_task = before["task"], after["task"]
    for key in ("id", "name", "config", "model", "dataset", "created_at", "started_at", "total_steps", "executor"):
        assert new_task[key] == old_task[key], (key, old_task[key], new_task[key])
    shown = listed(after["listed"], tid)
    assert shown is not None and shown["name"] == "upgraded mid-run" and shown["config"] == old_task["config"]
    assert after["events"][: len(before["events"])] == before["events"]
    assert after["history"]["transitions"][: len(before["history"]["transitions"])] == before["history"]["transitions"]
    assert after["history"]["attempts"][0]["started_at"] == before["history"]["attempts"][0]["started_at"]
    for table in ("events", "transitions"):
        now = rows(db, table, tid)
        missing = [row for row in old_rows[table] if row not in now]
        assert missing == [], f"{table} rows of the old release lost or changed: {missing}"
    assert rows(db, "tasks", tid)[0]["config"] == old_rows["tasks"][0]["config"]
    # The task dir's train.py, written by the old studio, reaches the new trainer's entry point.
    by_hand = subprocess.run(
        [sys.executable, "train.py", "--help"], cwd=tdir, env=new_env, capture_output=True, text=True, timeout=60
    )
    assert by_hand.returncode == 0 and "python -m ftstudio.train" in by_hand.stdout, by_hand.stderr

    # 5. Pause through the new studio: the old trainer checkpoints its step and the old runner exits paused.
    r = second.http.post(f"/api/tasks/{tid}/pause")
    assert r.status_code == 200, r.text
    paused = wait_task(second, tid, lambda t: t["status"] == "paused", "the pause", bad=(*FINAL, "interrupted"))
    stopped_at = paused["step"]
    assert checkpoints.is_complete(ckpts / f"checkpoint-{stopped_at}"), sorted(os.listdir(ckpts))
    assert paused["attempts"][0]["end_reason"].startswith(f"paused at step {stopped_at}/{STEPS}"), paused
    assert read_json(tdir / "exit.json")["outcome"] == "paused"
    assert wait_for(lambda: not tagged(tid), timeout=15, what="the old processes to be gone")

    # 6. Resume: attempt 2, the new code, from the checkpoint the old trainer wrote.
    r = second.http.post(f"/api/tasks/{tid}/resume")
    assert r.status_code == 200, r.text
    wait_task(
        second,
        tid,
        lambda t: t["attempt"] == 2 and t["status"] == "training" and t["step"] >= stopped_at + 2,
        "attempt 2 to train",
    )
    runners, trainers = processes(tid, 2)
    assert len(runners) == 1 and len(trainers) == 1, (runners, trainers)
    assert runners[0].pid != runner_pid and second.task(tid)["pid"] == runners[0].pid
    assert [package_run_by(p) for p in (*runners, *trainers)] == [ROOT / "ftstudio"] * 2

    # 7. SIGKILL the trainer: the task resumes by itself from its newest complete checkpoint, with the new code.
    trainers[0].send_signal(signal.SIGKILL)
    trainers[0].wait(timeout=30)
    newest = checkpoints.find_resume_checkpoint(ckpts)
    assert newest is not None
    resume_step = checkpoints.step_of(newest)
    assert resume_step is not None and resume_step >= stopped_at
    wait_task(
        second,
        tid,
        lambda t: t["attempt"] == 3 and t["status"] == "training" and t["step"] > resume_step,
        "attempt 3 to resume by itself",
    )
    runners, trainers = processes(tid, 3)
    assert len(runners) == 1 and len(trainers) == 1, (runners, trainers)
    assert [package_run_by(p) for p in (*runners, *trainers)] == [ROOT / "ftstudio"] * 2

    # 8. It completes, each step once.
    done = wait_task(second, tid, lambda t: t["status"] == "completed", "completion", timeout=480)
    assert done["step"] == STEPS and done["attempt"] == 3 and done["error"] is None, done
    first_attempt, second_attempt, third_attempt = done["attempts"]
    assert first_attempt["end_reason"].startswith(f"paused at step {stopped_at}/"), done["attempts"]
    assert second_attempt["resumed_from_step"] == stopped_at, done["attempts"]
    assert third_attempt["resumed_from_step"] == resume_step, done["attempts"]
    assert second_attempt["end_step"] >= resume_step
    events = second.http.get(f"/api/tasks/{tid}/metrics").json()["events"]
    seqs = [e["seq"] for e in events]
    assert seqs == sorted(set(seqs))
    assert [e["step"] for e in events if e["kind"] == "progress"] == list(range(1, STEPS + 1))  # each step once
    assert (tdir / "adapter" / "adapter_model.safetensors").is_file()
    # The old release's records are still there at the end: its steps were never redone.
    final_events = rows(db, "events", tid)
    assert [row for row in old_rows["events"] if row not in final_events] == []
    transitions = second.http.get(f"/api/tasks/{tid}/history").json()["transitions"]
    assert transitions[: len(before["history"]["transitions"])] == before["history"]["transitions"]
    assert wait_for(lambda: not tagged(tid), timeout=15, what="every process of the task to end")
