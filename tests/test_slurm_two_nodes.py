"""Multi-node jobs on the emulated two-node cluster (scripts/slurm-dev-cluster up2; `make test`
brings it up in CI): two slurmd, each in its own network, UTS and mount namespaces, so each node
has its own host name and address, and the file systems are shared.

What multi-node training needs of a cluster, for real: `srun` inside an `sbatch --nodes=2` job
starts one task per node, and torchrun's c10d rendezvous on the first node's host name lets the
two nodes' processes form one gloo process group over the nodes' network.

Skipped, with the reason, where the two-node cluster is not up; in CI (CI=true) it fails instead
(the `slurm2` fixture)."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from slurm_cluster import SlurmCluster
from support import Studio, home_env, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.slurm]


def job_nodes(cluster: SlurmCluster, job: str) -> list[str]:
    """The job's nodes, in the order Slurm gives them (the first runs the batch script)."""
    nodelist = cluster.run("squeue", "--states=all", "--noheader", f"--jobs={job}", "--format=%N").stdout.strip()
    return cluster.run("scontrol", "show", "hostnames", nodelist).stdout.split()


def finished(cluster: SlurmCluster, job: str, log: Path, timeout: float) -> None:
    state = cluster.wait_final(job, timeout=timeout)
    assert state == "COMPLETED", f"job {job} ended {state}:\n{log.read_text() if log.exists() else '(no log)'}"


def test_srun_runs_one_task_on_each_node(slurm2: SlurmCluster, tmp_path: Path) -> None:
    log = tmp_path / "job.log"
    job = slurm2.sbatch(
        "--job-name=ftstudio-two-nodes",
        "--nodes=2",
        "--ntasks-per-node=1",
        f"--output={log}",
        "--wrap",
        "srun hostname",
        cwd=tmp_path,
    )
    finished(slurm2, job, log, timeout=30)
    nodes = job_nodes(slurm2, job)
    assert len(nodes) == 2
    # Each node has its own host name, the node's name (sorted: the tasks' lines come in any order).
    assert sorted(log.read_text().split()) == sorted(nodes)


# Each rank: its host name, the address that name resolves to (gloo's default device binds
# to it), and its own established TCP connections other than to the two c10d stores (the
# rendezvous and the workers' store), that is gloo's. Rank 0 writes what all ranks saw.
ALL_REDUCE = """
import json, os, socket, sys
import torch
import torch.distributed as dist

def addr(hexaddr):
    ip, port = hexaddr.split(":")
    raw = bytes.fromhex(ip)
    # /proc/net/tcp*: the address in 32-bit words of host (little-endian) order.
    raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    if len(raw) == 16 and raw[:12] == bytes(10) + b"\\xff\\xff":
        raw = raw[12:]
    host = socket.inet_ntop(socket.AF_INET if len(raw) == 4 else socket.AF_INET6, raw)
    return host, int(port, 16)

def connections(skip_ports):
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = []
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        for line in open(table).read().splitlines()[1:]:
            f = line.split()
            if f[3] == "01" and f[9] in inodes:  # ESTABLISHED, this process's
                local, remote = addr(f[1]), addr(f[2])
                if local[1] not in skip_ports and remote[1] not in skip_ports:
                    found.append([f"{local[0]}:{local[1]}", f"{remote[0]}:{remote[1]}"])
    return found

dist.init_process_group("gloo")
rank = dist.get_rank()
total = torch.tensor([float(rank)])
dist.all_reduce(total)
rdzv_port = int(sys.argv[2])
me = {
    "rank": rank,
    "hostname": socket.gethostname(),
    "address": socket.gethostbyname(socket.gethostname()),
    "master": f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}",
    "gloo": connections({rdzv_port, int(os.environ["MASTER_PORT"])}),
}
ranks = [None] * dist.get_world_size()
dist.all_gather_object(ranks, me)
if rank == 0:
    with open(sys.argv[1], "w") as out:
        json.dump({"sum": total.item(), "ranks": ranks}, out)
dist.destroy_process_group()
"""

# The batch script runs on the job's first node; the rendezvous is there, on its host name,
# as on a real cluster. The port is the job's own, so jobs on the same nodes do not collide.
BATCH = """\
#!/bin/bash
set -euo pipefail
head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
port=$((20000 + SLURM_JOB_ID % 10000))
echo "batch script on $(hostname); rendezvous on $head:$port"
srun --ntasks-per-node=1 {python} -m torch.distributed.run --nnodes=2 --nproc_per_node=1 \\
    --rdzv_backend=c10d --rdzv_endpoint="$head:$port" --rdzv_id="$SLURM_JOB_ID" \\
    {script} {result} "$port"
"""


