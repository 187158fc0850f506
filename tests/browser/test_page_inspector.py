"""The dataset inspector on the New fine-tune form, in a real browser against a real studio: the crafted
files' known numbers, the histogram with its cut, the training view with the trained tokens highlighted,
and each warning's fix (a new max_length; a new dataset without the duplicates or the leaked rows, the
original file unchanged)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from test_inspector import duplicates_file, leakage_files, truncation_file

from .livestudio import ARTIFACTS, LiveStudio

pytestmark = pytest.mark.browser


def upload(page: Any, path: Path) -> None:
    page.locator("#dataset-file").set_input_files(
        files=[{"name": path.name, "mimeType": "application/jsonl", "buffer": path.read_bytes()}]
    )
    page.locator("#upload-status", has_text=f"Uploaded {path.name}").wait_for()


def advanced(page: Any, path: str) -> Any:
    field = page.locator(f'.field[data-path="{path}"] input, .field[data-path="{path}"] textarea').first
    if not field.is_visible():
        page.locator("summary", has_text="Advanced").first.click()
    return field


def test_the_inspector_shows_the_known_numbers_and_applies_its_fixes(
    studio: LiveStudio, page: Any, tmp_path: Path
) -> None:
    page.goto(studio.page_url("#/new"))
    page.locator("#inspector #inspect-shape").wait_for()  # builtin:sample, inspected as soon as the form opens

    # Truncation: 12 rows over max_length 64, 4 of them losing their whole response.
    upload(page, truncation_file(tmp_path / "trunc.jsonl"))
    field = advanced(page, "data.max_length")
    field.fill("64")
    page.locator("#inspect-truncation", has_text="12 rows exceed max_length 64; 4 lose their whole response").wait_for()
    assert page.locator("#inspector svg.histogram line.cut").count() == 2
    assert page.locator("#inspector svg.histogram rect").count() > 2
    # The rows as trained: the replies highlighted, what max_length cuts struck through somewhere.
    assert page.locator("#training-view mark.trained").count() >= 1
    for _ in range(20):
        if page.locator("#training-view span.dropped").count():
            break
        page.locator("#view-next").click()
    assert page.locator("#training-view span.dropped").count() == 1
    ARTIFACTS.mkdir(exist_ok=True)
    page.locator("#inspector").screenshot(path=str(ARTIFACTS / "new-inspector.png"))
    fix = page.locator("#fix-truncation")
    wanted = int(fix.inner_text().split()[-1])
    fix.click()
    assert field.input_value() == str(wanted) and wanted > 64
    page.locator("#inspect-truncation", has_text=f"exceed max_length {wanted}").wait_for()

    # Duplicates: exactly 7 exact and 3 near; the fix writes a new dataset and picks it.
    upload(page, duplicates_file(tmp_path / "dups.jsonl"))
    page.locator("#inspect-duplicates", has_text="7 exact duplicates, 3 near duplicates").wait_for()
    page.locator("#fix-duplicates").click()
    page.locator("#upload-status", has_text="dups-dedup.jsonl: 43 rows kept, 7 dropped").wait_for()
    assert page.locator("#dataset-name").input_value() == "dups-dedup.jsonl"
    page.locator("#inspect-duplicates", has_text="0 exact duplicates, 3 near duplicates").wait_for()
    original = studio.home / "datasets" / "dups.jsonl"
    assert original.read_bytes() == (tmp_path / "dups.jsonl").read_bytes()

    # Leakage: 2 of the 5 held-out prompts are training rows; the fix removes those rows into a new dataset.
    train, held = leakage_files(tmp_path)
    held_path = studio.home / "held.jsonl"
    held_path.write_bytes(held.read_bytes())
    upload(page, train)
    advanced(page, "evaluation.prompts").fill(str(held_path))
    page.locator("#inspect-leakage-held_out", has_text="2 of 5 held-out prompts appear in the training rows").wait_for()
    page.locator("#fix-leakage_held_out").click()
    page.locator("#upload-status", has_text="28 rows kept, 2 dropped").wait_for()
    page.locator("#inspect-leakage-held_out", has_text="0 of 5 held-out prompts").wait_for()
    assert json.loads((studio.home / "datasets" / "train.jsonl").read_text().splitlines()[0])
    assert studio.api("GET", "/api/tasks")["total"] == 0


def test_the_task_view_shows_the_warnings_its_submit_recorded(studio: LiveStudio, page: Any, tmp_path: Path) -> None:
    path = truncation_file(tmp_path / "cut.jsonl")
    (studio.home / "cut.jsonl").write_bytes(path.read_bytes())
    config = {"preset": "cpu-demo", "data": {"path": str(studio.home / "cut.jsonl"), "max_length": 64}}
    task = studio.api("POST", "/api/tasks", {"name": "cut short", "config": {**config, "optim": {"max_steps": 2}}})
    page.goto(studio.page_url(f"#/tasks/{task['id']}"))
    shown = page.locator("#task-warnings li")
    shown.first.wait_for()
    assert shown.count() == 1 and "12 rows cut, 4 of them entirely" in shown.inner_text()
    studio.api("POST", f"/api/tasks/{task['id']}/cancel")


def test_the_form_times_the_run_and_its_page_says_how_far_off_it_was(studio: LiveStudio, page: Any) -> None:
    page.goto(studio.page_url("#/new"))
    said = page.locator("#time-estimate-text")
    said.filter(has_text="not measured for these settings yet").wait_for()
    page.locator("#time-estimate-measure").click()
    said.filter(has_text="Time per epoch about").wait_for(timeout=180_000)
    assert "8 timed on cpu" in said.inner_text()
    assert page.locator("#time-estimate-measure").inner_text() == "Measure again"
    ARTIFACTS.mkdir(exist_ok=True)
    page.locator("#time-estimate").screenshot(path=str(ARTIFACTS / "new-time-estimate.png"))
    # How long the run is does not change a step: the measurement still holds for a shorter run.
    advanced(page, "optim.max_steps").fill("20")
    page.wait_for_timeout(1000)  # the form asks again 0.3 s after a change
    said.filter(has_text="Time per epoch about").wait_for()
    page.locator("#start-button").click()
    page.locator("#task-title").wait_for()
    shown = page.locator("#task-time-estimate")
    shown.filter(has_text="Estimated time per epoch about").wait_for()
    task = page.url.rsplit("/", 1)[-1]
    shown.filter(has_text="the estimate's middle was").wait_for(timeout=300_000)
    view = studio.api("GET", f"/api/tasks/{task}")
    assert view["status"] == "completed" and view["time_estimate"]["measured"]["epoch_s"] > 0
