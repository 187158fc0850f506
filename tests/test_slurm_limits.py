"""Slurm's own limits, against a real Slurm cluster (scripts/slurm-dev-cluster up; `make test` brings it up
in CI): a job's time limit as Slurm enforces it, and a home the compute nodes cannot see.

Skipped, with the reason, where no cluster answers; in CI (CI=true) a missing cluster fails instead
(the `slurm` fixture)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from collections.abc import Iterator
from datetime import datetime
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
from slurm_cluster import cancel_tasks, current_cluster, slurm_env
from support import Studio, home_env, progress_steps, run_cli, submit_tiny, wait_for

from ftstudio.checkpoints import MARKER
from ftstudio.studio.store import Store

# slurm_now (conftest.py): every test skips without a cluster, fails without one in CI.
pytestmark = [pytest.mark.slow, pytest.mark.slurm, pytest.mark.usefixtures("slurm_now")]

LIMIT_REACHED = re.compile(r"the Slurm job \d+ reached its time limit of 1 minute \(--time 1\)")


@pytest.fixture
def one_minute(home: Path) -> Iterator[Studio]:
    """A studio on Slurm whose jobs run the real trainer with a time limit of one minute and no warning before
    it (B:USR1@0: Slurm sends a warning only when its time is above 0)."""
    s = Studio(home, home_env(home, **slurm_env()))
    yield s.start("--executor", "slurm", "--partition", "debug", "--time", "1", "--slurm-signal", "B:USR1@0")
    s.stop()
    cancel_tasks(home)


STEPS = 60
"""Long enough that the run cannot end in the moment between checkpoint-3 and the test's SIGSTOP."""


def test_a_job_at_its_time_limit_is_ended_by_slurm_and_the_task_resumes_in_a_new_job(
    one_minute: Studio, home: Path
) -> None:
    """Slurm itself ends the job: its time-limit pass (every 30 s) finds the job past its minute, sends every
    process of it SIGCONT and SIGTERM, and SIGKILL after KillWait (5 s here); the job ends TIMEOUT. The trainer
    saves a checkpoint at its next step if it can in that time. The studio names the limit and resumes the task
    by itself as its next attempt, in a new job, from its newest complete checkpoint, each step once.

    Once the trainer has a checkpoint the test stops it (SIGSTOP), standing for a step longer than the time
    left: the run is still going when the limit comes, however fast this machine trains. Slurm's own SIGCONT,
    before its SIGTERM, wakes it."""
    cluster = current_cluster()
    tid = submit_tiny(one_minute, STEPS, 3, name="one minute on slurm")
    tdir = home / "tasks" / tid
    # Stopped the moment checkpoint-3 is complete, watched on disk: on a quick machine the whole run takes a
    # few seconds, and a trainer stopped after its last step would rightly end `completed`.
    launch = wait_for(lambda: tdir.joinpath("launch.json").exists() and json.loads(tdir.joinpath("launch.json").read_text()),
                      timeout=240, what="the first job's runner")  # fmt: skip
    assert launch["attempt"] == 1, launch
    wait_for(lambda: (tdir / "checkpoints" / "checkpoint-3" / MARKER).exists(), timeout=240, interval=0.01,
             what="checkpoint-3")  # fmt: skip
    os.kill(launch["trainer_pid"], signal.SIGSTOP)
    assert not (tdir / "exit.json").exists() and not (tdir / "adapter").exists(), "the run ended before its stop"
    job = one_minute.task(tid)["slurm"]["job_id"]
    assert cluster.wait_final(job, timeout=120) == "TIMEOUT"
    done = one_minute.wait_status(tid, "completed", "failed", "cancelled", "paused", timeout=300)
    assert done["status"] == "completed", done
    attempts = done["attempts"]
    assert attempts[0]["end_reason"].startswith(f"the Slurm job {job} reached its time limit of 1 minute (--time 1)")
    # The next job has a minute too: on a loaded machine it may reach it as well, and goes the same way.
    for ended, resumed in pairwise(attempts):
        assert LIMIT_REACHED.match(ended["end_reason"]), attempts
        if "after saving checkpoint" in ended["end_reason"]:  # within KillWait: the checkpoint of the next step
            assert resumed["resumed_from_step"] == ended["end_step"], attempts
        else:  # SIGKILLed first: the newest periodic checkpoint
            assert resumed["resumed_from_step"] in range(3, ended["end_step"] + 1, 3), attempts
    assert len(attempts) >= 2 and done["slurm"]["job_id"] != job, attempts
    assert progress_steps(one_minute, tid) == list(range(1, STEPS + 1))  # each step once, across the jobs


