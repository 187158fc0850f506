"""Tasks as Slurm jobs, against a real Slurm cluster (scripts/slurm-dev-cluster up; `make test` brings it
up in CI): the studio submits with sbatch, watches with squeue, and reads the same task directory.

Skipped, with the reason, where no cluster answers; in CI (CI=true) a missing cluster fails instead."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support import Studio, home_env, run_cli, wait_for

pytestmark = pytest.mark.slow

CONF = os.environ.get("SLURM_CONF") or "/var/lib/ftstudio-slurm/slurm.conf"


def slurm_env() -> dict[str, str]:
    return {"SLURM_CONF": CONF} if Path(CONF).exists() else {}


def slurm(*args: str) -> str:
    done = subprocess.run(
        list(args), env={**os.environ, **slurm_env()}, capture_output=True, text=True, timeout=60, check=True
    )
    return done.stdout


def cluster_problem() -> str | None:
    try:
        out = slurm("sinfo", "--noheader", "--partition=debug", "--format=%a|%t")
    except (OSError, subprocess.SubprocessError) as e:
        return f"no Slurm cluster answers here ({e}); `scripts/slurm-dev-cluster up` starts one"
    if "up" not in out:
        return f"the Slurm partition debug is not up: {out.strip()!r}"
    return None


@pytest.fixture(scope="module")
def cluster() -> None:
    problem = cluster_problem()
    if problem:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI needs the Slurm cluster: {problem}")
        pytest.skip(problem)


def job_of(task_id: str) -> dict[str, str] | None:
    """The task's job as squeue lists it: id, state, reason (None: not listed)."""
    for line in slurm("squeue", "--noheader", "--states=all", f"--name=ftstudio-{task_id}", "--format=%i|%T|%r").split(
        "\n"
    ):
        if line.strip():
            job, state, reason = line.strip().split("|")
            return {"id": job, "state": state, "reason": reason}
    return None


@pytest.fixture
def studio(home: Path, cluster: None) -> Iterator[Studio]:
    env = home_env(home, scripted=True, **slurm_env())
    s = Studio(home, env)
    yield s
    s.stop()
    for tid in os.listdir(home / "tasks") if (home / "tasks").is_dir() else []:
        subprocess.run(["scancel", f"--name=ftstudio-{tid}"], env={**os.environ, **slurm_env()}, check=False)


def submit(studio: Studio, name: str, **config: Any) -> str:
    r = studio.http.post("/api/tasks", json={"name": name, "config": {"preset": "cpu-demo", **config}})
    assert r.status_code == 201, r.text
    return r.json()["id"]


def test_a_task_runs_as_a_slurm_job_and_completes(studio: Studio) -> None:
    studio.start("--executor", "slurm", "--partition", "debug")
    tid = submit(studio, "scripted steps=40 delay=0.1")
    task = wait_for(lambda: (t := studio.task(tid))["slurm"] and t, what="the task's Slurm job")
    job = job_of(tid)
    assert job is not None and job["id"] == task["slurm"]["job_id"], (job, task["slurm"])
    assert task["executor"] == "slurm"
    wait_for(lambda: studio.task(tid)["step"] >= 5, timeout=120, what="progress from the job")
    assert studio.task(tid)["slurm"]["state"] == "RUNNING"
    done = studio.wait_status(tid, "completed", "failed", "cancelled", "interrupted", timeout=180)
    assert done["status"] == "completed", done["error"]
    assert done["step"] == 40
    assert job_of(tid)["state"] == "COMPLETED"  # type: ignore[index]
    log = (studio.home / "tasks" / tid / "training.log").read_text()
    assert "starting training for task" in log and "training completed" in log


def test_the_studio_sigkilled_reattaches_to_the_same_job(studio: Studio, home: Path) -> None:
    studio.start("--executor", "slurm", "--partition", "debug")
    tid = submit(studio, "scripted steps=300 delay=0.05")
    wait_for(lambda: studio.task(tid)["step"] >= 5, timeout=120, what="progress from the job")
    job = job_of(tid)
    studio.kill(signal.SIGKILL)
    time.sleep(1.0)
    again = Studio(home, studio.env, studio.port).start()  # the home remembers the executor
    try:
        t = again.task(tid)
        assert t["status"] == "training" and t["reattached"], t
        assert t["slurm"]["job_id"] == job["id"]  # type: ignore[index]
        step = t["step"]
        wait_for(lambda: again.task(tid)["step"] > step + 5, timeout=60, what="the step to keep rising")
        r = again.http.post(f"/api/tasks/{tid}/cancel")
        assert r.status_code == 200, r.text
        done = again.wait_status(tid, "cancelled", "failed", "completed", timeout=120)
        assert done["status"] == "cancelled", done
        # Cancel from the studio leaves no job and no process of the task.
        wait_for(lambda: job_of(tid)["state"] in ("CANCELLED", "COMPLETED"), timeout=60, what="the job to end")  # type: ignore[index]
    finally:
        again.stop()


def test_scancel_outside_the_studio_ends_the_task_naming_slurm(studio: Studio) -> None:
    studio.start("--executor", "slurm", "--partition", "debug")
    tid = submit(studio, "scripted steps=300 delay=0.05")
    wait_for(lambda: studio.task(tid)["step"] >= 5, timeout=120, what="progress from the job")
    job = job_of(tid)
    slurm("scancel", job["id"])  # type: ignore[index]
    done = studio.wait_status(tid, "cancelled", "failed", "completed", "interrupted", "queued", timeout=120)
    assert done["status"] == "cancelled", done
    assert f"the Slurm job {job['id']} was cancelled outside the studio (scancel)" in done["error"], done  # type: ignore[index]
    assert done["attempt"] == 1  # not resumed: a person cancelled it, in Slurm


def test_a_studio_on_a_home_slurm_cannot_see_is_refused_with_the_fix(home: Path, cluster: None) -> None:
    r = run_cli(home, "studio", "start", "--executor", "slurm", "--partition", "no-such-partition", **slurm_env())
    assert r.returncode != 0
    assert "Slurm has no partition 'no-such-partition'; `sinfo` lists the partitions you can use" in r.stderr
    r = run_cli(home, "studio", "start", "--executor", "slurm", **slurm_env())
    assert r.returncode != 0 and "--partition: required with --executor slurm" in r.stderr
