"""Tasks as Slurm jobs, against a real Slurm cluster (scripts/slurm-dev-cluster up; `make test` brings it
up in CI): the studio submits with sbatch, watches with squeue, and reads the same task directory.

Skipped, with the reason, where no cluster answers; in CI (CI=true) a missing cluster fails instead
(the `slurm` fixture)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from slurm_cluster import cancel_tasks, current_cluster, slurm_env
from support import Studio, home_env, paced, progress_steps, run_cli, submit_tiny, tiny, wait_for

from ftstudio.execution.procs import tagged
from ftstudio.studio.store import Store

# slurm_now (conftest.py): every test skips without a cluster, fails without one in CI.
pytestmark = [pytest.mark.slow, pytest.mark.slurm, pytest.mark.usefixtures("slurm_now")]


def slurm(*args: str) -> str:
    return current_cluster().run(*args).stdout


def job_of(task_id: str) -> dict[str, str] | None:
    """The task's job as squeue lists it: id, state, reason (None: not listed)."""
    for line in slurm("squeue", "--noheader", "--states=all", f"--name=ftstudio-{task_id}", "--format=%i|%T|%r").split(
        "\n"
    ):
        if line.strip():
            job, state, reason = line.strip().split("|")
            return {"id": job, "state": state, "reason": reason}
    return None


def job_completed(task_id: str) -> None:
    """The task's job ends COMPLETED. Waited for: the task completes on its runner's exit record, which the
    runner writes before it exits, so Slurm may still say RUNNING for a moment (seen under load)."""
    wait_for(lambda: (job_of(task_id) or {}).get("state") == "COMPLETED", timeout=60, what="Slurm to say COMPLETED")


@pytest.fixture
def studio(home: Path) -> Iterator[Studio]:
    env = home_env(home, scripted=True, **slurm_env())
    s = Studio(home, env)
    yield s
    s.stop()
    cancel_tasks(home)


def submit(studio: Studio, name: str, **config: Any) -> str:
    r = studio.http.post("/api/tasks", json={"name": name, "config": {"preset": "cpu-demo", **config}})
    assert r.status_code == 201, r.text
    return r.json()["id"]


def test_a_task_runs_as_a_slurm_job_and_completes(studio: Studio) -> None:
    studio.start("--executor", "slurm", "--partition", "debug", "--sbatch-option=--comment=from-ftstudio")
    tid = submit(studio, "scripted steps=40 delay=0.1")
    task = wait_for(lambda: (t := studio.task(tid)).get("slurm") and t, what="the task's Slurm job")
    job = job_of(tid)
    assert job is not None and job["id"] == task["slurm"]["job_id"], (job, task["slurm"])
    assert task["executor"] == "slurm"
    assert "Comment=from-ftstudio" in slurm("scontrol", "show", "job", task["slurm"]["job_id"])  # a safe extra option
    wait_for(lambda: studio.task(tid)["step"] >= 5, timeout=120, what="progress from the job")
    wait_for(lambda: studio.task(tid)["slurm"]["state"] == "RUNNING", timeout=10, what="Slurm to say RUNNING")
    done = studio.wait_status(tid, "completed", "failed", "cancelled", "interrupted", timeout=180)
    assert done["status"] == "completed", done["error"]
    assert done["step"] == 40
    job_completed(tid)
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
        wait_for(lambda: not tagged(tid), timeout=30, what="no process of the task left")
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


