"""The Slurm cluster the Slurm tests run against, driven through Slurm's own commands.

`make test` brings up the one-node development cluster (scripts/slurm-dev-cluster)
before pytest and stops it after; by hand: `scripts/slurm-dev-cluster up`. The
cluster is found through `SLURM_CONF` when it is set, else through the
development cluster's state directory (`$FTSTUDIO_SLURM_DIR`, default
/var/lib/ftstudio-slurm). Jobs run on this machine, so a test's tmp_path is
on a filesystem both the test and the job see.

Without a cluster the `slurm` fixture skips, saying why; in CI (`CI=true`) it
fails instead, because CI must run the Slurm tests against the real cluster.

The `slurm2` fixture is the emulated two-node cluster (`scripts/slurm-dev-cluster
up2`, brought up by `make test` too): its own slurm.conf in `$FTSTUDIO_SLURM2_DIR`
(default /var/lib/ftstudio-slurm2), never `SLURM_CONF`; nodes fts1 and fts2, each
with its own host name and address, sharing this machine's file systems.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_STATE_DIR = Path("/var/lib/ftstudio-slurm")
DEFAULT_STATE_DIR2 = Path("/var/lib/ftstudio-slurm2")
# A controller that is down makes a client command retry for 9-18 s before it gives up.
COMMAND_TIMEOUT = 30.0
# States after which a job never runs again (unless someone requeues it by hand).
FINAL_STATES = frozenset(
    {
        "BOOT_FAIL",
        "CANCELLED",
        "COMPLETED",
        "DEADLINE",
        "FAILED",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "PREEMPTED",
        "TIMEOUT",
    }
)
# Node states in which the node starts jobs.
USABLE_NODE_STATES = frozenset({"idle", "mixed", "allocated", "completing"})


class NoCluster(Exception):
    """No Slurm cluster answers here; the message says why."""


def in_ci() -> bool:
    return os.environ.get("CI") == "true"


def cluster_conf() -> Path:
    """The slurm.conf the client commands read."""
    if os.environ.get("SLURM_CONF"):
        return Path(os.environ["SLURM_CONF"])
    return Path(os.environ.get("FTSTUDIO_SLURM_DIR") or DEFAULT_STATE_DIR) / "slurm.conf"


def cluster2_conf() -> Path:
    """The two-node development cluster's slurm.conf."""
    return Path(os.environ.get("FTSTUDIO_SLURM2_DIR") or DEFAULT_STATE_DIR2) / "slurm.conf"


