"""Training the model's own weights (issue 22): adapter full (every weight) and freeze (the last N layers). The
result is the whole model, and chat, held-out prompts, export and the hand-over take it as such."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from support import api_client, in_memory
from trainer_fixtures import FAST, merged, shared_home, train

from ftstudio.config import TrainingConfig
from ftstudio.errors import ValidationError


def test_whole_model_training_refuses_what_it_cannot_do() -> None:
    with pytest.raises(ValidationError, match="a 4- or 8-bit base cannot train in full"):
        TrainingConfig.from_dict({"adapter": "full", "model": {"quantization": "4bit"}})
    with pytest.raises(ValidationError, match="adapter freeze trains the model itself, not an adapter to go on from"):
        TrainingConfig.from_dict({"adapter": "freeze", "model": {"start_from": "t-1"}})
    with pytest.raises(ValidationError, match=r"freeze_layers: must be at least 1"):
        TrainingConfig.from_dict({"adapter": "freeze", "freeze_layers": 0})


def test_full_on_a_model_too_large_for_the_machine_is_refused_at_submit(home: Path) -> None:
    import os

    big = home / "models-here" / "seven-b"
    big.mkdir(parents=True)
    (big / "config.json").write_text(json.dumps({"model_type": "qwen2", "torch_dtype": "bfloat16"}))
    with open(big / "model.safetensors", "wb") as f:
        os.truncate(f.fileno(), 14 * 10**9)  # 7B parameters in bf16, sparse: no disk taken
    with api_client(in_memory(home, in_server=True)) as client:
        before = client.get("/api/tasks").json()["total"]
        config = {"preset": "cpu-demo", "adapter": "full", "model": {"name": str(big)}, "resources": {"memory": "20G"}}
        r = client.post("/api/tasks", json={"config": config})
        assert r.status_code == 422, r.text
        detail = r.json()["detail"]
        assert "seven-b needs at least 104.3 GiB to train in full" in detail, detail
        assert "with their gradients and AdamW's two moments" in detail and "use adapter lora or qlora" in detail
        assert client.get("/api/tasks").json()["total"] == before


def _weights(folder: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


@pytest.mark.slow
def test_full_fine_tuning_saves_the_whole_model_that_chat_export_and_handover_take(tmp_path: Path) -> None:
    from ftstudio.chat.worker import Worker
    from ftstudio.training.builtin import tiny_model_dir
    from ftstudio.training.export import ExportError, export, handover

    config = merged(FAST, {"adapter": "full", "optim": {"learning_rate": 1e-4}})
    config["evaluation"] = {"prompts": "builtin:sample", "max_prompts": 2, "max_new_tokens": 4}
    code, events = train(tmp_path / "task", config, shared_home())
    assert code == 0, events[-1]
    begin = next(e for e in events if e["kind"] == "train_begin")
    assert begin["target_modules"] == ["all"] and begin["trainable_params"] == begin["total_params"]
    result = tmp_path / "task" / "adapter"
    assert (result / "config.json").is_file() and not (result / "adapter_config.json").exists()
    base = tiny_model_dir(shared_home())
    trained, untouched = _weights(result), _weights(base)
    assert any((trained[k] - untouched[k]).abs().max() > 0 for k in untouched)  # the weights themselves moved
    # Held-out prompts: the base answered before the first step, the fine-tune at the end.
    final = json.loads((tmp_path / "task" / "evals" / "final.json").read_text())
    assert len(final["samples"]) == 2 and all(s["base"] is not None for s in final["samples"])

    with pytest.raises(ExportError, match=r"trained the whole model .* export it with --format merged"):
        export("t1", "full run", tmp_path / "task", tmp_path / "as-adapter", "adapter", shared_home())
    out = export("t1", "full run", tmp_path / "task", tmp_path / "merged", "merged", shared_home())
    assert (out / "config.json").is_file() and "fine-tuned in full (full)" in (out / "README.md").read_text()
    ways = handover("t1", "full run", result, shared_home())
    assert ways["vllm"].startswith(f"vllm serve {result}") and "AutoModelForCausalLM" in ways["peft"]

    worker = Worker()
    loaded = worker.load(1, str(base), str(result), False)
    assert loaded.whole
    request = {"messages": [{"role": "user", "content": "Hi?"}], "max_new_tokens": 3, "temperature": 0}
    worker._answer(1, loaded, request, "adapter")
    worker._answer(1, loaded, {**request, "base": str(base)}, "base")  # the base beside it, a model of its own
    assert loaded.base_model is not None and loaded.base_model is not loaded.model


@pytest.mark.slow
def test_freeze_trains_only_the_last_layers(tmp_path: Path) -> None:
    from ftstudio.training.builtin import tiny_model_dir

    code, events = train(tmp_path / "task", merged(FAST, {"adapter": "freeze", "freeze_layers": 1}), shared_home())
    assert code == 0, events[-1]
    begin = next(e for e in events if e["kind"] == "train_begin")
    assert begin["target_modules"] == ["layer 3"] and begin["adapted_layers"] == 1
    trained, untouched = _weights(tmp_path / "task" / "adapter"), _weights(tiny_model_dir(shared_home()))
    moved = {k for k in untouched if (trained[k] - untouched[k]).abs().max() > 0}
    assert moved and all(".layers.3." in k for k in moved), sorted(moved)[:5]
    code, events = train(tmp_path / "too-many", merged(FAST, {"adapter": "freeze", "freeze_layers": 9}), shared_home())
    assert code == 2 and "freeze_layers: is 9, but the model has 4 layers" in events[-1]["message"], events[-1]


@pytest.mark.slow
def test_full_dpo_scores_its_reference_once_and_resumes_to_the_same_losses(tmp_path: Path) -> None:
    """No adapter to switch off and no second model: the reference is scored before the first step, on every
    start from the weights as they load (the starting model's), so a resumed run ends where a whole one does."""
    config = merged(
        FAST,
        {
            "method": "dpo",
            "adapter": "full",
            "data": {"path": "builtin:preferences", "max_length": 64},
            "optim": {"max_steps": 6, "learning_rate": 1e-4},
            "checkpoint": {"every_steps": 3},
        },
    )
    code, whole = train(tmp_path / "whole", config, shared_home())
    assert code == 0, whole[-1]
    code, first = train(tmp_path / "cut", config, shared_home())
    assert code == 0, first[-1]
    shutil.rmtree(tmp_path / "cut" / "adapter")
    shutil.rmtree(tmp_path / "cut" / "checkpoints" / "checkpoint-6")
    code, again = train(tmp_path / "cut", merged(config, {"checkpoint": {"resume_from": "auto"}}), shared_home())
    assert code == 0, again[-1]

    def losses(events: list[dict[str, Any]]) -> list[float]:
        return [round(e["loss"], 4) for e in events if e["kind"] == "progress"]

    assert [e for e in again if e["kind"] == "train_begin"][-1]["resumed_from_step"] == 3
    assert losses(again)[-3:] == losses(whole)[-3:]