def test_a_start_with_a_partition_slurm_lacks_or_an_unsafe_option_is_refused_with_the_fix(home: Path) -> None:
    r = run_cli(home, "studio", "start", "--executor", "slurm", "--partition", "no-such-partition", **slurm_env())
    assert r.returncode != 0
    assert "Slurm has no partition 'no-such-partition'; `sinfo` lists the partitions you can use" in r.stderr
    r = run_cli(home, "studio", "start", "--executor", "slurm", **slurm_env())
    assert r.returncode != 0 and "--partition: required with --executor slurm" in r.stderr
    r = run_cli(
        home,
        "studio",
        "start",
        "--executor",
        "slurm",
        "--partition",
        "debug",
        "--sbatch-option=--wrap=id",
        **slurm_env(),
    )
    assert r.returncode != 0 and "--sbatch-option: '--wrap' is not one the studio passes on" in r.stderr
    # Nothing was remembered from the refused starts: the home still runs tasks on this machine.
    assert Store(home / "studio.db").setting("executor") in (None, "local")


@pytest.fixture
def real(home: Path) -> Iterator[Studio]:
    """A studio on Slurm whose jobs run the real trainer, paced (0.2 s a step at least): the tests act on a run
    midway (a pause, Slurm's warning, a requeue at step 12 of 60), which a fast machine would have finished."""
    s = Studio(home, home_env(home, **slurm_env(), **paced()))
    yield s.start("--executor", "slurm", "--partition", "debug")
    s.stop()
    cancel_tasks(home)


def test_a_real_fine_tune_of_builtin_tiny_completes_as_a_slurm_job_with_its_adapter(real: Studio, home: Path) -> None:
    tid = submit_tiny(real, 12, 6)
    done = real.wait_status(tid, "completed", "failed", "cancelled", timeout=300)
    assert done["status"] == "completed", done["error"]
    assert done["step"] == 12 and done["slurm"]["job_id"]
    adapter = home / "tasks" / tid / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file() and (adapter / "adapter_config.json").is_file()
    job_completed(tid)


def test_dpo_and_grpo_fine_tunes_complete_as_slurm_jobs_with_their_figures(real: Studio, home: Path) -> None:
    """The preference and RL methods run on the cluster as SFT does: the same trainer, in a job of its own."""
    figures = {"dpo": "rewards/accuracies", "grpo": "rewards/numeric/mean"}
    tids = {}
    for method in figures:
        config = {**tiny(6, 3), "method": method}
        if method == "grpo":
            config["grpo"] = {"max_completion_length": 8}
        r = real.http.post("/api/tasks", json={"name": f"{method} on slurm", "config": config})
        assert r.status_code == 201, r.text
        tids[method] = r.json()["id"]
    for method, tid in tids.items():
        done = real.wait_status(tid, "completed", "failed", "cancelled", timeout=300)
        assert done["status"] == "completed" and done["step"] == 6, done["error"]
        assert done["slurm"]["job_id"] and (home / "tasks" / tid / "adapter" / "adapter_config.json").is_file()
        events = real.http.get(f"/api/tasks/{tid}/metrics").json()["events"]
        assert all(figures[method] in e["metrics"] for e in events if e["kind"] == "progress"), method
        job_completed(tid)


def test_pause_checkpoints_and_ends_the_job_and_resume_submits_the_next_attempt(real: Studio) -> None:
    tid = submit_tiny(real, 60, 10)
    wait_for(
        lambda: real.task(tid)["step"] >= 12 and real.task(tid)["status"] == "training", timeout=240, what="step 12"
    )
    first_job = real.task(tid)["slurm"]["job_id"]
    r = real.http.post(f"/api/tasks/{tid}/pause")
    assert r.status_code == 200, r.text
    paused = real.wait_status(tid, "paused", "failed", "interrupted", timeout=120)
    assert paused["status"] == "paused", paused
    wait_for(lambda: job_of(tid) is not None and job_of(tid)["state"] == "COMPLETED", timeout=30, what="job done")  # type: ignore[index]
    r = real.http.post(f"/api/tasks/{tid}/resume")
    assert r.status_code == 200, r.text
    done = real.wait_status(tid, "completed", "failed", "cancelled", timeout=300)
    assert done["status"] == "completed", done["error"]
    assert done["attempt"] == 2 and done["slurm"]["job_id"] != first_job
    assert done["attempts"][1]["resumed_from_step"] == paused["step"]
    assert progress_steps(real, tid) == list(range(1, 61))  # each step once, across two jobs


