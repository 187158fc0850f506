"""The page's training methods: the New fine-tune form shows only the settings a method reads and picks the
method's built-in data, and a DPO run's task view charts its own figures (rewards, margin, accuracy) live."""

from __future__ import annotations

import re
from typing import Any

import pytest

from .livestudio import ARTIFACTS, LiveStudio

pytestmark = pytest.mark.browser


def test_a_dpo_fine_tune_from_the_form_charts_its_rewards(studio: LiveStudio, page: Any) -> None:
    page.goto(studio.page_url("#/new"))
    page.locator("#advanced > summary").click()
    beta = page.locator("#cfg-preference-beta")
    packing = page.locator("#cfg-data-packing")
    packing.wait_for(state="visible")  # the settings arrive from the API
    assert page.locator("#method").input_value() == "sft"
    assert beta.is_hidden() and packing.is_visible()  # SFT reads no preference setting
    assert page.locator("#dataset-name").input_value() == "builtin:sample"

    page.locator("#method").select_option("dpo")
    assert beta.is_visible() and page.locator("#cfg-preference-loss").is_visible()
    assert page.locator("#cfg-preference-desirable_weight").is_hidden()  # kto's alone
    assert packing.is_hidden()  # a preference run never packs
    assert page.locator("#dataset-name").input_value() == "builtin:preferences"
    page.locator("#method").select_option("kto")
    assert (
        page.locator("#cfg-preference-desirable_weight").is_visible()
        and page.locator("#cfg-preference-loss").is_hidden()
    )
    page.locator("#method").select_option("grpo")
    assert page.locator("#cfg-rewards").input_value() == "numeric"
    assert page.locator("#cfg-grpo-generations").is_visible() and beta.is_hidden()
    assert page.locator("#dataset-name").input_value() == "builtin:math"
    page.locator("#method").select_option("dpo")
    assert page.locator("#cfg-rewards").is_hidden()

    page.get_by_label("Name").fill("dpo from the page")
    page.locator("#cfg-optim-max_steps").fill("12")
    page.locator("#cfg-optim-batch_size").fill("4")
    page.locator("#cfg-data-max_length").fill("64")
    page.locator("#cfg-logging-eval_every_steps").fill("6")
    page.get_by_role("button", name="Start fine-tune").click()
    page.wait_for_url(re.compile(r"#/tasks/[\w-]+$"))
    task_id = page.url.rsplit("/", 1)[1]
    config = studio.task(task_id)["config"]
    assert (config["method"], config["data"]["path"], config["data"]["format"]) == (
        "dpo",
        "builtin:preferences",
        "preference",
    )

    chart = page.locator("#method-metrics")
    chart.wait_for(state="visible", timeout=180_000)
    assert "rewards/accuracies" in (chart.locator("div.chart").get_attribute("data-metrics") or "")
    page.locator('.badge[data-status="completed"]').wait_for(timeout=300_000)
    caption = chart.locator("figcaption").inner_text()
    assert "accuracy (chosen reply wins)" in caption and "eval" in caption, caption
    assert int(chart.locator("div.chart").get_attribute("data-points") or 0) >= 12
    chart.screenshot(path=str(ARTIFACTS / "task-view-dpo-metrics.png"))


