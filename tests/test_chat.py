"""Chatting with a fine-tune: the request's rules, the worker process, the streamed API and
`ftstudio chat` in a real terminal. One real fine-tune of builtin:tiny serves the module."""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from support import Studio, home_env, run_cli, wait_for

from ftstudio.chat import ChatBusy, ChatWorker, parse_request
from ftstudio.errors import ValidationError

pytestmark = pytest.mark.slow


# -- what a message may ask ------------------------------------------------------------------------


def say(text: str) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": text}]}


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({}, "messages: must be a list of {role, content}"),
        ({"messages": [{"role": "system", "content": "x"}]}, "messages[0]: must be {role: user|assistant"),
        ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
         "messages: the last message must be the user's"),
        ({**say("hi"), "temperature": -1}, "temperature: must be at least 0 and at most 2 (got -1)"),
        ({**say("hi"), "temperature": float("nan")}, "temperature: must be a number from 0 to 2"),
        ({**say("hi"), "top_p": 0}, "top_p: must be above 0 and at most 1 (got 0)"),
        ({**say("hi"), "max_new_tokens": 0}, "max_new_tokens: must be a whole number from 1 to 4096"),
        ({**say("hi"), "max_new_tokens": True}, "max_new_tokens: must be a whole number from 1 to 4096"),
        ({**say("hi"), "checkpoint": "../../etc"}, "checkpoint: must be a checkpoint's name, e.g. checkpoint-400"),
        ({**say("hi"), "compare": "yes"}, "compare: must be true or false"),
        ({**say("hi"), "tools": []}, "tools: unknown field"),
        ({"messages": [{"role": "user", "content": "x" * 100_001}]}, "messages: at most 100,000 characters"),
    ],
)  # fmt: skip
def test_a_bad_request_names_each_problem(body: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError) as raised:
        parse_request(body)
    assert message in str(raised.value) and "\n" not in str(raised.value)


def test_a_good_request_keeps_what_it_asks() -> None:
    req = parse_request({**say("hi"), "system": "be brief", "temperature": 0, "compare": True, "seed": 3})
    assert (req.messages, req.system, req.temperature, req.compare, req.seed) == (
        [{"role": "user", "content": "hi"}], "be brief", 0.0, True, 3,
    )  # fmt: skip


# -- a real fine-tune to talk to ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A home with one completed fine-tune of builtin:tiny (its adapter and two checkpoints)."""
    home = tmp_path_factory.mktemp("chat") / "home"
    r = run_cli(home, "submit", "--preset", "cpu-demo", "--max-steps", "6", "--checkpoint-every", "3", "--wait")
    assert r.returncode == 0, r.stderr
    return home, r.stdout.strip().splitlines()[0]


@pytest.fixture(scope="module")
def studio(trained: tuple[Path, str]) -> Iterator[Studio]:
    home, _ = trained
    s = Studio(home, home_env(home, FTSTUDIO_CHAT_IDLE_S="4")).start()
    yield s
    s.stop()


def chat(studio: Studio, task_id: str, body: dict[str, Any], timeout: float = 180) -> list[tuple[str, dict[str, Any]]]:
    """POST a message; the streamed events as (name, data), in order."""
    out: list[tuple[str, dict[str, Any]]] = []
    with httpx.stream(
        "POST", f"{studio.url}/api/tasks/{task_id}/chat", json=body, headers=studio.auth, timeout=timeout
    ) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        name = "message"
        for line in r.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                out.append((name, json.loads(line[6:])))
    return out


def workers() -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter():
        try:
            if "ftstudio.chatworker" in p.cmdline():
                found.append(p)
        except psutil.Error:
            continue
    return found


def test_a_reply_streams_token_by_token_and_compare_adds_the_base_models(
    studio: Studio, trained: tuple[Path, str]
) -> None:
    _, tid = trained
    events = chat(studio, tid, {**say("Reverse the word: stone"), "max_new_tokens": 12, "compare": True, "seed": 1})
    names = [n for n, _ in events]
    assert names[0] == "worker" and names[-1] == "end", names
    assert "ready" in names and events[names.index("ready")][1]["weights"] == "adapter"
    tokens = [(d["who"], d["text"]) for n, d in events if n == "token"]
    whos = [w for w, _ in tokens]
    assert whos and set(whos) == {"adapter", "base"} and whos == sorted(whos, key=lambda w: w != "adapter")
    assert [d["who"] for n, d in events if n == "done"] == ["adapter", "base"]
    # The worker is a process of its own, at the lowest priority, and no task's: cancelling or
    # counting a task's processes never touches it.
    (worker,) = workers()
    assert worker.nice() == 19
    assert "FTSTUDIO_TASK_ID" not in worker.environ()