def test_slurms_warning_before_a_time_limit_checkpoints_and_the_task_resumes_by_itself(real: Studio) -> None:
    """sbatch --signal=B:USR1@120 sends SIGUSR1 to the batch step before the time limit (or a preemption):
    without the studio's pause request it is not a pause; the job checkpoints, ends, and the studio
    resumes the task as its next attempt, a new job, with no step twice."""
    tid = submit_tiny(real, 60, 10)
    wait_for(
        lambda: real.task(tid)["step"] >= 12 and real.task(tid)["status"] == "training", timeout=240, what="step 12"
    )
    first_job = real.task(tid)["slurm"]["job_id"]
    slurm("scancel", "--batch", "--signal=USR1", first_job)  # what Slurm itself sends at the warning time
    done = real.wait_status(tid, "completed", "failed", "cancelled", "paused", timeout=300)
    assert done["status"] == "completed", done
    first, second = done["attempts"]
    assert "stopped by SIGUSR1 from outside the studio" in first["end_reason"], first
    assert second["resumed_from_step"] == first["end_step"], done["attempts"]  # checkpointed at the next step
    assert done["slurm"]["job_id"] != first_job
    assert progress_steps(real, tid) == list(range(1, 61))


def test_restarting_slurmctld_while_a_job_runs_loses_nothing(studio: Studio) -> None:
    """The controller goes away (an upgrade, a crash) while the task trains: squeue cannot answer, which
    is "cannot tell", never "dead"; the job keeps running and the studio keeps showing its progress; the
    controller comes back and the task completes in its first attempt."""
    cluster = current_cluster()
    pidfile = cluster.conf.parent / "run" / "slurmctld.pid"
    if not pidfile.is_file():
        pytest.skip(f"no {pidfile}: only the development cluster (scripts/slurm-dev-cluster) can be restarted here")
    script = Path(__file__).resolve().parents[1] / "scripts" / "slurm-dev-cluster"
    studio.start("--executor", "slurm", "--partition", "debug")
    tid = submit(studio, "scripted steps=400 delay=0.05")
    wait_for(lambda: studio.task(tid)["step"] >= 5, timeout=120, what="progress from the job")
    ctld = int(pidfile.read_text())
    os.kill(ctld, signal.SIGTERM)
    try:
        wait_for(lambda: cluster.run("squeue", check=False).returncode != 0, timeout=30, what="slurmctld to go")
        step = studio.task(tid)["step"]
        wait_for(lambda: studio.task(tid)["step"] > step + 20, timeout=60, what="progress while Slurm is away")
        # Training, or even completed: its exit record decides, whether Slurm answers or not.
        assert studio.task(tid)["status"] in ("training", "completed")
    finally:
        # Gone, not going: `up` leaves a slurmctld it finds still running alone, and the one shutting down
        # would then leave the next tests with no controller ("Unable to contact slurm controller").
        wait_for(lambda: not psutil.pid_exists(ctld), timeout=60, what="the old slurmctld to exit")
        up = subprocess.run([str(script), "up"], env=cluster.env, capture_output=True, text=True, timeout=120)
        assert up.returncode == 0, up.stdout + up.stderr
        wait_for(lambda: cluster.run("squeue", check=False).returncode == 0, timeout=60, what="slurmctld to answer")
    done = studio.wait_status(tid, "completed", "failed", "cancelled", "interrupted", timeout=120)
    assert done["status"] == "completed" and done["attempt"] == 1, done
    if done["slurm"]["state"] is not None:
        job_completed(tid)


WAITS = ("Resources", "Priority")


