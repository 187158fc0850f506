"""The queue and the lifecycle on the page, against a real studio with the scripted trainer:
a queued task's place and why, freeze and resume, retry and extend as attempt 2, and the
queue panel of the task list."""

from __future__ import annotations

import re
from typing import Any

import psutil
import pytest
from support import run_cli, wait_for

from .livestudio import ARTIFACTS, LiveStudio, task_processes

pytestmark = pytest.mark.browser

CPU = {"preset": "cpu-demo"}


def submit(studio: LiveStudio, name: str) -> str:
    return str(studio.api("POST", "/api/tasks", {"name": name, "config": CPU})["id"])


def trainer_states(studio: LiveStudio, task_id: str) -> set[str]:
    states = set()
    for p in task_processes(studio.home, task_id):
        try:
            states.add(p.status())
        except psutil.Error:
            pass
    return states


def test_the_queue_freeze_and_resume_on_the_page(scripted: LiveStudio, page: Any) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    studio = scripted.start()  # one training slot
    first = submit(studio, "first scripted steps=100000 delay=0.05")
    studio.wait_status(first, "training", timeout=30)
    second = submit(studio, "second scripted steps=40 delay=0.1")
    third = submit(studio, "third scripted steps=3 delay=0.01")

    # The list: the queue panel says what trains on which slot and what waits, and the rows say where they stand.
    page.goto(studio.page_url("#/tasks"))
    running = page.locator("#queue-running li", has_text="first")
    running.wait_for()
    assert "slot 0" in running.inner_text()
    waiting = page.locator("#queue-waiting li")
    waiting.nth(1).wait_for()
    first_waiting, second_waiting = waiting.all_inner_texts()
    assert re.match(r"#1 .*second.*waiting for a training slot", first_waiting), first_waiting
    assert re.match(r"#2 .*third.*waiting behind task .*second.* for a training slot", second_waiting), second_waiting
    row = page.locator(f'tr[data-id="{third}"] .queue-note')
    place = row.inner_text()
    assert re.match(r"#2 in the queue — waiting behind task “second [^”]+” for a training slot", place), place
    page.locator("#queue-panel").screenshot(path=str(ARTIFACTS / "queue-panel.png"))

    # Freeze: the caveat that it still holds its memory, and the process is stopped, not gone.
    page.goto(studio.page_url(f"#/tasks/{first}"))
    page.locator('.badge[data-status="training"]').wait_for()
    freeze = page.locator('#task-actions button[data-action="freeze"]')
    assert "memory and GPUs stay held" in (freeze.get_attribute("title") or "")
    freeze.click()
    page.locator('.badge[data-status="paused"]').wait_for()
    notice = page.locator('#task-notice[data-kind="frozen"]')
    notice.wait_for()
    assert notice.inner_text().startswith(
        "Frozen: the process is stopped where it was; its memory and GPU stay held until you resume or cancel."
    )
    assert "slot 0" in notice.inner_text()
    page.screenshot(path=str(ARTIFACTS / "task-view-frozen.png"))
    assert page.locator('#attempts-rows tr[data-state="frozen"]').count() == 1
    wait_for(lambda: "stopped" in trainer_states(studio, first), timeout=10, what="the trainer to be stopped")
    frozen_at = studio.task(first)["step"]
    # Frozen, it still holds the slot: the others still wait.
    assert studio.task(second)["status"] == "queued"

    page.locator('#task-actions button[data-action="resume"]').click()
    page.locator('.badge[data-status="training"]').wait_for()
    assert page.locator("#task-notice").is_hidden()
    page.wait_for_function(
        "n => Number(document.querySelector('#stat-step').textContent.split('/')[0].replace(/,/g, '')) > n",
        arg=frozen_at + 5,
    )
    assert page.locator('#attempts-rows tr[data-state="running"]').count() == 1

    # The third task's place, live: #2 behind the second; when the first ends, #1 while the second trains.
    page.goto(studio.page_url(f"#/tasks/{third}"))
    queued = page.locator('#task-notice[data-kind="queued"]')
    queued.wait_for()
    assert re.match(r"#2 in the queue — waiting behind task \S+ for a training slot", queued.inner_text())
    assert page.locator("#task-notice a").inner_text() == second
    studio.api("POST", f"/api/tasks/{first}/cancel")
    page.locator("#task-notice", has_text="#1 in the queue").wait_for(timeout=20_000)
    assert second in page.locator("#task-notice").inner_text()
    page.locator('.badge[data-status="completed"]').wait_for(timeout=30_000)
    assert page.locator("#task-notice").is_hidden()