@dataclass
class SlurmCluster:
    """A reachable cluster: its configuration, the environment for its client commands,
    and the jobs the tests submitted (cancelled at the end of the session)."""

    conf: Path
    env: dict[str, str]
    submitted: list[str] = field(default_factory=list)

    def run(self, *args: str, timeout: float = COMMAND_TIMEOUT, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run a client command (`squeue`, `scontrol`, ...) against this cluster."""
        done = subprocess.run(args, env=self.env, capture_output=True, text=True, timeout=timeout, check=False)
        if check and done.returncode != 0:
            raise AssertionError(f"{' '.join(args)} exited {done.returncode}: {done.stderr.strip()}")
        return done

    def sbatch(self, *args: str, cwd: Path) -> str:
        """Submit a batch job (`sbatch --parsable ARGS`) and return its id."""
        job_id = self.run("sbatch", "--parsable", f"--chdir={cwd}", *args).stdout.strip().split(";")[0]
        assert job_id.isdigit(), f"sbatch printed {job_id!r}"
        self.submitted.append(job_id)
        return job_id

    def state(self, job_id: str) -> tuple[str, str] | None:
        """(state, reason) as squeue shows it, e.g. ("PENDING", "Resources"); None once
        the controller has forgotten the job (MinJobAge after it ended)."""
        done = self.run("squeue", "--states=all", "--noheader", f"--jobs={job_id}", "--format=%T %r", check=False)
        if done.returncode != 0:
            if "Invalid job id" in done.stderr:
                return None
            raise AssertionError(f"squeue exited {done.returncode}: {done.stderr.strip()}")
        state, _, reason = done.stdout.strip().partition(" ")
        return state, reason

    def wait_final(self, job_id: str, timeout: float) -> str:
        """Wait until the job has ended; return its final state (COMPLETED, FAILED, ...)."""
        deadline = time.monotonic() + timeout
        seen: tuple[str, str] | None = None
        while time.monotonic() < deadline:
            seen = self.state(job_id)
            if seen is None or seen[0] in FINAL_STATES:
                break
            time.sleep(0.2)
        else:
            raise AssertionError(f"job {job_id} still {seen} after {timeout}s")
        assert seen is not None, f"job {job_id} was forgotten before it was seen ending"
        return seen[0]

    def cancel_submitted(self) -> None:
        if self.submitted:
            self.run("scancel", *self.submitted, check=False)


def connect(conf: Path | None = None, *, nodes: int = 1, up: str = "up") -> SlurmCluster:
    """The cluster of `conf` (default: cluster_conf()), once `sinfo` answers and `nodes`
    of its nodes take jobs; else NoCluster. `up` names the script's command that starts it."""
    if shutil.which("sinfo") is None:
        raise NoCluster(f"Slurm's client commands are not installed (scripts/slurm-dev-cluster {up} installs them)")
    conf = conf or cluster_conf()
    if not conf.is_file():
        raise NoCluster(f"no {conf}; start the development cluster: scripts/slurm-dev-cluster {up}")
    cluster = SlurmCluster(conf, {**os.environ, "SLURM_CONF": str(conf)})
    try:
        done = cluster.run("sinfo", "--noheader", "--Node", "--format=%N %T", check=False)
    except subprocess.TimeoutExpired:
        raise NoCluster(f"sinfo did not answer in {COMMAND_TIMEOUT:.0f}s (SLURM_CONF={conf})") from None
    if done.returncode != 0:
        raise NoCluster(f"sinfo failed (SLURM_CONF={conf}): {done.stderr.strip()}; is the cluster up?")
    # One line per node and partition: "fts1 idle".
    states = dict(line.split(maxsplit=1) for line in done.stdout.splitlines() if line.strip())
    usable = sorted(node for node, state in states.items() if state in USABLE_NODE_STATES)
    if len(usable) < nodes:
        seen = ", ".join(f"{node} {state}" for node, state in sorted(states.items())) or "none"
        wanted = "no node takes jobs" if nodes == 1 else f"{len(usable)} of the {nodes} nodes needed take jobs"
        raise NoCluster(f"{wanted} (node states: {seen})")
    return cluster


def connect2() -> SlurmCluster:
    """The emulated two-node cluster (scripts/slurm-dev-cluster up2), both nodes taking jobs."""
    return connect(cluster2_conf(), nodes=2, up="up2")


# The cluster of the test running now, for the module-level helpers of the Slurm tests; set by the `slurm_now`
# fixture (conftest.py), which a test module asks for with pytest.mark.usefixtures("slurm_now").
_now: SlurmCluster | None = None


def use(cluster: SlurmCluster) -> None:
    global _now
    _now = cluster


def current_cluster() -> SlurmCluster:
    """The cluster the `slurm_now` fixture set for this test."""
    assert _now is not None, 'no Slurm cluster: the test module needs pytest.mark.usefixtures("slurm_now")'
    return _now


def slurm_env() -> dict[str, str]:
    """What a studio or the CLI needs in its environment to reach the current cluster."""
    return {"SLURM_CONF": str(current_cluster().conf)}


def cancel_tasks(home: Path) -> None:
    """scancel the jobs of every task of `home` (by job name), whatever state they are in."""
    for tid in os.listdir(home / "tasks") if (home / "tasks").is_dir() else []:
        subprocess.run(["scancel", f"--name=ftstudio-{tid}"], env={**os.environ, **slurm_env()}, check=False)
