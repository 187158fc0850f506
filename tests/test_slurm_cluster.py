"""The Slurm cluster works: a batch job runs on it and writes into the test's
directory, which the job sees as the test does (the shared filesystem the
Slurm executor needs)."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
from slurm_cluster import SlurmCluster

pytestmark = pytest.mark.slurm


def test_a_batch_job_runs_and_writes_to_the_shared_filesystem(slurm: SlurmCluster, tmp_path: Path) -> None:
    out = tmp_path / "written-by-the-job"
    job = slurm.sbatch(
        "--job-name=ftstudio-cluster-check",
        f"--output={tmp_path / 'job.log'}",
        "--wrap",
        f'echo "$SLURM_JOB_ID" > {shlex.quote(str(out))}',
        cwd=tmp_path,
    )
    assert slurm.wait_final(job, timeout=12) == "COMPLETED", (tmp_path / "job.log").read_text()
    assert out.read_text().strip() == job
