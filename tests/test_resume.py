"""Checkpoints and resume: a SIGKILLed run resumed with `auto` ends where an uninterrupted one does."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from trainer_fixtures import ALPACA, FAST, merged, read_events, shared_home, train, write_jsonl, write_spec

from ftstudio.checkpoints import MARKER, find_resume_checkpoint, is_complete, list_checkpoints, prune

ROOT = Path(__file__).resolve().parents[1]


def _config(data: Path) -> dict:
    # Dropout on, several epochs, grad accumulation: everything resume must restore.
    return merged(
        FAST,
        {
            "data": {"path": str(data)},
            "lora": {"dropout": 0.1},
            "optim": {"max_steps": -1, "epochs": 3.0, "batch_size": 2, "grad_accum": 2},
            "checkpoint": {"every_steps": 4, "keep": 2},
        },
    )


@pytest.mark.process
@pytest.mark.slow
def test_sigkill_then_auto_resume_matches_uninterrupted_run(tmp_path: Path) -> None:
    home = shared_home()
    data = write_jsonl(tmp_path / "d.jsonl", ALPACA)
    config = _config(data)  # 16 rows / (2 x 2) = 4 steps an epoch, 12 steps

    code, straight = train(tmp_path / "straight", config, home)
    assert code == 0
    straight_end = straight[-1]

    task = tmp_path / "killed"
    spec = write_spec(task, config, home)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "ftstudio.train", str(spec)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not any(e["kind"] == "checkpoint" and e["step"] >= 4 for e in read_events(task)):
            assert proc.poll() is None, "trainer exited before its first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    killed_at = max(e["step"] for e in read_events(task) if e["kind"] == "checkpoint")
    assert killed_at < 12 and not (task / "adapter").exists()

    config["checkpoint"]["resume_from"] = "auto"
    code, events = train(task, config, home)
    assert code == 0
    begin = [e for e in events if e["kind"] == "train_begin"][-1]
    assert begin["resumed_from_step"] >= 4
    end = events[-1]
    assert end["kind"] == "train_end" and end["steps"] == straight_end["steps"] == 12
    assert end["epochs"] == straight_end["epochs"]
    assert end["final_loss"] == pytest.approx(straight_end["final_loss"], rel=1e-3, abs=1e-3)
    # same step numbering: the resumed run's progress continues where the checkpoint left off
    resumed_steps = [e["step"] for e in events if e["kind"] == "progress" and e["ts"] >= begin["ts"]]
    assert resumed_steps == list(range(begin["resumed_from_step"] + 1, 13))
    straight_losses = {e["step"]: e["loss"] for e in straight if e["kind"] == "progress"}
    for e in events:
        if e["kind"] == "progress" and e["ts"] >= begin["ts"]:
            assert e["loss"] == pytest.approx(straight_losses[e["step"]], rel=1e-3, abs=1e-3)


def _checkpointed_run(tmp_path: Path) -> Path:
    data = write_jsonl(tmp_path / "d.jsonl", ALPACA)
    config = merged(
        FAST, {"data": {"path": str(data)}, "optim": {"max_steps": 6}, "checkpoint": {"every_steps": 2, "keep": 3}}
    )
    code, _ = train(tmp_path / "task", config, shared_home())
    assert code == 0
    return tmp_path / "task" / "checkpoints"


@pytest.mark.slow
def test_partial_checkpoints_are_skipped(tmp_path: Path) -> None:
    ckpts = _checkpointed_run(tmp_path)
    assert [p.name for p in list_checkpoints(ckpts)] == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    assert all(is_complete(p) for p in list_checkpoints(ckpts))
    assert find_resume_checkpoint(ckpts) == ckpts / "checkpoint-6"

    # a kill mid-write: truncated weights in the newest
    weights = ckpts / "checkpoint-6" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    assert not is_complete(ckpts / "checkpoint-6")
    assert find_resume_checkpoint(ckpts) == ckpts / "checkpoint-4"

    # a kill before the marker was written
    (ckpts / "checkpoint-4" / MARKER).unlink()
    assert find_resume_checkpoint(ckpts) == ckpts / "checkpoint-2"

    # a truncated optimizer state (sizes recorded in the marker no longer match)
    optimizer = ckpts / "checkpoint-2" / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:100])
    assert find_resume_checkpoint(ckpts) is None


@pytest.mark.slow
def test_trainer_state_must_match_the_step(tmp_path: Path) -> None:
    ckpts = _checkpointed_run(tmp_path)
    state_path = ckpts / "checkpoint-6" / "trainer_state.json"
    state = json.loads(state_path.read_text())
    state["global_step"] = 5
    state_path.write_text(json.dumps(state))
    assert not is_complete(ckpts / "checkpoint-6")


@pytest.mark.slow
def test_resume_auto_skips_a_partial_checkpoint(tmp_path: Path) -> None:
    from ftstudio.training.trainer import main

    ckpts = _checkpointed_run(tmp_path)
    (ckpts / "checkpoint-6" / MARKER).unlink()
    (tmp_path / "task" / "adapter").rename(tmp_path / "old-adapter")
    # the spec still says a fresh start; --resume auto overrides it, as the supervisor will
    assert main([str(tmp_path / "task" / "spec.json"), "--resume", "auto"]) == 0
    begin = [e for e in read_events(tmp_path / "task") if e["kind"] == "train_begin"][-1]
    assert begin["resumed_from_step"] == 4
    assert is_complete(ckpts / "checkpoint-6")  # rewritten by the resumed run, and complete this time


@pytest.mark.slow
def test_prune_keeps_the_newest_complete(tmp_path: Path) -> None:
    ckpts = _checkpointed_run(tmp_path)
    (ckpts / "checkpoint-6" / MARKER).unlink()
    prune(ckpts, 2)
    # checkpoint-6 is partial, so the two newest complete ones (2 and 4) both stay
    assert [p.name for p in list_checkpoints(ckpts)] == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
