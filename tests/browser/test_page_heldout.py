"""Held-out prompts in the task view: a real fine-tune of builtin:tiny answers them after a
checkpoint and at the end, and the page shows the fine-tune's answers beside the base model's,
as text, stage by stage."""

from __future__ import annotations

import json
from typing import Any

import pytest

from .livestudio import ARTIFACTS, LiveStudio

pytestmark = pytest.mark.browser

PROMPTS = [
    {"instruction": "What is 5 plus 5?", "input": "", "output": "5 plus 5 is 10."},
    {"instruction": "<img src=x onerror=alert(1)> What color is snow?", "input": "", "output": "Snow is white."},
]


def test_the_fine_tunes_answers_show_beside_the_base_models(studio: LiveStudio, page: Any) -> None:
    prompts = studio.home / "held-out.jsonl"  # in the data home: a folder the studio may read
    prompts.write_text("".join(json.dumps(r) + "\n" for r in PROMPTS))
    config = {
        "preset": "cpu-demo",
        "optim": {"max_steps": 4},
        "data": {"validation": "0"},
        "checkpoint": {"every_steps": 2},
        "evaluation": {"prompts": str(prompts), "max_new_tokens": 8, "at_checkpoints": True},
    }
    task_id = studio.api("POST", "/api/tasks", {"name": "held out", "config": config})["id"]
    page.goto(studio.page_url(f"#/tasks/{task_id}"))
    page.locator("#heldout-stage").wait_for(state="attached")
    seen: list[int] = []  # how many stages the picker offered, each time it changed
    page.expose_function("noteStages", lambda n: seen.append(n))
    page.evaluate(
        """() => new MutationObserver(() => window.noteStages(document.querySelectorAll('#heldout-stage option').length))
             .observe(document.querySelector('#heldout-stage'), {childList: true})"""
    )
    page.locator('.badge[data-status="completed"]').wait_for(timeout=180_000)
    section = page.locator("#held-out")
    section.wait_for(state="visible")
    page.wait_for_function("document.querySelectorAll('#heldout-stage option').length === 2")
    # The checkpoint's answers reached the page on their own, while the training went on.
    assert 1 in seen, seen

    stages = studio.api("GET", f"/api/tasks/{task_id}/samples")["stages"]
    assert [s["stage"] for s in stages] == ["checkpoint-2", "final"]
    assert page.locator("#heldout-stage option").all_text_contents() == ["checkpoint 2", "the end of training (step 4)"]
    assert page.locator("#heldout-stage").input_value() == "final"  # the newest

    def table() -> list[list[str]]:
        rows = page.locator("#heldout-table tbody tr")
        return [rows.nth(i).locator("td").all_text_contents() for i in range(rows.count())]

    header = page.locator("#heldout-table thead th").all_text_contents()
    assert header == ["Prompt", "Expected", "Fine-tuned", "Base model"]
    final = stages[-1]["samples"]
    assert table() == [[s["prompt"], s["reference"], s["adapter"], s["base"]] for s in final]
    assert all(s["adapter"] and s["base"] for s in final)
    assert table()[1][0].startswith("<img src=x onerror=alert(1)>")  # the prompt as text, not as markup
    assert section.locator("img").count() == 0
    assert "2 prompts at step 4" in page.locator("#heldout-note").inner_text()

    page.select_option("#heldout-stage", "checkpoint-2")
    assert "2 prompts at step 2" in page.locator("#heldout-note").inner_text()
    assert table() == [[s["prompt"], s["reference"], s["adapter"], s["base"]] for s in stages[0]["samples"]]
    ARTIFACTS.mkdir(exist_ok=True)
    section.screenshot(path=str(ARTIFACTS / "task-view-held-out.png"))