def test_a_task_waiting_in_slurms_queue_says_why(studio: Studio, tmp_path: Path) -> None:
    cluster = current_cluster()
    studio.start("--executor", "slurm", "--partition", "debug")  # its check job needs a free CPU
    blocker = cluster.sbatch(
        f"--cpus-per-task={os.cpu_count()}", "--job-name=blocker", "--wrap=sleep 120", cwd=tmp_path
    )
    try:
        wait_for(lambda: (cluster.state(blocker) or ("",))[0] == "RUNNING", timeout=30, what="the blocker to run")
        tid = submit(studio, "scripted steps=5 delay=0.05")
        # Just submitted it has no reason yet; then Slurm says why it waits: Resources, or Priority where a job
        # from elsewhere (another test run on this machine's cluster) waits ahead of it.
        t = wait_for(
            lambda: (t := studio.task(tid))["phase"] in (f"pending in Slurm (reason: {r})" for r in WAITS) and t,
            what="the task pending for Resources",
        )
        assert t["status"] == "preparing", t
        said = t["phase"].removeprefix("pending in Slurm (reason: ").removesuffix(")")
        shown = run_cli(studio.home, "show", tid, **slurm_env())
        assert f"slurm job  {t['slurm']['job_id']} (PENDING, reason: {said})" in shown.stdout, shown.stdout
    finally:
        cluster.run("scancel", blocker)
    assert studio.wait_status(tid, "completed", "failed", timeout=120)["status"] == "completed"


def test_a_preemption_by_a_higher_priority_partition_resumes_the_task_in_its_requeued_job(
    studio: Studio, tmp_path: Path
) -> None:
    """A real preemption: a job in the `urgent` partition (PriorityTier 2, PreemptMode=REQUEUE) needs every
    CPU; Slurm stops the task's job (SIGTERM) and requeues it. The task is interrupted, naming the requeue,
    and its next attempt runs in the same job once the urgent one is done, each step once."""
    cluster = current_cluster()
    studio.start("--executor", "slurm", "--partition", "debug")
    tid = submit(studio, "scripted steps=300 delay=0.05")
    wait_for(lambda: studio.task(tid)["step"] >= 10, timeout=120, what="progress from the job")
    job = studio.task(tid)["slurm"]["job_id"]
    urgent = cluster.sbatch(
        "--partition=urgent", f"--cpus-per-task={os.cpu_count()}", "--job-name=urgent", "--wrap=sleep 5", cwd=tmp_path
    )
    try:
        done = studio.wait_status(tid, "completed", "failed", "cancelled", timeout=300)
    finally:
        cluster.run("scancel", urgent, check=False)
    assert done["status"] == "completed", done
    assert done["attempt"] == 2 and done["slurm"]["job_id"] == job, done["attempts"]
    assert f"Slurm requeued the Slurm job {job}" in done["attempts"][0]["end_reason"], done["attempts"]
    assert progress_steps(studio, tid) == list(range(1, 301))  # the redone steps replaced, not doubled


def test_scontrol_requeue_resumes_the_task_from_its_checkpoint_in_the_same_job(real: Studio) -> None:
    """`scontrol requeue` (what a preemption does): Slurm SIGTERMs the job; the trainer saves a checkpoint at
    its next step and the runner records the interruption; the studio makes the requeued job the task's
    next attempt, which resumes from that checkpoint and completes with each step once."""
    tid = submit_tiny(real, 60, 10)
    wait_for(
        lambda: real.task(tid)["step"] >= 12 and real.task(tid)["status"] == "training", timeout=240, what="step 12"
    )
    job = real.task(tid)["slurm"]["job_id"]
    slurm("scontrol", "requeue", job)
    done = real.wait_status(tid, "completed", "failed", "cancelled", "paused", timeout=300)
    assert done["status"] == "completed", done
    first, second = done["attempts"]
    assert f"Slurm requeued the Slurm job {job}; stopped by SIGTERM from outside the studio" in first["end_reason"]
    assert second["resumed_from_step"] == first["end_step"], done["attempts"]  # it checkpointed at the next step
    assert done["slurm"]["job_id"] == job  # the same job, run again by Slurm
    assert progress_steps(real, tid) == list(range(1, 61))