def test_torchrun_on_two_nodes_all_reduces_over_gloo(slurm2: SlurmCluster, tmp_path: Path) -> None:
    script = tmp_path / "all_reduce.py"
    script.write_text(ALL_REDUCE)
    result = tmp_path / "result.json"
    batch = tmp_path / "job.sh"
    batch.write_text(BATCH.format(python=sys.executable, script=script, result=result))
    log = tmp_path / "job.log"
    job = slurm2.sbatch(
        "--job-name=ftstudio-two-nodes-gloo",
        "--nodes=2",
        "--ntasks-per-node=1",
        f"--output={log}",
        str(batch),
        cwd=tmp_path,
    )
    # Two torch imports per node (torchrun's agent, the worker) on a shared, busy machine.
    finished(slurm2, job, log, timeout=240)
    first, second = job_nodes(slurm2, job)
    report = json.loads(result.read_text())
    ranks = {r["hostname"]: r for r in report["ranks"]}
    assert report["sum"] == 1.0, report
    assert sorted(ranks) == sorted([first, second]), report
    assert f"rendezvous on {first}:" in log.read_text()
    # Each node's name resolves to its own, non-loopback address, and gloo's connections
    # go between the two nodes' addresses.
    own = ranks[first]["address"]
    other = ranks[second]["address"]
    assert own != other and not own.startswith("127.") and not other.startswith("127."), report
    assert ranks[first]["gloo"], f"no gloo connection seen on {first}: {report}"
    for local, remote in ranks[first]["gloo"]:
        assert local.rpartition(":")[0] == own and remote.rpartition(":")[0] == other, report


# -- the studio's tasks over two nodes ---------------------------------------------------------------


@pytest.fixture
def studio2(slurm2: SlurmCluster, home: Path) -> Iterator[Studio]:
    """A studio submitting to the two-node cluster, whose jobs run the real trainer."""
    s = Studio(home, home_env(home, SLURM_CONF=str(slurm2.conf), OMP_NUM_THREADS="1"))
    yield s.start("--executor", "slurm", "--partition", "debug")
    s.stop()
    for tid in os.listdir(home / "tasks") if (home / "tasks").is_dir() else []:
        slurm2.run("scancel", f"--name=ftstudio-{tid}", check=False)


def test_a_fine_tune_over_two_nodes_pauses_resumes_and_completes_with_every_rank(studio2: Studio, home: Path) -> None:
    """resources.nodes=2: the job's runner starts srun, one launcher per node, their torchruns meet on
    the first node; a pause goes through srun to both nodes' ranks and the checkpoint holds both; the
    resumed attempt is a new two-node job, and every step happens once."""
    config = {
        "preset": "cpu-demo",
        "data": {"validation": "0", "max_length": 64},
        "optim": {"max_steps": 80, "batch_size": 2, "seed": 5},
        "checkpoint": {"every_steps": 50},
        "logging": {"eval_on_start": False},
        "resources": {"nodes": 2, "processes": 1},
    }
    r = studio2.http.post("/api/tasks", json={"name": "two nodes", "config": config})
    assert r.status_code == 201, r.text
    tid = r.json()["id"]
    tdir = home / "tasks" / tid
    wait_for(
        lambda: (
            studio2.task(tid)["step"] >= 4 or studio2.task(tid)["status"] not in ("queued", "preparing", "training")
        ),
        timeout=300,
        what="step 4 on two nodes",
    )
    assert studio2.task(tid)["status"] == "training", (tdir / "training.log").read_text()[-3000:]
    log = (tdir / "training.log").read_text()
    assert "node 0 (fts1) started its 1 training process(es)" in log and "node 1 (fts2)" in log, log[-3000:]
    first_job = studio2.task(tid)["slurm"]["job_id"]

    r = studio2.http.post(f"/api/tasks/{tid}/pause")
    assert r.status_code == 200, r.text
    paused = studio2.wait_status(tid, "paused", "failed", "interrupted", timeout=180)
    assert paused["status"] == "paused", (paused, (tdir / "training.log").read_text()[-3000:])
    ckpt = tdir / "checkpoints" / f"checkpoint-{paused['step']}"
    assert json.loads((ckpt / "ftstudio-complete.json").read_text())["ranks"] == 2  # both nodes' ranks in it

    assert studio2.http.post(f"/api/tasks/{tid}/resume").status_code == 200
    done = studio2.wait_status(tid, "completed", "failed", "cancelled", timeout=400)
    assert done["status"] == "completed", (done["error"], (tdir / "training.log").read_text()[-3000:])
    assert done["attempt"] == 2 and done["slurm"]["job_id"] != first_job
    assert done["attempts"][1]["resumed_from_step"] == paused["step"]
    events = studio2.http.get(f"/api/tasks/{tid}/metrics").json()["events"]
    assert [e["step"] for e in events if e["kind"] == "progress"] == list(range(1, 81))
    assert (tdir / "adapter" / "adapter_model.safetensors").is_file()
