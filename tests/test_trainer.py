"""The trainer end to end on builtin:tiny: real training, real events, real exit codes."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import load_file, save_file
from trainer_fixtures import (
    ALPACA,
    FAST,
    MESSAGES,
    SHAREGPT,
    TEXT,
    merged,
    read_events,
    shared_home,
    train,
    write_jsonl,
    write_spec,
)

from ftstudio.training.builtin import tiny_model_dir


def kinds(events: list[dict]) -> list[str]:
    return [e["kind"] for e in events]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("rows", "shape"), [(ALPACA, "alpaca"), (SHAREGPT, "sharegpt"), (MESSAGES, "messages"), (TEXT, "text")]
)
def test_each_data_shape_trains(tmp_path: Path, rows, shape) -> None:
    data = write_jsonl(tmp_path / f"{shape}.jsonl", rows)
    code, events = train(tmp_path / "task", merged(FAST, {"data": {"path": str(data)}}), shared_home())
    assert code == 0, events[-1]
    progress = [e for e in events if e["kind"] == "progress"]
    assert [e["step"] for e in progress] == [1, 2, 3, 4]
    assert all(math.isfinite(e["loss"]) and e["tokens_per_s"] > 0 for e in progress)
    assert (tmp_path / "task" / "adapter" / "adapter_model.safetensors").exists()


@pytest.mark.slow
def test_event_sequence_and_summary(tmp_path: Path) -> None:
    config = merged(FAST, {"optim": {"max_steps": 6}, "checkpoint": {"every_steps": 3}, "logging": {"every_steps": 2}})
    config["data"]["validation"] = "0.2"
    code, events = train(tmp_path / "task", config, shared_home())
    assert code == 0
    seq = kinds(events)
    assert seq[:2] == ["status", "status"] and [e["phase"] for e in events[:2]] == ["loading_data", "loading_model"]
    assert seq.index("train_begin") < seq.index("progress") and seq[-1] == "train_end"
    begin = next(e for e in events if e["kind"] == "train_begin")
    assert begin["total_steps"] == 6 and begin["resumed_from_step"] == 0 and begin["trainable_params"] > 0
    assert begin["target_modules"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert [e["step"] for e in events if e["kind"] == "progress"] == [2, 4, 6]
    assert [e["step"] for e in events if e["kind"] == "checkpoint"] == [3, 6]
    assert any(e["kind"] == "eval" and e["step"] == 6 for e in events)
    p = next(e for e in events if e["kind"] == "progress")
    assert {
        "step",
        "total_steps",
        "epoch",
        "total_epochs",
        "loss",
        "lr",
        "grad_norm",
        "tokens_per_s",
        "tokens",
        "eta_s",
    } <= set(p)
    # Tokens seen so far: what the comparison of runs can put on its x axis.
    seen = [e["tokens"] for e in events if e["kind"] == "progress"]
    assert 0 < seen[0] < seen[1] < seen[2]
    adapter = tmp_path / "task" / "adapter"
    summary = json.loads((adapter / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["tokens"] > 0 and summary["final_eval_loss"] is not None
    assert json.loads((adapter / "training_config.json").read_text())["optim"]["max_steps"] == 6
    assert (adapter / "tokenizer.json").exists() and (adapter / "adapter_config.json").exists()


@pytest.mark.slow
def test_packing_trains(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", ALPACA)
    code, events = train(tmp_path / "task", merged(FAST, {"data": {"path": str(data), "packing": True}}), shared_home())
    assert code == 0
    begin = next(e for e in events if e["kind"] == "train_begin")
    assert begin["packing"] and begin["train_rows"] < begin["train_examples"]


@pytest.mark.slow
def test_sample_eval_loss_falls(tmp_path: Path) -> None:
    """The demo settings on builtin:sample: eval loss after training clearly below before."""
    code, events = train(tmp_path / "task", {"preset": "cpu-demo", "optim": {"epochs": 1.0}}, shared_home())
    assert code == 0
    evals = [e["eval_loss"] for e in events if e["kind"] == "eval"]
    assert evals[0] - evals[-1] > 1.5, evals
    losses = [e["loss"] for e in events if e["kind"] == "progress"]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 1.0


def test_bad_data_fails_before_the_model_loads(tmp_path: Path) -> None:
    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "a"}\n{"text": "b"}\n{"text": \n')
    code, events = train(tmp_path / "task", merged(FAST, {"data": {"path": str(data)}}), shared_home())
    assert code == 2
    assert kinds(events) == ["status", "error"]
    assert "data.jsonl line 3: not valid JSON" in events[-1]["message"]


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"model": {"name": "builtin:nope"}}, "unknown built-in model"),
        ({"optim": {"learning_rate": -1}}, "optim.learning_rate (--lr): must be positive"),
        ({"data": {"path": "no-such-dataset"}}, "no dataset 'no-such-dataset'"),
        ({"checkpoint": {"resume_from": "/no/such/checkpoint-3"}}, "does not exist"),
        ({"checkpoint": {"resume_from": "checkpoint-3"}}, "not a complete checkpoint"),
        ({"model": {"name": "someorg/model-not-in-cache"}}, "not in the local Hugging Face cache"),
        ({"model": {"quantization": "4bit"}}, "4bit quantization needs"),
    ],
)
def test_bad_config_is_exit_2_with_one_error_event(
    tmp_path: Path, config: dict, message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, events = train(tmp_path / "task", merged(FAST, config), shared_home())
    assert code == 2
    errors = [e for e in events if e["kind"] == "error"]
    assert len(errors) == 1 and message in errors[0]["message"]
    assert "train_begin" not in kinds(events)


def test_empty_dataset_is_refused(tmp_path: Path) -> None:
    (tmp_path / "d.jsonl").write_text("")
    code, events = train(tmp_path / "task", merged(FAST, {"data": {"path": str(tmp_path / "d.jsonl")}}), shared_home())
    assert code == 2 and "has no rows" in events[-1]["message"]


@pytest.mark.slow
def test_nan_loss_stops_with_a_clear_error(tmp_path: Path) -> None:
    """A model whose weights hold NaN: the guard stops at the first step and keeps no bad checkpoint."""
    broken = tmp_path / "broken-model"
    broken.mkdir()
    for f in tiny_model_dir(shared_home()).iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    weights = load_file(broken / "model.safetensors")
    name = next(k for k in weights if k.endswith("layers.0.mlp.down_proj.weight"))
    weights[name][0, 0] = float("nan")
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    data = write_jsonl(tmp_path / "d.jsonl", ALPACA)
    config = merged(
        FAST, {"model": {"name": str(broken)}, "data": {"path": str(data)}, "checkpoint": {"every_steps": 1}}
    )
    code, events = train(tmp_path / "task", config, shared_home())
    assert code == 1
    assert events[-1]["kind"] == "error" and "not a number" in events[-1]["message"]
    assert "lower optim.learning_rate" in events[-1]["message"]
    assert not (tmp_path / "task" / "adapter").exists()
    assert not list((tmp_path / "task" / "checkpoints").glob("checkpoint-*"))


def _allocate_too_much(*args: object, **kwargs: object) -> None:
    import torch

    torch.empty(2**60)  # 4 EiB of float32, more than any address space: a real refusal from the CPU allocator


def _cuda_out_of_memory(*args: object, **kwargs: object) -> None:
    import torch

    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("failure", "message"),
    [
        (
            _allocate_too_much,
            "out of memory (one allocation of 4,294,967,296.0 GiB was refused): lower optim.batch_size",
        ),
        (_cuda_out_of_memory, "out of GPU memory: lower optim.batch_size"),
    ],
)
def test_out_of_memory_names_the_settings_to_lower(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: Any, message: str
) -> None:
    """A step that cannot get its memory: exit 1, one error event that says what to change, no adapter.
    The CPU case is the allocator's own refusal; a CUDA one needs a GPU, so its exception is raised here."""
    from ftstudio.training.recipe import StudioTrainer

    monkeypatch.setattr(StudioTrainer, "training_step", failure)
    data = write_jsonl(tmp_path / "d.jsonl", ALPACA)
    code, events = train(tmp_path / "task", merged(FAST, {"data": {"path": str(data)}}), shared_home())
    assert code == 1
    errors = [e for e in events if e["kind"] == "error"]
    assert len(errors) == 1 and errors[0]["error_type"] == "OutOfMemoryError"
    assert message in errors[0]["message"]
    assert "data.max_length" in errors[0]["message"] and "model.gradient_checkpointing" in errors[0]["message"]
    assert "train_begin" in kinds(events) and not (tmp_path / "task" / "adapter").exists()


