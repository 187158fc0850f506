"""The Slurm executor over ssh (`studio start --executor slurm --slurm-host HOST`), against a real sshd: the
development cluster's login node, `ssh ftstudio-login` (scripts/slurm-dev-cluster up starts it). The studio
runs with a SLURM_CONF that names no file, so every Slurm command that works went over ssh.

Skipped, with the reason, where the login node does not answer; in CI (CI=true) that fails instead, as a
missing cluster does (the `slurm` fixture)."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from slurm_cluster import FINAL_STATES, SlurmCluster, in_ci
from support import Studio, home_env, run_cli, sweep, wait_for

from ftstudio.execution.procs import tagged
from ftstudio.studio.store import Store

pytestmark = [pytest.mark.slow, pytest.mark.slurm]

LOGIN = "ftstudio-login"


def refuse(why: str) -> None:
    if in_ci():
        pytest.fail(f"CI needs the development cluster's login node: {why}", pytrace=False)
    pytest.skip(why)


@pytest.fixture(scope="module")
def login(slurm: SlurmCluster) -> str:
    """The login node's ssh alias, once `ssh ftstudio-login true` works; skips without it (fails in CI)."""
    if shutil.which("ssh") is None:
        refuse("no ssh client (scripts/slurm-dev-cluster up installs openssh-client)")
    try:
        done = subprocess.run(
            ["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10", LOGIN, "true"],
            capture_output=True,
            text=True,
            timeout=30,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        refuse(f"`ssh {LOGIN} true` did not answer in 30s; scripts/slurm-dev-cluster up starts the login node")
    else:
        if done.returncode != 0:
            said = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
            refuse(f"`ssh {LOGIN} true` failed ({said}); scripts/slurm-dev-cluster up starts the login node")
    return LOGIN


@pytest.fixture
def odd_home(tmp_path: Path, slurm: SlurmCluster) -> Iterator[Path]:
    """A data home whose path a shell or sbatch would misread if it were not quoted for them: a space, a
    quote, a `$`, and a `%j` (sbatch's --output pattern for the job id)."""
    home = tmp_path / "lab's home $HOME 100%j"
    yield home
    sweep(home)
    tasks = home / "tasks"
    for tid in sorted(p.name for p in tasks.iterdir()) if tasks.is_dir() else []:
        slurm.run("scancel", f"--name=ftstudio-{tid}", check=False)


def submit(studio: Studio, name: str) -> str:
    r = studio.http.post("/api/tasks", json={"name": name, "config": {"preset": "cpu-demo"}})
    assert r.status_code == 201, r.text
    return r.json()["id"]


def test_a_studio_on_a_login_node_runs_and_cancels_slurm_jobs_over_ssh(
    login: str, odd_home: Path, slurm: SlurmCluster
) -> None:
    # No SLURM_CONF here: a Slurm command run on this side could not reach the cluster.
    env = home_env(odd_home, scripted=True, SLURM_CONF=str(odd_home.parent / "no-such-slurm.conf"))
    studio = Studio(odd_home, env)
    try:
        studio.start("--executor", "slurm", "--partition", "debug", "--slurm-host", login)
        # The studio serves at once and runs its check job beside it; new fine-tunes go to Slurm once it passed.
        said = wait_for(
            lambda: "Slurm partition debug is ready: job" in (t := (odd_home / "studio.log").read_text()) and t,
            timeout=120,
            what="the check job to pass",
        )
        assert f"sees the home {odd_home}; new fine-tunes go to Slurm from now on" in said, said
        assert Store(odd_home / "studio.db").setting("executor") == "slurm"

        tid = submit(studio, "scripted steps=20 delay=0.1")
        done = studio.wait_status(tid, "completed", "failed", "cancelled", "interrupted", timeout=180)
        assert done["status"] == "completed", (done["error"], studio.log_tail())
        assert done["step"] == 20 and done["executor"] == "slurm"
        job = done["slurm"]["job_id"]
        assert job.isdigit() and slurm.state(job) == ("COMPLETED", "None")
        log = (odd_home / "tasks" / tid / "training.log").read_text()  # --output as given, `%j` and all
        assert "starting training for task" in log and "training completed" in log

        tid = submit(studio, "scripted steps=400 delay=0.05")
        wait_for(lambda: studio.task(tid)["step"] >= 5, timeout=120, what="progress from the job")
        job = studio.task(tid)["slurm"]["job_id"]
        r = studio.http.post(f"/api/tasks/{tid}/cancel")
        assert r.status_code == 200, r.text
        done = studio.wait_status(tid, "cancelled", "failed", "completed", "interrupted", timeout=120)
        assert done["status"] == "cancelled", done
        # Cancel from the studio, over ssh, leaves no job and no process of the task.
        wait_for(lambda: (slurm.state(job) or ("GONE",))[0] in FINAL_STATES, timeout=60, what="the job to end")
        assert slurm.state(job)[0] == "CANCELLED"  # type: ignore[index]
        wait_for(lambda: not tagged(tid), timeout=30, what="no process of the task left")
    finally:
        studio.stop()


@pytest.mark.parametrize(
    ("host", "why"),
    [
        ("no-such-host.invalid", "ssh: Could not resolve hostname no-such-host.invalid"),
        ("nobody@ftstudio-login", "Permission denied (publickey)"),  # reached, but the key is not let in
    ],
)
def test_a_login_node_that_cannot_be_reached_is_refused_at_start_naming_it_and_the_fix(
    login: str, home: Path, host: str, why: str
) -> None:
    r = run_cli(home, "studio", "start", "--executor", "slurm", "--partition", "debug", "--slurm-host", host)
    assert r.returncode != 0
    [line] = r.stderr.strip().splitlines()
    assert line.startswith(f"error: cannot reach the login node {host} over ssh ("), line
    assert why in line and line.endswith(f"check that `ssh {host} true` works from here without a password"), line
    store = Store(home / "studio.db")
    assert store.setting("executor") in (None, "local") and store.setting("slurm") is None  # nothing remembered
