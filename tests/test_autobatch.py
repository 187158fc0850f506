"""optim.auto_batch: a batch that runs out of memory is split into parts and the run goes on from the same step,
on the same curve. The out-of-memory here is a GPU's stand-in (a forward hook that refuses batches over N rows
with torch's own OutOfMemoryError); the real ones are a memory-limited task on the CPU (test_memory_limit_batch
below) and a CUDA run in the GPU check (tests/gpu)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from trainer_fixtures import FAST, merged, read_events, shared_home
from transformers import TrainerCallback

from ftstudio.config import TrainingConfig
from ftstudio.errors import ValidationError
from ftstudio.events import EventWriter
from ftstudio.training import autobatch
from ftstudio.training.trainer import out_of_memory_message


class RefuseAbove(TrainerCallback):
    """A device that holds at most `rows` rows at once: a bigger forward raises torch.OutOfMemoryError."""

    def __init__(self, rows: int) -> None:
        self.rows = rows
        self.refused = 0

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        def hook(_module: Any, _args: Any, inputs: dict[str, Any]) -> None:
            ids = inputs.get("input_ids")
            if ids is not None and ids.shape[0] > self.rows:
                self.refused += 1
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

        model.register_forward_pre_hook(hook, with_kwargs=True)


def losses(task_dir: Path) -> list[float]:
    return [e["loss"] for e in read_events(task_dir) if e["kind"] == "progress"]


def train(task_dir: Path, over: dict[str, Any], callbacks: list[Any] | None = None) -> list[dict[str, Any]]:
    from ftstudio.training.recipe import run

    task_dir.mkdir(parents=True, exist_ok=True)
    cfg = TrainingConfig.from_dict(merged(FAST, over))
    events = EventWriter(task_dir / "events.jsonl")
    try:
        run(cfg, task_dir, shared_home(), events, callbacks=callbacks)
    finally:
        events.close()
    return read_events(task_dir)


def test_split_inputs_slices_rows_and_keeps_what_is_not_per_row() -> None:
    inputs = {"input_ids": torch.arange(10).reshape(5, 2), "labels": torch.ones(5, 2), "n": torch.tensor(7)}
    pieces = autobatch.split_inputs(inputs, 2)
    assert [n for _, n in pieces] == [2, 3]
    assert torch.equal(torch.cat([p["input_ids"] for p, _ in pieces]), inputs["input_ids"])
    assert all(p["n"] is inputs["n"] for p, _ in pieces)
    assert [n for _, n in autobatch.split_inputs(inputs, 8)] == [1, 1, 1, 1, 1]  # never an empty part
    assert autobatch.split_inputs({"input_ids": torch.zeros(1, 3)}, 4)[0][1] == 1


def test_parts_are_kept_in_the_task_folder(tmp_path: Path) -> None:
    assert autobatch.read_parts(tmp_path) == 1
    autobatch.write_parts(tmp_path, 4, 8, 3)
    assert autobatch.read_parts(tmp_path) == 4
    (tmp_path / autobatch.SPLIT_FILE).write_text("{not json")
    assert autobatch.read_parts(tmp_path) == 1


@pytest.mark.slow
def test_out_of_memory_splits_the_batch_and_the_curve_stays_the_same(tmp_path: Path) -> None:
    train(tmp_path / "whole", {})
    whole = losses(tmp_path / "whole")
    refuse = RefuseAbove(1)
    events = train(tmp_path / "split", {"optim": {"auto_batch": True}}, [refuse])
    losses_of = losses(tmp_path / "split")
    assert len(losses_of) == len(whole) == 4
    assert losses_of == pytest.approx(whole, rel=1e-4), "splitting changed the curve"
    # Batch 4 -> 2 parts of 2 (refused) -> 4 parts of 1, both at the first step; never again after.
    assert refuse.refused == 2
    said = [e["message"] for e in events if e["kind"] == "status" and "out of memory" in e.get("message", "")]
    assert said == [
        "out of memory at step 1: batch 4 trains in 2 parts of 2 rows, one after the other (the effective batch "
        "and the curve stay the same); going on",
        "out of memory at step 1: batch 4 trains in 4 parts of 1 rows, one after the other (the effective batch "
        "and the curve stay the same); going on",
    ]
    assert json.loads((tmp_path / "split" / autobatch.SPLIT_FILE).read_text())["parts"] == 4
    end = next(e for e in events if e["kind"] == "train_end")
    assert end["tokens"] == next(e for e in read_events(tmp_path / "whole") if e["kind"] == "train_end")["tokens"]


@pytest.mark.slow
def test_without_auto_batch_out_of_memory_fails_naming_the_setting(tmp_path: Path) -> None:
    with pytest.raises(torch.OutOfMemoryError) as caught:
        train(tmp_path / "t", {}, [RefuseAbove(2)])
    message = out_of_memory_message(caught.value)
    assert message is not None and "optim.batch_size (--batch-size)" in message and "optim.auto_batch" in message


@pytest.mark.slow
def test_a_resumed_run_starts_with_the_split_an_earlier_attempt_found(tmp_path: Path) -> None:
    (tmp_path / "t").mkdir()
    autobatch.write_parts(tmp_path / "t", 2, 4, 1)
    refuse = RefuseAbove(2)
    events = train(tmp_path / "t", {"optim": {"auto_batch": True}}, [refuse])
    assert refuse.refused == 0
    assert any("as an earlier attempt found: batch 4 trains in 2 parts" in e.get("message", "") for e in events)


@pytest.mark.parametrize(
    ("over", "words"),
    [
        ({"method": "grpo", "rewards": ["numeric"]}, "computes its loss across the whole batch"),
        ({"method": "kto"}, "computes its loss across the whole batch"),
        ({"resources": {"processes": 2}}, "in one training process only"),
    ],
)
def test_auto_batch_is_refused_where_splitting_would_change_the_run(over: dict[str, Any], words: str) -> None:
    with pytest.raises(ValidationError) as caught:
        TrainingConfig.from_dict(merged({"optim": {"auto_batch": True}}, over))
    assert "optim.auto_batch (--auto-batch)" in str(caught.value) and words in str(caught.value)
