"""Checkpoints under fire: a disk that fills during a save ends the attempt with one line and keeps the
previous checkpoint; a checkpoint damaged mid-write is never resumed from; each save reports its cost.
The real trainer on builtin:tiny; the full disk is a real small tmpfs where this machine allows mounting
(root), and an injected ENOSPC at the save everywhere."""

from __future__ import annotations

import errno
import json
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from trainer_fixtures import ALPACA, FAST, merged, read_events, shared_home, train, write_jsonl

from ftstudio.checkpoints import MARKER, find_resume_checkpoint, is_complete, list_checkpoints


def _config(data: Path, steps: int = 4, **over: Any) -> dict[str, Any]:
    return merged(
        FAST,
        merged(
            {
                "data": {"path": str(data)},
                "optim": {"max_steps": steps},
                "checkpoint": {"every_steps": 2, "keep": 2},
            },
            over,
        ),
    )


@contextmanager
def tmpfs(where: Path, size: str) -> Iterator[None]:
    """A real tmpfs of `size` mounted at `where`; skip where this machine does not allow it (needs root)."""
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode(errors='replace').strip()}")
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True, check=False)


def _checkpoint_events(task: Path) -> list[dict[str, Any]]:
    return [e for e in read_events(task) if e["kind"] == "checkpoint"]


@pytest.mark.slow
def test_each_checkpoint_reports_its_seconds_and_bytes_and_the_summary_the_totals(tmp_path: Path) -> None:
    task = tmp_path / "task"
    code, evs = train(task, _config(write_jsonl(tmp_path / "d.jsonl", ALPACA)), shared_home())
    assert code == 0
    saved = _checkpoint_events(task)
    assert [e["step"] for e in saved] == [2, 4]
    for e in saved:
        ckpt = Path(e["path"])
        on_disk = sum(p.stat().st_size for p in ckpt.rglob("*") if p.is_file() and p.name != MARKER)
        assert e["bytes"] == on_disk and 0 < e["seconds"] < 30
    end = evs[-1]
    assert end["kind"] == "train_end" and end["checkpoints_saved"] == 2
    assert end["checkpoint_bytes"] == sum(e["bytes"] for e in saved)
    assert end["checkpoint_s"] == pytest.approx(sum(e["seconds"] for e in saved), abs=0.01)
    summary = json.loads((task / "adapter" / "summary.json").read_text())
    assert summary["checkpoint_bytes"] == end["checkpoint_bytes"]
    print(f"checkpoint cost on tiny: {[(e['seconds'], e['bytes']) for e in saved]}")


def _assert_disk_full_kept_the_previous(task: Path, code: int) -> str:
    assert code == 1
    error = read_events(task)[-1]
    assert error["kind"] == "error" and error["error_type"] == "TrainingFailed"
    message = error["message"]
    assert message.startswith("disk full while saving checkpoint 4 in ") and "\n" not in message
    assert message.endswith("it continues from checkpoint-2"), message
    ckpts = task / "checkpoints"
    assert [p.name for p in list_checkpoints(ckpts)] == ["checkpoint-2"]  # the partial one went
    assert find_resume_checkpoint(ckpts) == ckpts / "checkpoint-2" and is_complete(ckpts / "checkpoint-2")
    assert not (task / "adapter").exists()
    return message


@pytest.mark.slow
@pytest.mark.process
def test_a_disk_that_fills_during_a_save_ends_with_one_line_and_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    """checkpoints/ on a real tmpfs with room for one checkpoint (about 0.9 MB on tiny), not two."""
    task = tmp_path / "task"
    (task / "checkpoints").mkdir(parents=True)
    data = write_jsonl(tmp_path / "d.jsonl", ALPACA)
    with tmpfs(task / "checkpoints", "1400k"):
        code, _ = train(task, _config(data), shared_home())
        message = _assert_disk_full_kept_the_previous(task, code)
    print(f"real full tmpfs: {message}")


@pytest.mark.slow
def test_an_enospc_from_the_save_ends_with_one_line_and_keeps_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same at the boundary, for machines where no tmpfs can be mounted: the optimizer state of
    checkpoint 4 fails to write after its weights are on disk."""
    from ftstudio.training.recipe import StudioTrainer

    real = StudioTrainer._save_optimizer_and_scheduler

    def full_at_4(self: StudioTrainer, output_dir: str) -> None:
        if self.state.global_step == 4:
            Path(output_dir, "optimizer.pt").write_bytes(b"\0" * 1000)  # half written
            raise OSError(errno.ENOSPC, "No space left on device")
        real(self, output_dir)

    monkeypatch.setattr(StudioTrainer, "_save_optimizer_and_scheduler", full_at_4)
    task = tmp_path / "task"
    code, _ = train(task, _config(write_jsonl(tmp_path / "d.jsonl", ALPACA)), shared_home())
    _assert_disk_full_kept_the_previous(task, code)


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncated weights", "no marker"])
def test_a_checkpoint_damaged_mid_write_is_never_resumed_from(tmp_path: Path, damage: str) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", ALPACA)
    task = tmp_path / "task"
    code, _ = train(task, _config(data, steps=6, checkpoint={"every_steps": 2, "keep": 3}), shared_home())
    assert code == 0
    ckpts = task / "checkpoints"
    newest = ckpts / "checkpoint-6"
    assert find_resume_checkpoint(ckpts) == newest
    if damage == "truncated weights":
        weights = newest / "adapter_model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    else:
        (newest / MARKER).unlink()
    assert not is_complete(newest) and find_resume_checkpoint(ckpts) == ckpts / "checkpoint-4"

    # The trainer resumes from the one before and trains the last two steps again.
    (task / "events.jsonl").unlink()
    code, evs = train(
        task, _config(data, steps=6, checkpoint={"every_steps": 2, "keep": 3, "resume_from": "auto"}), shared_home()
    )
    assert code == 0
    begin = next(e for e in evs if e["kind"] == "train_begin")
    assert begin["resumed_from_step"] == 4 and evs[-1]["steps"] == 6
    assert is_complete(newest)  # the damaged one was removed and written again
