"""The page for a task that runs as a Slurm job (a real cluster: the `slurm` fixture): its job and
what Slurm says of it, live, and a person's cancel from the page ending the job."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from slurm_cluster import SlurmCluster
from support import end_processes, free_port

from .livestudio import ARTIFACTS, LiveStudio, task_processes

pytestmark = [pytest.mark.browser, pytest.mark.slurm, pytest.mark.slow]


def test_the_task_view_names_its_slurm_job_and_cancel_ends_it(tmp_path: Path, slurm: SlurmCluster, page: Any) -> None:
    home = tmp_path / "home"
    studio = LiveStudio(home, free_port())
    studio.env.update(SLURM_CONF=str(slurm.conf), FTSTUDIO_TRAINER_MODULE="scripted_trainer")
    try:
        studio.start("--executor", "slurm", "--partition", "debug")
        task = studio.api(
            "POST", "/api/tasks", {"name": "scripted steps=600 delay=0.05", "config": {"preset": "cpu-demo"}}
        )
        page.goto(studio.page_url(f"#/tasks/{task['id']}"))
        meta = page.locator("p.meta")
        meta.filter(has_text="(running)").wait_for(timeout=60_000)
        job = studio.api("GET", f"/api/tasks/{task['id']}")["slurm"]["job_id"]
        assert f"Slurm job {job} (running)" in meta.inner_text()
        # The system panel says where new fine-tunes go, and that the check of these settings passed.
        executor = page.locator("#studio-executor")
        executor.filter(has_text="Slurm check passed").wait_for(timeout=30_000)
        assert "New fine-tunes run on Slurm partition debug." in executor.inner_text()
        page.screenshot(path=str(ARTIFACTS / "task-view-slurm.png"), full_page=True)
        # Freeze stops processes in place: on a cluster that is the operator's, so the page does not offer it.
        assert page.locator("#task-actions button").all_inner_texts() == ["Pause", "Cancel"]
        page.get_by_role("button", name="Cancel").click()
        page.locator('.badge[data-status="cancelled"]').wait_for(timeout=60_000)
        # The job ends too (COMPLETING while Slurm cleans up, then final).
        assert slurm.wait_final(job, timeout=60) in ("CANCELLED", "COMPLETED")
    finally:
        studio.stop()
        slurm.run("scancel", f"--name=ftstudio-{task['id']}" if "task" in locals() else "--name=none", check=False)
        end_processes(task_processes(home))
