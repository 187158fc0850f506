"""The page's controls: a malformed upload, validation next to the field,
cancel (the process is gone), and delete with a confirmation."""

from __future__ import annotations

import re
from typing import Any

import pytest
from support import wait_for

from .livestudio import LiveStudio, task_processes

pytestmark = pytest.mark.browser


def test_malformed_dataset_shows_the_line_and_creates_nothing(studio: LiveStudio, page: Any) -> None:
    page.goto(studio.page_url("#/new"))
    bad = b'{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": "d"}\n{"instruction": "e", "output": \n'
    page.locator("#dataset-file").set_input_files(
        files=[{"name": "bad.jsonl", "mimeType": "application/jsonl", "buffer": bad}]
    )
    error = page.locator("#upload-error")
    error.wait_for(state="visible")
    assert re.search(r"bad\.jsonl.*line 3", error.inner_text()), error.inner_text()
    assert page.locator("#dataset-name").input_value() == "builtin:sample"
    assert studio.api("GET", "/api/tasks")["total"] == 0
    listed = studio.api("GET", "/api/datasets")["datasets"]
    assert all(d["builtin"] for d in listed)  # nothing uploaded: the built-in ones alone

    # A good file uploads and shows its detected format and first rows.
    good = b'{"instruction": "Say hi", "output": "hi"}\n{"instruction": "Say bye", "output": "bye"}\n'
    page.locator("#dataset-file").set_input_files(
        files=[{"name": "good.jsonl", "mimeType": "application/jsonl", "buffer": good}]
    )
    page.locator(".preview-table", has_text="Say hi").wait_for()
    assert error.is_hidden()
    assert page.locator("#dataset-name").input_value() == "good.jsonl"
    assert page.locator(".preview-table tbody tr").count() == 2
    assert "Say hi" in page.locator(".preview-table").inner_text()
    assert studio.api("GET", "/api/tasks")["total"] == 0

    # Picking a dataset that is already there shows the same preview.
    page.get_by_role("button", name="builtin:sample", exact=True).click()
    page.locator(".preview-table", has_text="capital of Spain").wait_for()
    assert page.locator("#detected-format").inner_text() == "alpaca"
    assert page.locator(".preview-table tbody tr").count() == 5


def test_validation_errors_appear_next_to_their_fields(studio: LiveStudio, page: Any) -> None:
    page.goto(studio.page_url("#/new"))
    page.locator("#advanced > summary").click()
    page.locator("#cfg-optim-learning_rate").fill("-1")
    page.locator("#cfg-lora-rank").fill("many")
    page.get_by_role("button", name="Start fine-tune").click()
    lr_error = page.locator("#cfg-optim-learning_rate-error")
    lr_error.wait_for(state="visible")
    assert "must be positive" in lr_error.inner_text()
    assert page.locator("#cfg-optim-learning_rate").get_attribute("aria-invalid") == "true"
    assert "number" in page.locator("#cfg-lora-rank-error").inner_text()
    assert page.locator(".error-summary li").count() == 2
    assert "#/new" in page.url
    assert studio.api("GET", "/api/tasks")["total"] == 0


def test_the_method_is_chosen_in_the_form_and_its_data_rule_is_shown_at_its_field(
    studio: LiveStudio, page: Any
) -> None:
    page.goto(studio.page_url("#/new"))
    method = page.locator("#method")
    method.locator("option[value='pretrain']").wait_for(state="attached")
    assert method.locator("option").all_inner_texts()[1].startswith("Continued pre-training")
    method.select_option("pretrain")
    page.locator("#advanced > summary").click()
    page.locator("#cfg-data-format").select_option("alpaca")  # a conversation shape: not raw text
    page.get_by_role("button", name="Start fine-tune").click()
    error = page.locator("#cfg-data-format-error")
    error.wait_for(state="visible")
    assert "method pretrain trains on raw text" in error.inner_text()
    assert studio.api("GET", "/api/tasks")["total"] == 0


def test_cancel_from_the_page_ends_the_process_then_delete_asks_first(studio: LiveStudio, page: Any) -> None:
    task = studio.api(
        "POST",
        "/api/tasks",
        {
            "name": "to cancel",
            "config": {"preset": "cpu-demo", "optim": {"max_steps": 5000}, "checkpoint": {"every_steps": 1000}},
        },
    )
    page.goto(studio.page_url(f"#/tasks/{task['id']}"))
    page.locator('.badge[data-status="training"]').wait_for(timeout=90_000)
    wait_for(lambda: task_processes(studio.home, task["id"]), what="the training process")
    # Exactly what the lifecycle allows a training task, in its order.
    assert page.locator("#task-actions button").all_inner_texts() == ["Pause", "Freeze", "Cancel"]

    page.get_by_role("button", name="Cancel").click()
    page.locator('.badge[data-status="cancelled"]').wait_for(timeout=30_000)
    assert studio.task(task["id"])["status"] == "cancelled"
    # The runner writes its exit record as its last act, so it may take a moment more to be gone.
    wait_for(lambda: not task_processes(studio.home, task["id"]), timeout=10, what="no process tagged with the task")
    assert page.locator("#task-actions button").all_inner_texts() == ["Retry", "Delete"]

    # Delete asks first; keeping it keeps it.
    page.get_by_role("button", name="Delete").click()
    page.get_by_role("dialog").wait_for()
    page.get_by_role("button", name="Keep it").click()
    assert studio.task(task["id"])["status"] == "cancelled"
    page.get_by_role("button", name="Delete").click()
    page.locator("#confirm-yes").click()
    page.wait_for_url(re.compile(r"#/tasks$"))
    page.locator(".empty").wait_for()
    assert studio.api("GET", "/api/tasks")["total"] == 0


def test_the_page_says_why_remote_code_is_refused(studio: LiveStudio, page: Any) -> None:
    page.goto(studio.page_url("#/new"))
    page.locator("#advanced > summary").click()
    page.locator("#cfg-model-trust_remote_code").check()
    page.get_by_role("button", name="Start fine-tune").click()
    error = page.locator("#cfg-model-trust_remote_code-error")
    error.wait_for(state="visible")
    assert "--allow-remote-code" in error.inner_text()
    assert studio.api("GET", "/api/tasks")["total"] == 0