def test_retry_and_extend_run_attempt_2_and_the_chart_keeps_each_step_once(scripted: LiveStudio, page: Any) -> None:
    studio = scripted.start("--slots", "2")
    failing = submit(studio, "scripted steps=3 exit=3")
    done = submit(studio, "scripted steps=5 delay=0.02")
    studio.wait_status(failing, "failed", timeout=30)
    studio.wait_status(done, "completed", timeout=30)

    # Retry a failed task: attempt 2 shows in the timeline, runs, and fails again in the same words.
    page.goto(studio.page_url(f"#/tasks/{failing}"))
    page.locator("#task-error").wait_for()
    assert page.locator("#attempts-rows tr").count() == 1
    page.locator('#task-actions button[data-action="retry"]').click()
    page.locator('#attempts-rows tr[data-attempt="2"]').wait_for()
    page.locator('.badge[data-status="failed"]').wait_for(timeout=30_000)
    page.locator('#attempts-rows tr[data-attempt="2"][data-state="ended"]').wait_for()
    rows = page.locator("#attempts-rows tr").all_inner_texts()
    assert len(rows) == 2 and all("exit code 3" in r or "scripted failure" in r for r in rows), rows

    # Extend a completed task through the dialog: attempt 2 is queued, trains, completes again.
    page.goto(studio.page_url(f"#/tasks/{done}"))
    page.locator("#download-adapter").wait_for()
    page.locator('#task-actions button[data-action="extend"]').click()
    dialog = page.get_by_role("dialog")
    dialog.wait_for()
    assert "More epochs" in dialog.inner_text()
    assert "attempt 2" in dialog.inner_text()
    # The studio's refusal shows in the dialog, which stays open to fix the number.
    page.locator("#extend-amount").fill("20000")
    page.keyboard.press("Enter")
    page.locator("#extend-error", has_text="at most 10,000").wait_for()
    assert studio.task(done)["status"] == "completed"
    page.locator("#extend-amount").fill("2")
    page.keyboard.press("Enter")
    dialog.wait_for(state="detached")
    page.locator('#attempts-rows tr[data-attempt="2"]').wait_for()
    assert studio.task(done)["config"]["optim"]["epochs"] == 6
    page.locator('#attempts-rows tr[data-attempt="2"][data-state="ended"]').wait_for(timeout=30_000)
    page.locator('.badge[data-status="completed"]').wait_for()
    page.locator("#download-adapter").wait_for()

    # The scripted trainer keeps no checkpoint, so attempt 2 started over: its steps replaced attempt 1's in the
    # stored history. The open page got both attempts' events as they came; steps 1-5 of attempt 2 redraw the
    # same points.
    stored = [e for e in studio.api("GET", f"/api/tasks/{done}/metrics")["events"] if e["kind"] == "progress"]
    assert [e["step"] for e in stored] == [1, 2, 3, 4, 5]
    chart = page.locator("div.chart")
    wait_for(lambda: chart.get_attribute("data-progress-events") == "10", timeout=10, what="10 progress events drawn")
    assert chart.get_attribute("data-points") == "5"
    # Where attempt 2 began is marked on the chart: from the beginning, as it kept no checkpoint.
    wait_for(lambda: chart.get_attribute("data-attempts") == "2@0", timeout=10, what="attempt 2 marked on the chart")
    mark = page.locator("div.chart .attempt-mark")
    assert mark.get_attribute("title") == "attempt 2 started from the beginning"
    assert mark.inner_text() == "attempt 2" and mark.is_visible()
    page.locator("#attempts-title").scroll_into_view_if_needed()
    page.screenshot(path=str(ARTIFACTS / "task-view-attempts.png"), full_page=True)


def test_the_page_says_who_stopped_each_attempt_and_only_the_run_counts(scripted: LiveStudio, page: Any) -> None:
    """A runner killed from outside is the machine's doing: resumed, never counted. A trainer that kills
    itself at the same step every attempt is the run's: counted, and failed the second time there."""
    studio = scripted.start("--slots", "2")
    crashing = submit(studio, "crashing scripted steps=6 delay=0.05 killed=3")
    healthy = submit(studio, "healthy scripted steps=30 delay=0.1")
    tagged_runner = lambda: [p for p in task_processes(studio.home, healthy) if "ftstudio.runner" in p.cmdline()]  # noqa: E731
    wait_for(
        lambda: studio.task(healthy)["step"] >= 3 and tagged_runner(), timeout=60, what="the healthy run at step 3"
    )
    for runner in tagged_runner():
        runner.kill()  # from outside, as a person's kill -9 or a crashed machine would
    failed = studio.wait_status(crashing, "failed", timeout=60)
    assert failed["error"].startswith("interrupted twice in a row at step 3"), failed["error"]
    done = studio.wait_status(healthy, "completed", timeout=120)
    assert [a["end_cause"] for a in failed["attempts"]] == ["run", "run"], failed["attempts"]
    assert done["attempts"][0]["end_cause"] == "machine" and done["restarts"] == 0, done["attempts"]
    # The CLI says the same.
    history = run_cli(studio.home, "history", healthy).stdout
    assert "attempt 1 " in history and "(stopped by the machine: not counted against resume.max_restarts)" in history
    shown = run_cli(studio.home, "show", crashing).stdout
    assert "0 time(s) by the machine" in shown and "2 by the run itself (1 of 3 automatic restarts used)" in shown, (
        shown
    )

    page.goto(studio.page_url(f"#/tasks/{healthy}"))
    first = page.locator('#attempts-rows tr[data-attempt="1"]')
    first.locator(".cause-machine").wait_for()
    assert "by the machine" in first.inner_text()
    assert "resume.max_restarts" in (first.locator(".cause").get_attribute("title") or "")
    page.goto(studio.page_url(f"#/tasks/{crashing}"))
    page.locator('#attempts-rows tr[data-attempt="2"] .cause-run').wait_for()
    assert page.locator("#attempts-rows .cause-run").count() == 2