def test_a_checkpoint_answers_when_asked_and_a_missing_one_is_a_404(studio: Studio, trained: tuple[Path, str]) -> None:
    _, tid = trained
    events = chat(studio, tid, {**say("hi"), "checkpoint": "checkpoint-3", "max_new_tokens": 4})
    assert ("ready", {"weights": "checkpoint-3"}) in events
    r = studio.http.post(f"/api/tasks/{tid}/chat", json={**say("hi"), "checkpoint": "checkpoint-999"})
    assert r.status_code == 404 and "has no complete checkpoint-999" in r.json()["detail"]
    r = studio.http.post("/api/tasks/20990101-0000-ffffff/chat", json=say("hi"))
    assert r.status_code == 404
    r = studio.http.post(f"/api/tasks/{tid}/chat", json={**say("hi"), "temperature": 9})
    assert r.status_code == 422 and r.json()["detail"] == "temperature: must be at least 0 and at most 2 (got 9)"
    r = studio.http.post(f"/api/tasks/{tid}/chat", content=b"not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 422


def test_what_can_answer_is_listed_newest_first(studio: Studio, trained: tuple[Path, str]) -> None:
    _, tid = trained
    r = studio.http.get(f"/api/tasks/{tid}/checkpoints")
    assert r.json() == {"adapter": True, "checkpoints": [{"name": "checkpoint-6", "step": 6},
                                                         {"name": "checkpoint-3", "step": 3}]}  # fmt: skip
    assert studio.http.get("/api/tasks/20990101-0000-ffffff/checkpoints").status_code == 404


def test_a_worker_that_dies_mid_reply_says_so_and_the_next_message_starts_another(
    studio: Studio, trained: tuple[Path, str]
) -> None:
    _, tid = trained
    chat(studio, tid, {**say("hi"), "max_new_tokens": 2})  # loaded
    (worker,) = workers()
    got: list[tuple[str, dict[str, Any]]] = []
    with httpx.stream(
        "POST", f"{studio.url}/api/tasks/{tid}/chat", json={**say("hi"), "max_new_tokens": 4000, "temperature": 1.0},
        headers=studio.auth, timeout=120,
    ) as r:  # fmt: skip
        name = "message"
        for line in r.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                got.append((name, json.loads(line[6:])))
                if name == "token" and sum(1 for n, _ in got if n == "token") == 3:
                    worker.send_signal(signal.SIGKILL)  # a crash: out of memory, a bad kernel
    assert got[-1][0] == "error" and "the chat worker stopped unexpectedly" in got[-1][1]["message"], got[-3:]
    assert studio.http.get("/api/health").status_code == 200  # the studio did not notice beyond that
    again = chat(studio, tid, {**say("hi"), "max_new_tokens": 2})
    assert again[-1][0] == "end" and workers()[0].pid != worker.pid


def test_a_page_that_goes_away_mid_reply_frees_the_worker_for_the_next_message(
    studio: Studio, trained: tuple[Path, str]
) -> None:
    _, tid = trained
    chat(studio, tid, {**say("hi"), "max_new_tokens": 2})  # loaded
    with httpx.stream(
        "POST", f"{studio.url}/api/tasks/{tid}/chat", json={**say("hi"), "max_new_tokens": 4000, "temperature": 1.0},
        headers=studio.auth, timeout=120,
    ) as r:  # fmt: skip
        tokens = 0
        for line in r.iter_lines():
            tokens += line == "event: token"
            if tokens == 3:
                break  # the page closes: the connection goes
    started = time.monotonic()
    again = chat(studio, tid, {**say("hi"), "max_new_tokens": 2})
    assert again[-1][0] == "end", again[-2:]
    assert time.monotonic() - started < 20  # not the 30 s a message waits behind another before a 409


def test_the_model_is_unloaded_after_the_idle_time(studio: Studio, trained: tuple[Path, str]) -> None:
    _, tid = trained
    chat(studio, tid, {**say("hi"), "max_new_tokens": 2})
    assert workers()
    wait_for(lambda: not workers(), timeout=30, what="the idle worker to exit (FTSTUDIO_CHAT_IDLE_S=4)")


def test_a_second_message_while_one_is_answered_is_refused_with_why(tmp_path: Path) -> None:
    worker = ChatWorker(tmp_path / "chat.log")
    assert worker._lock.acquire()  # another message is being answered
    import ftstudio.chat as chat_mod

    before, chat_mod.BUSY_WAIT_S = chat_mod.BUSY_WAIT_S, 0.1
    try:
        with pytest.raises(ChatBusy, match="the chat is answering another message"):
            worker.chat(parse_request(say("hi")), base="x", weights=tmp_path)
    finally:
        chat_mod.BUSY_WAIT_S = before
        worker._lock.release()
    assert ChatBusy.http_status == 409 and worker.pid() is None  # refused before anything started


# -- `ftstudio chat` in a terminal ---------------------------------------------------------------------


def read_until(fd: int, needle: bytes, timeout: float = 120) -> bytes:
    seen = b""
    deadline = time.monotonic() + timeout
    while needle not in seen:
        left = deadline - time.monotonic()
        assert left > 0, f"no {needle!r} in {seen[-500:]!r}"
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            seen += chunk
    return seen


def test_ftstudio_chat_in_a_real_terminal(trained: tuple[Path, str]) -> None:
    home, tid = trained
    pid, fd = pty.fork()
    if pid == 0:  # the child: the command, on the terminal
        os.execve(sys.executable, [sys.executable, "-m", "ftstudio", "chat", tid, "--max-new-tokens", "8",
                                   "--compare"], home_env(home))  # fmt: skip
    try:
        banner = read_until(fd, b"you> ")
        assert b"chatting with" in banner and b"/reset starts the conversation over" in banner
        os.write(fd, b"Reverse the word: stone\r")
        reply = read_until(fd, b"you> ")
        assert b"model> " in reply and b"base>  " in reply, reply
        os.write(fd, b"/reset\r")
        assert b"(a new conversation)" in read_until(fd, b"you> ")
        os.write(fd, b"/quit\r")
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        os.close(fd)
    wait_for(lambda: not [w for w in workers() if w.environ().get("FTSTUDIO_HOME") == str(home)], timeout=15,
             what="the terminal's worker to end with it")  # fmt: skip


def test_chat_with_a_task_that_has_no_weights_yet_says_why(trained: tuple[Path, str]) -> None:
    home, _ = trained
    queued = run_cli(home, "submit", "--name", "scripted steps=400 delay=0.05", scripted=True).stdout.strip()
    r = subprocess.run(
        [sys.executable, "-m", "ftstudio", "chat", queued],
        env=home_env(home, scripted=True), capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    run_cli(home, "cancel", queued)
    assert r.returncode == 2 and "has no adapter or checkpoint yet; chat works once training has saved one" in r.stderr
