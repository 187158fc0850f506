"""Adapter choices (issue 22): lora, qlora, dora, rslora, and LoRA+'s learning-rate ratio; each saves a peft
adapter that loads as it is."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support import api_client, in_memory
from trainer_fixtures import FAST, assert_adapter_loads, merged, shared_home, train

from ftstudio.config import TrainingConfig
from ftstudio.errors import ValidationError


def test_qlora_is_lora_on_a_4bit_base() -> None:
    assert TrainingConfig.from_dict({"adapter": "qlora"}).model.quantization == "4bit"
    assert (
        TrainingConfig.from_dict({"adapter": "qlora", "model": {"quantization": "8bit"}}).model.quantization == "8bit"
    )
    with pytest.raises(
        ValidationError, match="adapter qlora trains on a 4-bit base; set 4bit or 8bit, or adapter lora"
    ):
        TrainingConfig.from_dict({"adapter": "qlora", "model": {"quantization": "none"}})
    with pytest.raises(ValidationError, match=r"adapter \(--adapter\): must be one of lora, qlora, dora, rslora"):
        TrainingConfig.from_dict({"adapter": "lokr"})
    with pytest.raises(ValidationError, match=r"lora.plus_ratio: must be at least 0"):
        TrainingConfig.from_dict({"lora": {"plus_ratio": -1}})


def test_qlora_without_a_gpu_is_refused_at_submit_and_creates_nothing(home: Path) -> None:
    with api_client(in_memory(home, in_server=True)) as client:
        before = client.get("/api/tasks").json()["total"]
        r = client.post("/api/tasks", json={"config": {"preset": "cpu-demo", "adapter": "qlora"}})
        assert r.status_code == 422 and "model.quantization" in r.json()["detail"], r.text
        assert client.get("/api/tasks").json()["total"] == before


@pytest.mark.slow
@pytest.mark.parametrize("adapter", ["dora", "rslora"])
def test_dora_and_rslora_train_to_adapters_peft_loads(adapter: str, tmp_path: Path) -> None:
    code, events = train(tmp_path / "task", merged(FAST, {"adapter": adapter}), shared_home())
    assert code == 0, events[-1]
    saved = json.loads((tmp_path / "task" / "adapter" / "adapter_config.json").read_text())
    assert (saved["use_dora"], saved["use_rslora"]) == (adapter == "dora", adapter == "rslora")
    assert_adapter_loads(tmp_path / "task" / "adapter", shared_home())


@pytest.mark.slow
@pytest.mark.parametrize("method", ["sft", "dpo"])
def test_lora_plus_gives_the_b_matrices_their_own_learning_rate(method: str, tmp_path: Path) -> None:
    import torch

    config = merged(
        FAST,
        {
            "method": method,
            "lora": {"plus_ratio": 16},
            "optim": {"max_steps": 1, "learning_rate": 1e-4, "warmup_ratio": 0, "scheduler": "constant"},
            "checkpoint": {"every_steps": 1},
        },
    )
    if method == "dpo":
        config["data"] = {**config["data"], "path": "builtin:preferences"}
    code, events = train(tmp_path / "task", config, shared_home())
    assert code == 0, events[-1]
    state = torch.load(tmp_path / "task" / "checkpoints" / "checkpoint-1" / "optimizer.pt", weights_only=False)
    rates = {round(group["lr"], 10) for group in state["param_groups"] if group["params"]}
    assert rates == {1e-4, 16e-4}, state["param_groups"]


def test_a_model_whose_weights_alone_outgrow_the_machine_is_refused_at_submit(home: Path) -> None:
    """A 200B-parameter bf16 model (its weight file sparse: 400 GB that take no disk) on this machine."""
    import os

    big = home / "models-here" / "huge"
    big.mkdir(parents=True)
    (big / "config.json").write_text(json.dumps({"model_type": "qwen2", "torch_dtype": "bfloat16"}))
    with open(big / "model.safetensors", "wb") as f:
        os.truncate(f.fileno(), 400 * 10**9)
    with api_client(in_memory(home, in_server=True)) as client:
        before = client.get("/api/tasks").json()["total"]
        for over, needle in [
            ({}, "(200.0B parameters in float32), more than this machine's memory"),
            ({"resources": {"memory": "1G"}}, "more than the task's --memory (1.0 GiB)"),
        ]:
            r = client.post("/api/tasks", json={"config": {"preset": "cpu-demo", "model": {"name": str(big)}, **over}})
            assert r.status_code == 422, r.text
            detail = r.json()["detail"]
            assert "huge needs at least 745.1 GiB for its weights alone in training" in detail, detail
            assert needle in detail and "use adapter qlora (4-bit) on a GPU" in detail, detail
        assert client.get("/api/tasks").json()["total"] == before
        # builtin:tiny fits anywhere.
        assert client.post("/api/tasks", json={"config": {"preset": "cpu-demo"}}).status_code == 201
