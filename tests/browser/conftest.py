"""Fixtures for the browser tests: the real studio server as a subprocess, and
Debian's Chromium (never a downloaded one) driven headless by Playwright.

Every test gets its own data home and port. Teardown always runs terminate ->
wait -> kill on the studio and on every process tagged with one of the home's
tasks (the runner tags all descendants with FTSTUDIO_TASK_ID), so no training
outlives a test.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support import end_processes, free_port, home_env

from .livestudio import CHROMIUM, CHROMIUM_ARGS, LiveStudio, task_processes


@pytest.fixture
def studio(tmp_path: Path) -> Iterator[LiveStudio]:
    home = tmp_path / "home"
    s = LiveStudio(home, free_port())
    try:
        yield s.start()
    finally:
        s.stop()
        end_processes(task_processes(home))


@pytest.fixture
def scripted(tmp_path: Path) -> Iterator[LiveStudio]:
    """A studio whose tasks run the scripted trainer (its behaviour is read from the task's name), not yet
    started: the test starts it with the flags it needs (`scripted.start("--slots", "2")`)."""
    home = tmp_path / "home"
    s = LiveStudio(home, free_port())
    s.env = home_env(home, scripted=True)
    try:
        yield s
    finally:
        s.stop()
        end_processes(task_processes(home))


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        pytest.skip(f"no Chromium at {CHROMIUM}; install Debian's (make browser)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    """A fresh browser context; JavaScript errors on the page fail the test.

    Playwright's string predicates (`wait_for_function`) are evaluated in the page, which the page's
    Content-Security-Policy forbids: these contexts bypass it, and test_page_security.py checks the
    page itself under the real policy."""
    context = browser.new_context(accept_downloads=True, viewport={"width": 1400, "height": 1000}, bypass_csp=True)
    context.set_default_timeout(20_000)
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    try:
        yield pg
    finally:
        context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"