def test_out_of_memory_message_recognises_allocation_failures_only() -> None:
    from ftstudio.training.trainer import out_of_memory_message

    small = RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate 3145728 bytes.")
    assert "(one allocation of 3.0 MiB was refused)" in (out_of_memory_message(small) or "")
    assert "lower optim.batch_size" in (out_of_memory_message(MemoryError()) or "")
    assert out_of_memory_message(RuntimeError("shape mismatch: allocate 12 bytes")) is None
    assert out_of_memory_message(ValueError("DefaultCPUAllocator: can't allocate memory")) is None


@pytest.mark.slow
def test_unpacked_batches_reach_the_model_without_a_padding_mask(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """builtin:tiny is a causal decoder: right padding cannot reach a real token, so training leaves the mask out."""
    from ftstudio.training.recipe import StudioTrainer

    seen: list[set[str]] = []
    original = StudioTrainer.compute_loss

    def spy(self: Any, model: Any, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        seen.append(set(inputs))
        return original(self, model, inputs, *args, **kwargs)

    monkeypatch.setattr(StudioTrainer, "compute_loss", spy)
    data = write_jsonl(tmp_path / "d.jsonl", ALPACA)
    code, _ = train(
        tmp_path / "task", merged(FAST, {"data": {"path": str(data)}, "optim": {"max_steps": 2}}), shared_home()
    )
    assert code == 0 and len(seen) == 2
    assert all("attention_mask" not in keys and {"input_ids", "labels"} <= keys for keys in seen)


@pytest.mark.slow
def test_bare_config_needs_output(tmp_path: Path) -> None:
    from ftstudio.training.trainer import main

    spec = tmp_path / "config.json"
    data = write_jsonl(tmp_path / "d.jsonl", ALPACA)
    spec.write_text(json.dumps(merged(FAST, {"data": {"path": str(data)}, "optim": {"max_steps": 1}})))
    assert main([str(spec)]) == 2
    out = tmp_path / "out"
    assert main([str(spec), "--output", str(out)]) == 0
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    assert read_events(out)[-1]["kind"] == "train_end"


def test_divergence_guard() -> None:
    from ftstudio.errors import TrainingFailed
    from ftstudio.training.progress import LossGuard

    guard = LossGuard(factor=2.0, patience=3)
    for step in range(1, 30):
        guard.check(step, 1.0, 0.5)
    guard.check(30, 1.5, 0.5)  # a noisy step is fine
    with pytest.raises(TrainingFailed, match="diverged at step") as e:
        for step in range(31, 80):
            guard.check(step, 50.0, 0.5)
    assert "lower optim.learning_rate" in str(e.value)
    with pytest.raises(TrainingFailed, match="gradient norm inf is not a number"):
        LossGuard(0, 1).check(1, 1.0, float("inf"))


@pytest.mark.slow
def test_gradient_checkpointing_and_chosen_modules(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", ALPACA)
    config = merged(
        FAST,
        {
            "data": {"path": str(data)},
            "model": {"gradient_checkpointing": True},
            "lora": {"target_modules": ["q_proj", "v_proj"]},
            "optim": {"max_steps": 2},
        },
    )
    code, events = train(tmp_path / "task", config, shared_home())
    assert code == 0, events[-1]
    begin = next(e for e in events if e["kind"] == "train_begin")
    assert begin["target_modules"] == ["q_proj", "v_proj"] and begin["adapted_layers"] == 8
    bad = merged(config, {"lora": {"target_modules": ["no_such_proj"]}})
    code, events = train(tmp_path / "bad", bad, shared_home())
    assert code == 2 and events[-1]["message"].startswith("lora.target_modules")


@pytest.mark.process
@pytest.mark.slow
def test_torchrun_two_processes_only_rank_0_reports(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    data = write_jsonl(tmp_path / "d.jsonl", ALPACA)
    # Held-out prompts answered at a checkpoint: rank 0 generates while rank 1 waits, neither hangs.
    prompts = write_jsonl(tmp_path / "p.jsonl", ALPACA[:2])
    evaluation = {"prompts": str(prompts), "max_new_tokens": 4, "at_checkpoints": True}
    task = tmp_path / "task"
    spec = write_spec(
        task,
        merged(FAST, {"data": {"path": str(data)}, "checkpoint": {"every_steps": 2}, "evaluation": evaluation}),
        shared_home(),
    )
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    done = subprocess.run(
        [*cmd, "-m", "ftstudio.train", str(spec)], env=env, capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    events = read_events(task)
    assert kinds(events).count("train_begin") == 1 and kinds(events).count("train_end") == 1
    assert [e["step"] for e in events if e["kind"] == "progress"] == [1, 2, 3, 4]
    assert [e["step"] for e in events if e["kind"] == "checkpoint"] == [2, 4]
    assert done.stdout.count("training 4 steps") == 1  # one set of log lines, from rank 0
    assert [e["stage"] for e in events if e["kind"] == "samples"] == ["checkpoint-2", "final"]
    assert done.stdout.count("answered 2 held-out prompts") == 2
    assert (task / "adapter" / "adapter_model.safetensors").exists()


@pytest.mark.slow
def test_validation_from_a_file(tmp_path: Path) -> None:
    train_file = write_jsonl(tmp_path / "train.jsonl", ALPACA)
    val_file = write_jsonl(tmp_path / "val.jsonl", MESSAGES[:5])
    config = merged(FAST, {"data": {"path": str(train_file), "validation": str(val_file)}, "optim": {"max_steps": 2}})
    code, events = train(tmp_path / "task", config, shared_home())
    assert code == 0
    begin = next(e for e in events if e["kind"] == "train_begin")
    assert (begin["train_examples"], begin["validation_rows"]) == (16, 5)
    assert [e["step"] for e in events if e["kind"] == "eval"] == [2]


@pytest.mark.slow
def test_tensorboard_reporting_writes_the_loss_beside_the_task(tmp_path: Path, monkeypatch) -> None:
    # Unset for this test and unset again after it (the trainer sets it in its own process; this runs in ours).
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", "unset-below")
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR")
    config = merged(FAST, {"optim": {"max_steps": 2}, "logging": {"report_to": ["tensorboard"]}})
    code, _ = train(tmp_path / "task", config, shared_home())
    assert code == 0
    files = list((tmp_path / "task" / "tensorboard").glob("events.out.tfevents.*"))
    assert len(files) == 1
    assert b"train/loss" in files[0].read_bytes()  # the scalar's tag, in the TFRecord summary


@pytest.mark.process
@pytest.mark.slow
@pytest.mark.process  # torch.compile (inductor) starts compiler processes
def test_compile_with_packing_trains_and_the_adapter_loads(tmp_path: Path) -> None:
    """torch.compile for real (inductor builds C++ kernels): one shape, finite losses, a usable adapter."""
    from ftstudio.training.adapters import generate

    config = merged(FAST, {"model": {"compile": True}, "data": {"packing": True}, "optim": {"max_steps": 3}})
    code, events = train(tmp_path / "task", config, shared_home())
    assert code == 0, [e for e in events if e["kind"] == "error"]
    losses = [e["loss"] for e in events if e["kind"] == "progress"]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    assert isinstance(generate(tmp_path / "task", "What is 1 plus 2?", max_new_tokens=4), str)


@pytest.mark.process
@pytest.mark.slow
@pytest.mark.process  # torch.compile (inductor) starts compiler processes
def test_compile_with_length_grouping_compiles_once_for_every_length(tmp_path: Path, monkeypatch) -> None:
    """Without packing, batches change shape every step: one compile for dynamic shapes serves them
    all (a recompile would raise here), and the run trains as usual."""
    import torch
    import torch._dynamo

    monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)
    torch._dynamo.reset()  # nothing compiled earlier in this process counts
    data = write_jsonl(
        tmp_path / "lengths.jsonl",
        [{"instruction": "Say it " + "again " * n, "input": "", "output": "ok " * (3 * n + 1)} for n in range(16)],
    )
    # builtin:tiny cut to one layer: what is proved (one compile for every shape) does not depend on the
    # depth, and tracing four identical layers was most of the test's time (packing compiles all four).
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from ftstudio.training.builtin import tiny_model_dir

    tiny = tiny_model_dir(shared_home())
    one_layer = AutoConfig.from_pretrained(tiny)
    one_layer.num_hidden_layers = 1
    one_layer.layer_types = one_layer.layer_types[:1]
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(one_layer).save_pretrained(tmp_path / "model")
    AutoTokenizer.from_pretrained(tiny).save_pretrained(tmp_path / "model")
    config = merged(
        FAST,
        {
            "model": {"name": str(tmp_path / "model"), "compile": True},
            "data": {"path": str(data)},
            "optim": {"max_steps": 4},
        },
    )
    try:
        code, events = train(tmp_path / "task", config, shared_home())
    finally:
        torch._dynamo.reset()
    assert code == 0, [e for e in events if e["kind"] == "error"]
    losses = [e["loss"] for e in events if e["kind"] == "progress"]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)


def test_the_eta_of_a_resumed_attempt_counts_only_its_own_steps_and_time(tmp_path: Path, monkeypatch: Any) -> None:
    """Attempt 2 resumes at step 10 of 30: its ETA is its own pace times the steps left, not the dead
    attempt's time nor the steps it did before the checkpoint."""
    import io

    from transformers import TrainerControl, TrainerState, TrainingArguments

    from ftstudio.events import EventWriter
    from ftstudio.training import progress
    from ftstudio.training.progress import LossGuard, StudioCallback

    clock = [1000.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: clock[0])
    writer = EventWriter(tmp_path / "events.jsonl")
    cb = StudioCallback(writer, 1, LossGuard(10.0, 100), 2, 10, {}, out=io.StringIO())
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[])
    state, control = TrainerState(), TrainerControl()
    state.max_steps, state.global_step = 30, 10  # resumed from checkpoint-10
    cb.on_train_begin(args, state, control)
    for step in (11, 12):
        clock[0] += 2.0  # two seconds a step in this attempt
        state.global_step = step
        cb.on_log(args, state, control, logs={"loss": 1.0, "learning_rate": 1e-4})
    writer.close()
    progress_events = [e for e in read_events(tmp_path) if e["kind"] == "progress"]
    assert [e["step"] for e in progress_events] == [11, 12]
    assert progress_events[-1]["eta_s"] == 36.0  # 18 steps left at 2 s each


@pytest.mark.process
@pytest.mark.slow
def test_a_stale_trainer_stops_at_its_next_write_and_writes_nothing_more(tmp_path: Path) -> None:
    """Fencing, the trainer's half: a trainer of attempt 1 finds the task at attempt 2 (the studio gave up
    on it) at its next event or checkpoint, and exits EXIT_STALE without another line or checkpoint."""
    import os
    import subprocess
    import sys
    import time

    from ftstudio.fence import ATTEMPT_ENV, EXIT_STALE

    data = write_jsonl(tmp_path / "d.jsonl", ALPACA)
    task = tmp_path / "task"
    config = merged(FAST, {"data": {"path": str(data)}, "optim": {"max_steps": 400}, "checkpoint": {"every_steps": 5}})
    spec = write_spec(task, config, shared_home())
    (task / "attempt").write_text("1")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "HF_HUB_OFFLINE": "1"}
    trainer = subprocess.Popen(
        [sys.executable, "-m", "ftstudio.train", str(spec)],
        env={**env, ATTEMPT_ENV: "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not any(e["kind"] == "checkpoint" for e in read_events(task)) and time.monotonic() < deadline:
            time.sleep(0.05)
        (task / "attempt").write_text("2")
        changed = time.monotonic()
        written = (task / "events.jsonl").stat().st_size
        checkpoints = sorted(p.name for p in (task / "checkpoints").iterdir())
        out, _ = trainer.communicate(timeout=60)
        took = time.monotonic() - changed
    finally:
        trainer.kill()
    assert trainer.returncode == EXIT_STALE, out[-2000:]
    assert "belongs to attempt 1, but the task is at attempt 2 now" in out
    # At most the one line in flight when the file changed; no checkpoint begun after it.
    assert (task / "events.jsonl").stat().st_size - written <= 400
    assert sorted(p.name for p in (task / "checkpoints").iterdir()) == checkpoints
    assert not (task / "adapter").exists()
    print(f"stale trainer stopped {took:.2f}s after the attempt changed")