def test_start_from_this_adapter_takes_a_completed_sft_run_into_dpo(studio: LiveStudio, page: Any) -> None:
    config = {"preset": "cpu-demo", "optim": {"max_steps": 4, "batch_size": 4}, "data": {"max_length": 64}}
    sft = studio.api("POST", "/api/tasks", {"name": "sft first", "config": config})
    page.goto(studio.page_url(f"#/tasks/{sft['id']}"))
    page.locator('.badge[data-status="completed"]').wait_for(timeout=180_000)
    page.locator("#start-from-here").click()
    page.wait_for_url(re.compile(r"#/new\?from="))
    notice = page.locator("#start-from")
    notice.wait_for(state="visible")
    page.wait_for_function("() => document.querySelector('#start-from').textContent.includes('sft first')")
    assert "LoRA settings below are not used" in notice.inner_text()
    assert page.locator("#method").input_value() == "dpo"
    assert page.locator("#dataset-name").input_value() == "builtin:preferences"
    page.locator("#advanced > summary").click()
    page.locator("#cfg-optim-max_steps").fill("4")
    page.locator("#cfg-data-max_length").fill("64")
    page.get_by_role("button", name="Start fine-tune").click()
    page.wait_for_url(re.compile(r"#/tasks/[\w-]+$"))
    task_id = page.url.rsplit("/", 1)[1]
    assert task_id != sft["id"]
    stored = studio.task(task_id)["config"]
    assert stored["model"]["start_from"].endswith(f"{sft['id']}/adapter") and stored["method"] == "dpo"
    page.locator('.badge[data-status="completed"]').wait_for(timeout=180_000)
    # The SFT run and its DPO follow-up side by side: their curves, and what differs between them.
    page.goto(studio.page_url(f"#/compare?tasks={sft['id']},{task_id}"))
    method = page.locator('#compare-table tr[data-field="method"]')
    method.wait_for()
    assert method.locator("td").all_inner_texts() == ["sft", "dpo"]
    assert page.locator('#compare-table tr[data-field="model.start_from"]').count() == 1


def test_the_form_counts_the_memory_a_run_needs_as_the_settings_change(studio: LiveStudio, page: Any) -> None:
    page.goto(studio.page_url("#/new"))
    box = page.locator("#memory-estimate")
    page.wait_for_function("document.querySelector('#memory-estimate')?.textContent.includes('needs about')")
    text = box.text_content() or ""
    assert re.search(r"Memory: needs about [\d.,]+ MiB of memory at batch 8 and length 256; this machine has", text)
    assert "warn" not in (box.get_attribute("class") or "")

    page.locator("#advanced > summary").click()
    page.locator("#cfg-optim-batch_size").fill("512")
    page.locator("#cfg-data-max_length").fill("4096")
    page.locator("#cfg-resources-memory").fill("2G")
    page.wait_for_function("document.querySelector('#memory-estimate')?.textContent.includes('at batch 512')")
    text = box.text_content() or ""
    assert "at batch 512 and length 4096; its --memory limit leaves" in text, text
    assert re.search(r"batch \d+ fits \(about [\d.,]+ [MG]iB\), with grad_accum \d+ for the same effective batch", text)
    assert "warn" in (box.get_attribute("class") or "")
    page.locator("#cfg-optim-learning_rate").fill("-1")
    page.wait_for_function("document.querySelector('#memory-estimate')?.textContent.includes('until the settings')")
    assert page.locator("#memory-estimate").text_content() == "No memory estimate until the settings are valid."
    page.screenshot(path=str(ARTIFACTS / "new-memory-estimate.png"), full_page=True)


def test_grpo_rewards_are_one_a_line_so_a_pattern_keeps_its_commas(studio: LiveStudio, page: Any) -> None:
    page.goto(studio.page_url("#/new"))
    page.locator("#advanced > summary").click()
    page.locator("#cfg-rewards").wait_for(state="attached")
    page.locator("#method").select_option("grpo")
    assert page.locator("#cfg-rewards").input_value() == "numeric"
    page.locator("#cfg-rewards").fill("regex:^\\d{1,3}$\n  numeric  \n")
    page.locator("#cfg-optim-max_steps").fill("1")
    page.get_by_label("Name").fill("grpo rewards from the page")
    page.get_by_role("button", name="Start fine-tune").click()
    page.wait_for_url(re.compile(r"#/tasks/[\w-]+$"))
    task_id = page.url.rsplit("/", 1)[1]
    try:
        assert studio.task(task_id)["config"]["rewards"] == ["regex:^\\d{1,3}$", "numeric"]
    finally:
        studio.http.post(f"/api/tasks/{task_id}/cancel")
