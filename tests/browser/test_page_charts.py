"""The charts on the page (uPlot), against a real studio with the scripted trainer: a task's
loss curve reads out under the pointer, zooms, goes to a log scale and grows while the task
trains; and two tasks compared on one chart with only the settings that differ, at an
address that can be bookmarked."""

from __future__ import annotations

import re
from typing import Any

import pytest
from support import wait_for

from .livestudio import ARTIFACTS, LiveStudio

pytestmark = pytest.mark.browser

CPU = {"preset": "cpu-demo"}


def chart_data(page: Any) -> dict[str, str]:
    return page.locator("div.chart").evaluate("e => ({...e.dataset})")


def drag(page: Any, box: dict[str, float], start: float, end: float) -> None:
    """Press at `start` and let go at `end`, as fractions of the plot's width."""
    y = box["y"] + box["height"] / 2
    page.mouse.move(box["x"] + box["width"] * start, y)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * end, y, steps=6)
    page.mouse.up()


def test_the_loss_chart_reads_out_zooms_goes_log_and_grows_while_training(scripted: LiveStudio, page: Any) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    studio = scripted.start()
    steps = 200
    task = studio.api(
        "POST", "/api/tasks", {"name": f"charted scripted steps={steps} delay=0.05 eval=20", "config": CPU}
    )
    page.goto(studio.page_url(f"#/tasks/{task['id']}"))
    chart = page.locator("div.chart")
    points = lambda: int(chart.get_attribute("data-points") or 0)  # noqa: E731
    wait_for(lambda: points() >= 5, timeout=30, what="the first points")

    # Live: points are added while it trains (new arrays each time, never drawn twice).
    p1 = points()
    wait_for(lambda: points() > p1 + 3, timeout=10, what="the curve to grow")
    assert chart.get_attribute("data-x-min") == "0" and chart.get_attribute("data-x-max") == str(steps)
    assert re.match(r"Training loss [\d.]+ at step \d+ of 200", page.locator(".chart-caption").inner_text())

    # Hover: a read-out beside the pointer with the step and the values there; gone when the pointer leaves.
    plot = page.locator("div.chart .u-over")
    box = plot.bounding_box()
    readout = page.locator(".chart-readout")
    assert readout.is_hidden()
    page.mouse.move(box["x"] + box["width"] * 0.02, box["y"] + box["height"] / 2)
    readout.wait_for(state="visible")
    text = readout.inner_text()
    assert re.match(r"step \d+\n", text) and "training loss " in text and "learning rate 1.00e-3" in text, text
    chart.screenshot(path=str(ARTIFACTS / "chart-hover.png"))
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] - 40)
    readout.wait_for(state="hidden")

    # Zoom: drag across a part of the x axis; it stays zoomed while new points arrive.
    drag(page, box, 0.02, 0.12)
    wait_for(lambda: chart.get_attribute("data-zoomed") == "true", timeout=5, what="the chart to zoom")
    lo, hi = float(chart.get_attribute("data-x-min") or 0), float(chart.get_attribute("data-x-max") or 0)
    assert 0 < lo < hi < steps * 0.15, (lo, hi)
    zoom_out = page.get_by_role("button", name="Zoom out")
    assert zoom_out.is_visible()
    p2 = points()
    wait_for(lambda: points() > p2 + 3, timeout=10, what="the curve to grow while zoomed")
    assert (float(chart.get_attribute("data-x-min") or 0), float(chart.get_attribute("data-x-max") or 0)) == (lo, hi)

    # Double-click: all of it again, 0 to the total steps.
    page.mouse.dblclick(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    wait_for(lambda: chart.get_attribute("data-zoomed") == "false", timeout=5, what="the zoom to reset")
    assert (chart.get_attribute("data-x-min"), chart.get_attribute("data-x-max")) == ("0", str(steps))
    assert zoom_out.is_hidden()

    # Log scale for loss: the axis is rescaled to powers of ten, and back.
    linear_ticks = chart.get_attribute("data-loss-ticks")
    page.get_by_label("Log scale for loss").check()
    wait_for(lambda: chart.get_attribute("data-scale") == "log", timeout=5, what="the log scale")
    wait_for(lambda: chart.get_attribute("data-loss-ticks") != linear_ticks, timeout=5, what="the axis to change")
    log_ticks = (chart.get_attribute("data-loss-ticks") or "").split()
    assert "0.1" in log_ticks and "1" in log_ticks and "0" not in log_ticks, log_ticks
    page.get_by_label("Log scale for loss").uncheck()
    wait_for(lambda: chart.get_attribute("data-loss-ticks") == linear_ticks, timeout=5, what="the linear axis")

    # It ends with one point a step, every step drawn once.
    page.locator('.badge[data-status="completed"]').wait_for(timeout=30_000)
    wait_for(lambda: chart.get_attribute("data-last-step") == str(steps), timeout=10, what="the last step drawn")
    assert points() == steps and chart.get_attribute("data-eval-points") == str(steps // 20)
    page.get_by_label("Log scale for loss").check()
    page.locator("#curve-title").scroll_into_view_if_needed()
    page.locator(".chart-box").screenshot(path=str(ARTIFACTS / "chart-log.png"))


def test_two_runs_on_one_chart_with_what_differs_and_a_bookmark(scripted: LiveStudio, page: Any) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    studio = scripted.start("--slots", "2")
    fast = studio.api(
        "POST",
        "/api/tasks",
        {"name": "lr 3e-3 scripted steps=30 delay=0.01 eval=10", "config": {**CPU, "optim": {"learning_rate": 3e-3}}},
    )
    slow = studio.api(
        "POST",
        "/api/tasks",
        {
            "name": "lr 1e-3 scripted steps=30 delay=0.01 eval=10 scale=1.5",
            "config": {**CPU, "optim": {"learning_rate": 1e-3}},
        },
    )
    for t in (fast, slow):
        studio.wait_status(t["id"], "completed", timeout=30)

    # Pick both in the list, then Compare.
    page.goto(studio.page_url("#/tasks"))
    button = page.locator("#compare-button")
    button.wait_for()
    assert button.is_disabled()
    page.get_by_label(f"Compare {fast['name']}").check()
    assert button.is_disabled() and button.inner_text() == "Compare: pick one more"
    page.get_by_label(f"Compare {slow['name']}").check()
    assert button.inner_text() == "Compare 2 selected"
    button.click()
    page.wait_for_url(re.compile(r"#/compare\?tasks="))
    assert page.url.endswith(f"#/compare?tasks={fast['id']},{slow['id']}")

    def shows_the_comparison(x: str, scale: str) -> None:
        chart = page.locator("div.chart")
        chart.wait_for()
        page.locator("#compare-table").wait_for()
        wait_for(lambda: chart.get_attribute("data-points") == "30,30", timeout=10, what="both curves")
        assert (
            chart.get_attribute("data-tasks"),
            chart.get_attribute("data-x"),
            chart.get_attribute("data-scale"),
        ) == (
            "2",
            x,
            scale,
        )
        assert page.locator(".chart-box .legend a").all_inner_texts() == [fast["name"], slow["name"]]
        # Only the settings that differ: the learning rate (the names head the columns).
        fields = page.locator("#compare-table tr[data-field]")
        assert fields.evaluate_all("rs => rs.map(r => r.dataset.field)") == ["optim.learning_rate"]
        assert fields.locator("td").all_inner_texts() == ["0.003", "0.001"]
        assert page.locator("#compare-table thead th a").all_inner_texts() == [fast["name"], slow["name"]]
        assert "settings are the same in all" in page.locator("#compare-table tr.same").inner_text()
        final = page.locator('#compare-table tr[data-result="final"] td').all_inner_texts()
        assert final == ["0.06667 lowest", "0.1000"], final
        best_eval = page.locator('#compare-table tr[data-result="bestEval"] td').all_inner_texts()
        assert best_eval == ["0.08333 lowest", "0.1250"], best_eval
        assert page.locator('#compare-table tr[data-result="steps"] td').all_inner_texts() == ["30/30", "30/30"]
        caption = page.locator("#compare-caption").inner_text()
        assert caption.startswith("Comparing 2 fine-tunes by " + ("tokens seen" if x == "tokens" else "step"))

    shows_the_comparison("step", "linear")

    # Both curves under the pointer.
    box = page.locator("div.chart .u-over").bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.25, box["y"] + box["height"] / 2)
    readout = page.locator(".chart-readout")
    readout.wait_for(state="visible")
    text = readout.inner_text()
    assert f"{fast['name']}: training loss" in text and f"{slow['name']}: training loss" in text, text
    page.screenshot(path=str(ARTIFACTS / "compare-view.png"), full_page=True)

    # By tokens seen, on a log scale: the address keeps both, so a bookmark brings back the same view.
    page.locator("#compare-x").select_option("tokens")
    chart = page.locator("div.chart")
    wait_for(lambda: chart.get_attribute("data-x-max") == "30000", timeout=5, what="the tokens axis")
    page.get_by_label("Log scale for loss").check()
    wait_for(lambda: page.url.endswith("&x=tokens&scale=log"), timeout=5, what="the address to follow")
    bookmark = page.url
    page.goto("about:blank")
    page.goto(bookmark)
    shows_the_comparison("tokens", "log")
    assert page.locator("#compare-x").input_value() == "tokens"
    assert page.get_by_label("Log scale for loss").is_checked()

    # A bookmark of a task since deleted says so, and does not draw a comparison of one.
    studio.api("DELETE", f"/api/tasks/{slow['id']}")
    page.goto("about:blank")
    page.goto(bookmark)
    notice = page.locator("#compare-notice")
    notice.wait_for()
    assert notice.inner_text() == f"Not found (deleted?): {slow['id']}."
    assert "fewer than two of these fine-tunes exist" in page.locator("main").inner_text()
    assert page.locator("div.chart").count() == 0
