"""A shutdown is not a cancel. SIGTERM without the task dir's cancel.request (a machine shutdown, `docker
stop`, a scheduler) makes the trainer checkpoint at its next step and the runner record `interrupted`;
with cancel.request it is a person's cancel, at once. Real runner, real trainer, real signals, on
builtin:tiny."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import psutil
import pytest
from support import own_id, wait_for
from test_pause import _config, _finish, _progress_steps, _ranks, _start_runner, _two_process_task
from trainer_fixtures import ALPACA, read_events, shared_home, write_jsonl, write_spec

from ftstudio.checkpoints import find_resume_checkpoint, is_complete
from ftstudio.execution.procs import tagged
from ftstudio.home import TaskDir, read_json

pytestmark = pytest.mark.process  # every test here starts the real runner

OUTSIDE = "stopped by SIGTERM from outside the studio (a shutdown, docker stop or a scheduler)"


def _task(tmp_path: Path, name: str, **over: object) -> Path:
    task = tmp_path / own_id(name)
    write_spec(task, _config(write_jsonl(tmp_path / "d.jsonl", ALPACA), optim={"max_steps": 60}, **over), shared_home())
    return task


def _after_step(runner: object, task: Path, step: int) -> None:
    wait_for(lambda: any(s >= step for s in _progress_steps(task)), timeout=180, interval=0.02, what=f"step {step}")


def _trainer(task: Path) -> psutil.Process:
    return psutil.Process(read_json(TaskDir(task).launch)["trainer_pid"])


def _assert_interrupted_with_a_checkpoint(task: Path, record: dict[str, object]) -> int:
    assert record["outcome"] == "interrupted", record
    step = record["step"]
    assert isinstance(step, int) and step > 0
    assert record["checkpoint"] == f"checkpoint-{step}" and record["saved"] is True
    assert record["reason"] == f"{OUTSIDE} at step {step}/60 after saving checkpoint-{step}; it resumes from there"
    ckpt = task / "checkpoints" / f"checkpoint-{step}"
    assert is_complete(ckpt) and find_resume_checkpoint(task / "checkpoints") == ckpt
    assert not (task / "adapter").exists()
    return step


@pytest.mark.slow
def test_sigterm_to_the_runner_without_a_cancel_request_checkpoints_and_is_interrupted(tmp_path: Path) -> None:
    task = _task(tmp_path, "20261122-0000-shut01")
    runner = _start_runner(task)
    _after_step(runner, task, 3)
    sent = time.monotonic()
    runner.send_signal(signal.SIGTERM)
    record = _finish(runner, task)
    took = time.monotonic() - sent
    step = _assert_interrupted_with_a_checkpoint(task, record)
    assert record["exit_code"] == 76 and record["signal"] is None
    suspended = read_events(task)[-1]
    assert suspended["kind"] == "suspended" and suspended["step"] == step
    saved = [e for e in read_events(task) if e["kind"] == "checkpoint"][-1]
    print(
        f"runner SIGTERM -> exit {took:.2f}s, stopped at step {step}, checkpoint {saved['seconds']}s {saved['bytes']} B"
    )
    assert took < 8  # within SHUTDOWN_GRACE_S: the checkpoint was made, not killed for


@pytest.mark.slow
def test_sigterm_with_a_cancel_request_is_a_cancel_at_once(tmp_path: Path) -> None:
    task = _task(tmp_path, "20261122-0000-shut02")
    runner = _start_runner(task)
    _after_step(runner, task, 2)
    TaskDir(task).cancel_request.write_text("{}")
    sent = time.monotonic()
    runner.send_signal(signal.SIGTERM)
    record = _finish(runner, task)
    took = time.monotonic() - sent
    assert record["outcome"] == "cancelled" and record["reason"] == "stopped on request (SIGTERM)", record
    assert record["signal"] == "SIGTERM"  # the trainer died of it: no step finished, nothing saved
    assert [e for e in read_events(task) if e["kind"] in ("checkpoint", "suspended")] == []
    print(f"cancel: SIGTERM -> runner exit {took:.2f}s")
    assert took < 5


@pytest.mark.slow
def test_sigterm_to_every_process_at_once_checkpoints_and_is_interrupted(tmp_path: Path) -> None:
    """A machine shutdown: the runner and the trainer get SIGTERM in the same instant."""
    task = _task(tmp_path, "20261122-0000-shut03")
    runner = _start_runner(task)
    _after_step(runner, task, 3)
    trainer = _trainer(task)
    sent = time.monotonic()
    for pid in (runner.pid, trainer.pid):
        os.kill(pid, signal.SIGTERM)
    record = _finish(runner, task)
    took = time.monotonic() - sent
    _assert_interrupted_with_a_checkpoint(task, record)
    assert read_events(task)[-1]["shutdown"] is True  # the trainer knew it for a shutdown itself
    print(f"everything SIGTERMed -> runner exit {took:.2f}s")


@pytest.mark.slow
def test_sigterm_to_the_trainer_alone_is_interrupted_too(tmp_path: Path) -> None:
    task = _task(tmp_path, "20261122-0000-shut04")
    runner = _start_runner(task)
    _after_step(runner, task, 2)
    _trainer(task).send_signal(signal.SIGTERM)
    _assert_interrupted_with_a_checkpoint(task, _finish(runner, task))


@pytest.mark.slow
def test_a_trainer_that_cannot_checkpoint_within_the_grace_is_killed_without_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A grace of 0 s: no step and save can finish in it, as a long step on a big model cannot in 8 s.
    Every process of the task is SIGKILLed; the record points at the previous checkpoint."""
    monkeypatch.setenv("FTSTUDIO_SHUTDOWN_GRACE_S", "0")
    task = _task(tmp_path, "20261122-0000-shut05", checkpoint={"every_steps": 2, "keep": 2})
    runner = _start_runner(task)
    wait_for(
        lambda: any(e["kind"] == "checkpoint" for e in read_events(task)) and max(_progress_steps(task)) >= 3,
        timeout=180,
        interval=0.02,
        what="a checkpoint and step 3",
    )
    # Held mid-run (SIGSTOP), as a long step holds a big model's trainer: on a fast machine a trainer of
    # builtin:tiny could otherwise save and exit in the moment between the runner's SIGTERM and its SIGKILL.
    _trainer(task).suspend()
    sent = time.monotonic()
    runner.send_signal(signal.SIGTERM)
    record = _finish(runner, task)  # asserts that no process of the task is left
    took = time.monotonic() - sent
    assert record["outcome"] == "interrupted" and record["saved"] is False, record
    assert record["cause"] == "machine"  # a shutdown: never counted against the run's restarts
    assert record["signal"] == "SIGKILL"
    newest = find_resume_checkpoint(task / "checkpoints")
    assert newest is not None and record["checkpoint"] == newest.name
    step = record["step"]
    assert record["reason"] == (
        f"{OUTSIDE} after step {step}/60 before it could save a checkpoint; it resumes from {newest.name}"
    )
    assert "did not stop within the shutdown's grace; SIGKILLed" in (task / "training.log").read_text()
    print(f"grace 0: SIGTERM -> runner exit {took:.2f}s, resumes from {newest.name} (reached step {step})")
    assert took < 5