def private_mount(seen: Path, home: Path) -> list[str]:
    """A command prefix: what follows runs in a mount namespace of its own where `home` is `seen` (a bind
    mount), while every other process, Slurm's jobs included, sees the directory `home` itself."""
    script = 'mount --bind "$1" "$2" && shift 2 && exec "$@"'
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", str(seen), str(home)]


def test_a_home_the_compute_nodes_cannot_see_is_refused_and_nothing_is_remembered(home: Path, tmp_path: Path) -> None:
    """`studio start --executor slurm` in a mount namespace where the home is a directory only it sees: it writes
    its probe there, and the check job, which slurmd starts in the machine's namespace, finds an empty directory
    at the home's path. The studio serves at once (the check job runs beside it); the settings are refused with
    the fix as soon as the job has ended, and the home keeps running new tasks where it did."""
    seen = tmp_path / "seen-by-the-studio-only"
    home.mkdir()
    seen.mkdir()
    wrapper = private_mount(seen, home)
    try:
        probe = subprocess.run([*wrapper, "true"], capture_output=True, text=True, timeout=30)
    except FileNotFoundError as e:
        pytest.skip(f"no unshare here ({e})")
    if probe.returncode != 0:
        pytest.skip(f"a private mount namespace is not permitted here: {probe.stderr.strip()}")

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return run_cli(home, *args, wrapper=wrapper, **slurm_env())

    r = cli("studio", "start", "--executor", "slurm", "--partition", "debug")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "the studio now runs a check job" in r.stdout and "new fine-tunes wait in the queue" in r.stdout
    try:

        def failed() -> dict[str, Any] | None:
            check = json.loads(cli("studio", "status", "--json").stdout).get("executor", {}).get("last_check")
            return check if check and not check["passed"] else None

        check = wait_for(failed, timeout=180, interval=1, what="the check job to fail")
        status = cli("studio", "status").stdout
    finally:
        cli("studio", "stop")
    found = re.search(r"Slurm's check job (\d+) ", check["line"])
    assert found is not None, check
    job = found[1]
    assert check["line"] == (
        f"the home {home} is not shared with the compute nodes: Slurm's check job {job} did not see a file "
        "the studio had just written there (the job ended FAILED); put the home (FTSTUDIO_HOME) on a filesystem "
        "the studio and the nodes both see, at the same path, and start again. Nothing was changed: new "
        "fine-tunes still run where they did"
    )
    assert "new fine-tunes: this machine" in status and "failed, nothing changed" in status, status
    ended = current_cluster().run("squeue", "--noheader", "--states=all", f"--jobs={job}", "--format=%e").stdout.strip()
    assert check["at"] - datetime.fromisoformat(ended).timestamp() < 15, (ended, check)  # as soon as it ended
    # Nothing remembered, and nothing left: the store the studio wrote (in its view of the home) still says
    # local, the probe is gone, and the directory the nodes see was never written.
    store = Store(seen / "studio.db")
    assert store.setting("executor") in (None, "local") and store.setting("slurm") is None
    assert list((seen / "slurm-check").iterdir()) == []
    assert list(home.iterdir()) == []
