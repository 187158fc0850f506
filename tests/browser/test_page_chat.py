"""Chat in the page: a completed fine-tune of builtin:tiny answers, token by token, in the task
view; compare mode shows the base model's answer beside it; Stop ends a reply and the next one
comes, however many times in a row (FTSTUDIO_CHAT_STOP_ROUNDS, default 5; issue 20 asks for 50 under
load)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support import end_processes, free_port, run_cli

from .livestudio import ARTIFACTS, LiveStudio, task_processes

pytestmark = pytest.mark.browser

STOP_ROUNDS = int(os.environ.get("FTSTUDIO_CHAT_STOP_ROUNDS", "5"))


def test_chat_streams_the_fine_tunes_answer_and_compares_it_with_the_base_model(studio: LiveStudio, page: Any) -> None:
    config = {"preset": "cpu-demo", "optim": {"max_steps": 4}, "data": {"validation": "0"}}
    task_id = studio.api("POST", "/api/tasks", {"name": "chatty", "config": config})["id"]
    page.goto(studio.page_url(f"#/tasks/{task_id}"))
    page.locator('.badge[data-status="completed"]').wait_for(timeout=180_000)
    section = page.locator("#try-it")
    section.wait_for(state="visible")
    # The adapter answers unless a checkpoint is picked: "Answer with" lists both, newest first.
    page.wait_for_function("document.querySelectorAll('#chat-weights option').length >= 2")
    assert page.locator("#chat-weights option").all_inner_texts()[0] == "the adapter (final)"
    assert "checkpoint 4" in page.locator("#chat-weights option").all_inner_texts()

    # Tokens arrive one by one: the reply grows while the request is still open.
    page.click("#chat .chat-settings summary")  # temperature, top-p, max new tokens, the system prompt
    page.fill("#chat-max-tokens", "48")
    page.fill("#chat-input", "Reverse the word: stone")
    lengths: list[int] = []
    page.expose_function("noteLength", lambda n: lengths.append(n))
    page.evaluate(
        """() => new MutationObserver(() => {
             const el = document.querySelector('#chat-log .chat-text[data-who="adapter"]');
             if (el) window.noteLength(el.textContent.length);
           }).observe(document.querySelector('#chat-log'), {subtree: true, childList: true, characterData: true})"""
    )
    page.click("#chat-send")
    page.locator("#chat-log .chat-reply[data-done]").wait_for(timeout=120_000)
    answer = page.locator('#chat-log .chat-text[data-who="adapter"]').inner_text()
    errors = page.locator("#chat-log .error-text").all_inner_texts()
    assert answer.strip() and not errors, errors
    # It came as tokens, each shown as it arrived (a text node each), not in one piece. Whether the browser got
    # them in one network read or several is the machine's timing: with a short answer on a loaded machine, all
    # of it once came in one read, so the lengths the page went through are not the test.
    pieces = page.evaluate("document.querySelector('#chat-log .chat-text[data-who=\"adapter\"]').childNodes.length")
    assert pieces >= 2 or len({n for n in lengths if n > 0}) >= 2, (pieces, lengths)
    assert page.locator("#chat-log .chat-user").inner_text().endswith("Reverse the word: stone")
    # The task list's queue panel shows the loaded chat beside the tasks, linked to what it answers for.
    other = page.context.new_page()
    other.goto(studio.page_url("#/"))
    shown = other.locator("#queue-running .queue-chat")
    shown.wait_for()
    assert shown.inner_text().endswith("on the CPU")  # where it runs; beside training it would say so
    assert shown.locator("a").get_attribute("href") == f"#/tasks/{task_id}"
    other.close()

    # Compare: both answers, side by side, to the same conversation.
    page.check("#chat-compare")
    page.fill("#chat-input", "And the word: river")
    page.click("#chat-send")
    page.locator("#chat-log .chat-reply.chat-compare[data-done]").wait_for(timeout=120_000)
    last = page.locator("#chat-log .chat-reply.chat-compare").last
    assert last.locator('.chat-text[data-who="adapter"]').inner_text().strip()
    assert last.locator('.chat-text[data-who="base"]').inner_text().strip()
    assert last.locator(".chat-who").all_inner_texts() == ["Fine-tuned", "Base model"]

    # Stop ends a long reply; the next message is answered (the worker stopped generating).
    page.uncheck("#chat-compare")
    page.fill("#chat-max-tokens", "4000")
    page.fill("#chat-temperature", "1")
    page.fill("#chat-input", "Tell me a long story")
    page.click("#chat-send")
    page.locator("#chat-stop").wait_for(state="visible")
    page.wait_for_function(
        "document.querySelectorAll('#chat-log .chat-reply').length === 3 && "
        "document.querySelectorAll('#chat-log .chat-reply')[2].textContent.length > 20"
    )
    page.click("#chat-stop")
    page.locator("#chat-status", has_text="Stopped.").wait_for()
    page.fill("#chat-max-tokens", "8")
    page.fill("#chat-input", "Short, please")
    page.click("#chat-send")
    page.wait_for_function("document.querySelectorAll('#chat-log .chat-reply[data-done]').length === 4", timeout=90_000)
    assert page.locator("#chat-log .error-text").count() == 0
    ARTIFACTS.mkdir(exist_ok=True)
    page.locator("#try-it").screenshot(path=str(ARTIFACTS / "task-view-chat.png"))

    # Training first: while a task trains in the only slot, a message waits, and says so, with a way to
    # answer anyway beside training, which then answers.
    long = {**config, "optim": {"max_steps": 5000}}
    trains = studio.api("POST", "/api/tasks", {"name": "trains", "config": long})["id"]
    try:
        page.fill("#chat-input", "Are you there?")
        page.click("#chat-send")
        page.wait_for_function("document.querySelectorAll('#chat-log .chat-reply[data-done]').length === 5")
        refused = page.locator("#chat-log .chat-reply").last
        said = refused.locator(".error-text").inner_text()
        assert said.startswith(f"task {trains} holds this studio's 1 training slot"), said
        assert refused.locator(".chat-msg").count() == 0  # the reason alone, no empty "Fine-tuned" box above it
        page.click("#chat-log .chat-beside")
        page.wait_for_function(
            "document.querySelectorAll('#chat-log .chat-reply[data-done]').length === 5 && "
            "!document.querySelector('#chat-log .chat-beside')", timeout=120_000,
        )  # fmt: skip
        last = page.locator("#chat-log .chat-reply").last
        assert last.locator('.chat-text[data-who="adapter"]').inner_text().strip()
        assert page.locator("#chat-log .error-text").count() == 0  # the refused message made way for the answer
        assert page.locator("#chat-log .chat-user").last.inner_text().endswith("Are you there?")
    finally:
        studio.api("POST", f"/api/tasks/{trains}/cancel")


@pytest.fixture
def trained(tmp_path: Path) -> Iterator[tuple[LiveStudio, str]]:
    """A studio whose home holds one completed fine-tune of builtin:tiny, trained by the CLI before the
    studio starts (the page's training is the test above's)."""
    home = tmp_path / "home"
    r = run_cli(home, "submit", "--preset", "cpu-demo", "--max-steps", "2", "--wait")
    assert r.returncode == 0, r.stderr
    s = LiveStudio(home, free_port())
    try:
        yield s.start(), r.stdout.strip().splitlines()[0]
    finally:
        s.stop()
        end_processes(task_processes(home))


@pytest.mark.timeout(300 + 60 * STOP_ROUNDS)
def test_after_stop_the_next_message_is_answered_every_time(trained: tuple[LiveStudio, str], page: Any) -> None:
    """Issue 20: Stop on a long reply, then a new message, again and again. The stopped reply used to go on
    in the worker, unread, and the next message was refused after 30 s ("answering another message")."""
    # On a loaded 2-core machine a round takes up to half a minute (the worker runs at a lower priority
    # than the load), whence the generous limits; what must never happen is an error.
    studio, task_id = trained
    page.goto(studio.page_url(f"#/tasks/{task_id}"))
    page.locator("#try-it").wait_for(state="visible")
    page.click("#chat .chat-settings summary")
    page.fill("#chat-temperature", "1")
    stopped, tries, waits = 0, 0, []
    while stopped < STOP_ROUNDS:
        tries += 1
        # At temperature 1 the model may end a reply by itself before Stop is pressed: such a try
        # stopped nothing, and another is made (at most as many again, and five).
        assert tries <= 2 * STOP_ROUNDS + 5, f"only {stopped} of {tries - 1} long replies were still going at Stop"
        replies = page.locator("#chat-log .chat-reply").count()
        page.fill("#chat-max-tokens", "4000")
        page.fill("#chat-input", f"Tell me a long story ({tries})")
        page.click("#chat-send")
        page.wait_for_function(
            f"""() => {{ const r = document.querySelectorAll('#chat-log .chat-reply')[{replies}];
                        return r && (r.dataset.done || r.textContent.length > 20); }}""",
            timeout=120_000,
        )
        # Pressed only while the reply is still under way, in one step of the page (a check, then a
        # Playwright click, could find the button hidden again in between).
        pressed = page.evaluate(
            "() => { const b = document.querySelector('#chat-stop'); if (b.hidden) return false; b.click(); return true; }"
        )
        if pressed:
            page.locator("#chat-status", has_text="Stopped.").wait_for()
            stopped += 1
        page.fill("#chat-max-tokens", "8")
        page.fill("#chat-input", f"Short, please ({tries})")
        sent = time.monotonic()
        page.click("#chat-send")
        # Answered in full: a stopped reply that ran on would have it refused after 30 s (an error below).
        page.wait_for_function(
            f"document.querySelectorAll('#chat-log .chat-reply[data-done]').length === {replies + 2}", timeout=180_000
        )
        waits.append(time.monotonic() - sent)
        last = page.locator("#chat-log .chat-reply").last
        errors = page.locator("#chat-log .error-text").all_inner_texts()
        assert not errors, f"after {stopped} of {STOP_ROUNDS} stops: {errors}"
        assert last.locator('.chat-text[data-who="adapter"]').inner_text().strip(), f"after {stopped} stops"
        assert page.locator("#chat-status").inner_text() == ""  # finished: not "Stopped." nor "ended early"
    print(f"{stopped} stops in {tries} tries; the next answer came in at most {max(waits):.1f} s")