@pytest.mark.slow
def test_two_processes_sigterm_to_every_process_is_interrupted_and_leaves_none(tmp_path: Path) -> None:
    """Runner, torchrun's agent and both ranks SIGTERMed at once. The agent passes its SIGTERM on to the
    ranks and waits for them; the ranks agree on the step (all-reduce), checkpoint and exit 0."""
    task = _two_process_task(tmp_path, "20261122-0000-shut06", steps=200)
    runner = _start_runner(task)
    try:
        wait_for(lambda: runner.poll() is not None or _progress_steps(task), timeout=180, what="the first step")
        assert len(_ranks(task)) == 2
        everyone = [runner.pid, *(p.pid for p in tagged(task.name))]
        assert len(everyone) == 4
        sent = time.monotonic()
        for pid in everyone:
            os.kill(pid, signal.SIGTERM)
        record = _finish(runner, task, timeout=120)
        took = time.monotonic() - sent
    finally:
        for p in tagged(task.name):
            p.kill()
    assert record["outcome"] == "interrupted", (record, (task / "training.log").read_text()[-3000:])
    step = record["step"]
    assert record["checkpoint"] == f"checkpoint-{step}" and record["saved"] is True
    assert is_complete(task / "checkpoints" / f"checkpoint-{step}")
    assert tagged(task.name) == []
    print(f"two processes, everything SIGTERMed -> runner exit {took:.2f}s at step {step}")