def test_the_same_start_command_after_a_crash_serves_at_once_while_the_job_fills_the_partition(studio: Studio) -> None:
    """Issue 21: the studio is SIGKILLed while its task's job runs; the same `--executor slurm --partition`
    command brings it back within seconds (the settings were checked already: no check job waits behind the
    task's job), and it keeps showing the task advance."""
    # --exclusive: the job takes the whole node, as a job that asks for no --mem takes all its memory.
    flags = ("--executor", "slurm", "--partition", "debug", "--sbatch-option=--exclusive")
    # The first start runs its check job, which with --exclusive needs the node to itself: let the jobs of
    # the tests before this one finish first (they are cancelled at their end, and take a moment to go).
    wait_for(lambda: slurm("squeue", "--noheader").strip() == "", timeout=120, what="the node to be free")
    studio.start(*flags)
    tid = submit(studio, "scripted steps=600 delay=0.1")
    wait_for(lambda: (studio.task(tid).get("slurm") or {}).get("state") == "RUNNING", timeout=120, what="the job")
    wait_for(lambda: studio.task(tid)["step"] >= 3, timeout=120, what="progress from the job")
    studio.kill(signal.SIGKILL)
    t0 = time.monotonic()
    studio.start(*flags)
    took = time.monotonic() - t0
    assert took < 5, f"the studio took {took:.1f}s to serve again"
    assert "not checked again" in (studio.home / "studio.log").read_text() + studio.log_tail()
    at = studio.task(tid)["step"]
    wait_for(lambda: studio.task(tid)["step"] >= at + 5, timeout=60, what="the task to keep advancing")
    studio.http.post(f"/api/tasks/{tid}/cancel").raise_for_status()
    studio.wait_status(tid, "cancelled", timeout=120)


def test_each_job_asks_for_the_memory_its_task_needs_so_a_second_runs_beside_the_first(studio: Studio) -> None:
    """Issue 21: a job that asks for no --mem may take a whole node's memory (the partition's default), and
    the next task waits for the node although it had room. Each job asks for its estimate (footprint.py):
    builtin:tiny's one process, 1 GiB; or the task's own --memory."""
    wait_for(lambda: slurm("squeue", "--noheader").strip() == "", timeout=120, what="the node to be free")
    studio.start("--executor", "slurm", "--partition", "debug", "--slots", "2")
    first = submit(studio, "scripted steps=600 delay=0.1")
    second = submit(studio, "scripted steps=600 delay=0.1", resources={"memory": "700M"})
    for tid in (first, second):
        wait_for(lambda t=tid: (job_of(t) or {}).get("state") == "RUNNING", timeout=120, what=f"job of {tid}")
    asked = {}
    for tid in (first, second):
        job = job_of(tid)
        assert job is not None
        shown = slurm("scontrol", "show", "job", job["id"])
        asked[tid] = re.search(r"MinMemoryNode=(\S+)", shown).group(1)  # type: ignore[union-attr]
    assert asked == {first: "1G", second: "700M"}, asked
    node = slurm("scontrol", "show", "node")
    real = int(re.search(r"RealMemory=(\d+)", node).group(1))  # type: ignore[union-attr]
    alloc = int(re.search(r"AllocMem=(\d+)", node).group(1))  # type: ignore[union-attr]
    assert alloc == 1024 + 700 < real, (alloc, real)  # both run at once, and the node keeps the rest
    assert "asking --mem=1024M" in (studio.home / "studio.log").read_text()
    for tid in (first, second):
        studio.http.post(f"/api/tasks/{tid}/cancel").raise_for_status()
    for tid in (first, second):
        studio.wait_status(tid, "cancelled", timeout=120)
