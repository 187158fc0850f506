"""The page end to end: create a fine-tune of builtin:tiny on builtin:sample,
watch it advance, restart the studio under it, and download the adapter."""

from __future__ import annotations

import hashlib
import io
import re
import signal
import tarfile
import time
from pathlib import Path
from typing import Any

import pytest
from support import paced, wait_for

from ftstudio.training.gguf import missing_tools

from .livestudio import ARTIFACTS, LiveStudio, task_processes

pytestmark = pytest.mark.browser

# Long enough on two CPU cores to restart the studio in the middle, short enough to keep the suite quick.
MAX_STEPS = 30


def points(page: Any) -> int:
    return int(page.get_attribute("div.chart", "data-points") or 0)


def progress(page: Any) -> float:
    return float(page.get_attribute("#task-progress", "aria-valuenow") or 0)


def test_finetune_survives_a_studio_restart_and_the_adapter_downloads(studio: LiveStudio, page: Any) -> None:
    # The real trainer with a floor of half a second a step: on a fast idle machine 30 steps end in the
    # seconds a studio restart takes, and the run must still be training when the studio comes back.
    studio.kill(signal.SIGTERM)
    studio.env.update(paced(FTSTUDIO_TEST_PACE_S="0.5"))
    studio.start()
    started = time.monotonic()
    page.goto(studio.page_url("#/new"))
    page.get_by_label("Name").fill("browser e2e")
    page.get_by_role("button", name="builtin:tiny").click()
    page.locator("#dataset-name").fill("builtin:sample")
    assert page.locator("#preset").input_value() == "cpu-demo"
    page.locator("#advanced > summary").click()
    page.locator("#cfg-optim-max_steps").fill(str(MAX_STEPS))
    page.locator("#cfg-checkpoint-every_steps").fill("10")
    # Smaller batches of shorter rows: quick steps on a shared two-core CI machine.
    page.locator("#cfg-optim-batch_size").fill("4")
    page.locator("#cfg-data-max_length").fill("128")
    page.locator("#cfg-logging-eval_every_steps").fill("15")
    page.get_by_role("button", name="Start fine-tune").click()

    page.wait_for_url(re.compile(r"#/tasks/[\w-]+$"))
    task_id = page.url.rsplit("/", 1)[1]
    config = studio.task(task_id)["config"]
    assert config["optim"]["max_steps"] == MAX_STEPS
    assert config["model"]["name"] == "builtin:tiny"
    assert config["optim"]["batch_size"] == 4 and config["data"]["max_length"] == 128

    # The progress bar and the loss curve advance.
    page.wait_for_function("Number(document.querySelector('div.chart').dataset.points) >= 3", timeout=90_000)
    p1, bar1 = points(page), progress(page)
    assert bar1 > 0
    wait_for(lambda: points(page) > p1 and progress(page) > bar1, timeout=30, what="the curve to advance")
    assert page.locator(".badge").first.get_attribute("data-status") == "training"

    # Restart the studio under the running training.
    before = points(page)
    studio.kill()
    assert task_processes(studio.home, task_id), "training must outlive the studio"
    studio.start()

    banner = page.locator("#restart-banner")
    banner.wait_for(state="visible", timeout=30_000)
    text = banner.inner_text()
    assert "The studio restarted" in text and "your training kept running" in text
    assert re.search(r"step \d+/" + str(MAX_STEPS), text), text
    assert studio.task(task_id)["reattached"] is True
    # Someone who comes back later (a fresh load) is told the same.
    fresh = page.context.new_page()
    fresh.goto(page.url)
    fresh.locator("#restart-banner").wait_for(state="visible")
    assert "your training kept running" in fresh.locator("#restart-banner").inner_text()
    fresh.close()
    wait_for(lambda: points(page) > before + 2, timeout=60, what="the curve to keep advancing after the restart")

    # It completes; nothing stale is left on the page.
    page.locator('.badge[data-status="completed"]').wait_for(timeout=180_000)
    assert banner.is_hidden()
    page.wait_for_function(f"document.querySelector('div.chart').dataset.lastStep == '{MAX_STEPS}'", timeout=10_000)
    stored = [e for e in studio.api("GET", f"/api/tasks/{task_id}/metrics")["events"] if e["kind"] == "progress"]
    # Every stored progress event reached the page once: none lost, none twice, across the restart.
    assert int(page.get_attribute("div.chart", "data-progress-events") or 0) == len(stored)
    assert points(page) == len({e["step"] for e in stored}) == MAX_STEPS
    assert page.locator("#task-actions button").all_inner_texts() == ["Extend", "Delete"]
    assert page.locator("#connection").inner_text() == ""

    # The page let go of the ended task: no stream reconnecting forever, no polling.
    page.wait_for_timeout(1500)
    late: list[str] = []
    page.on("request", lambda r: late.append(r.url) if f"/api/tasks/{task_id}" in r.url else None)
    page.wait_for_timeout(3000)
    assert not late, late

    # The adapter downloads as a tar.gz with the adapter inside.
    with page.expect_download() as dl:
        page.locator("#download-adapter").click()
    data = Path(dl.value.path()).read_bytes()
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        names = [Path(n).name for n in tar.getnames()]
    assert "adapter_config.json" in names and "adapter_model.safetensors" in names
    page.get_by_role("link", name="summary.json").wait_for()
    # "Use it": the commands that load the result, with this task's adapter path in them.
    adapter = str(studio.home / "tasks" / task_id / "adapter")
    page.locator("#handover-vllm").wait_for()
    vllm = page.locator("#handover-vllm").inner_text()
    assert vllm.startswith("vllm serve ") and "--enable-lora --lora-modules" in vllm and adapter in vllm, vllm
    assert f"ADAPTER {adapter}" in page.locator("#handover-ollama").inner_text()
    assert f"ftstudio export {task_id} --format merged" in page.locator("#handover-export").inner_text()
    copy = page.get_by_role("button", name="Copy the vLLM commands")
    copy.click()
    page.wait_for_function(
        "['Copied', 'Selected: press Ctrl+C'].includes("
        "document.querySelector('[aria-label=\"Copy the vLLM commands\"]').textContent)"
    )  # the clipboard answers asynchronously
    if copy.inner_text() == "Selected: press Ctrl+C":
        assert page.evaluate("window.getSelection().toString()") == vllm

    assert "--format gguf --quant q4_k_m" in page.locator("#handover-gguf").inner_text()

    # A GGUF export from the page: a job with a progress line, then its files with size and sha256.
    page.locator("#gguf-quant").select_option("q8_0")
    page.locator("#gguf-start").click()
    if missing_tools():  # a machine without `make gguf`: the page says how to install it
        page.wait_for_function("document.querySelector('#gguf-error')?.textContent.includes('make gguf')")
    else:
        page.locator('#export-gguf-q8_0[data-status="completed"]').wait_for(timeout=180_000)
        link = page.locator("#export-gguf-q8_0 a.export-file").first
        with page.expect_download() as dl:
            link.click()
        body = Path(dl.value.path()).read_bytes()
        shown = page.locator("#export-gguf-q8_0 .sha256").inner_text()
        assert dl.value.suggested_filename.endswith("-q8_0.gguf") and hashlib.sha256(body).hexdigest() in shown
        assert body[:4] == b"GGUF"

    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "task-view-completed.png"), full_page=True)
    assert not task_processes(studio.home, task_id)
    assert time.monotonic() - started < 300
