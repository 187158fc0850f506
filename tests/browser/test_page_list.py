"""The task list stays responsive with 1,000 tasks: paged, filtered, newest first."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from support import free_port

from ftstudio.studio.store import Store
from ftstudio.studio.task import TaskStatus

from .livestudio import LiveStudio

pytestmark = pytest.mark.browser


def fill_store(home: Path, n: int) -> None:
    """n finished tasks written straight into the store (no process is ever started for them)."""
    home.mkdir(parents=True, exist_ok=True)
    store = Store(home / "studio.db")
    for i in range(n):
        long = i % 7 == 0  # names and models as people write them, to see the columns fit
        t = store.create_task(
            name=f"task {i:04d}" + (", llama-style chat tune on the lab's support tickets, 3 epochs" if long else ""),
            model="Qwen/Qwen2.5-0.5B-Instruct" if long else "builtin:tiny",
            dataset="builtin:sample",
            config={},
            tasks_root=home / "tasks",
        )
        dst = TaskStatus.FAILED if i % 10 == 0 else TaskStatus.CANCELLED
        store.transition(t.id, TaskStatus.QUEUED, dst, reason="test data", error="made up" if i % 10 == 0 else None)
    store.close()


def test_a_thousand_tasks_page_quickly(tmp_path: Path, page: Any) -> None:
    home = tmp_path / "home"
    fill_store(home, 1000)
    studio = LiveStudio(home, free_port())
    try:
        studio.start()
        assert studio.api("GET", "/api/tasks?limit=1")["total"] == 1000
        t0 = time.monotonic()
        page.goto(studio.page_url("#/tasks"))
        page.locator("#task-table tbody tr").nth(49).wait_for()
        first_paint = time.monotonic() - t0
        assert page.locator("#task-table tbody tr").count() == 50
        assert page.locator("#task-count").inner_text().startswith("1–50 of 1,000")
        assert page.locator("#task-table tbody tr").first.locator("td").first.inner_text() == "task 0999"

        page.get_by_role("button", name="Older →").click()
        page.locator("#task-table tbody tr").first.get_by_text("task 0949").wait_for()
        assert "page=2" in page.url

        page.get_by_label("Status").select_option("failed")
        page.locator("#task-count").get_by_text("of 100 failed").wait_for()
        assert set(page.locator("#task-table tbody tr").evaluate_all("rs => rs.map(r => r.dataset.status)")) == {
            "failed"
        }
        # The status is a word as well as a colour.
        assert page.locator("#task-table tbody tr .badge").first.inner_text().strip().endswith("Failed")

        # The main thread stays free: a click is handled within a frame or two while the list refreshes.
        lag = page.evaluate(
            """() => new Promise(done => { const t = performance.now();
                 requestAnimationFrame(() => requestAnimationFrame(() => done(performance.now() - t))); })"""
        )
        assert lag < 500, lag
        assert first_paint < 10, first_paint

        # Every column fits a 1280-px window beside the system panel (the Created column was cut off there).
        page.set_viewport_size({"width": 1280, "height": 800})
        page.get_by_label("Status").select_option("")
        page.locator("#task-count").get_by_text("of 1,000").wait_for()
        over = page.evaluate(
            "() => { const w = document.querySelector('#task-table').parentElement; return w.scrollWidth - w.clientWidth; }"
        )
        assert over <= 0, f"the task table is {over}px wider than its box at 1280 px"
    finally:
        studio.stop()
