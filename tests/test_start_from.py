"""Going on from a trained adapter (`model.start_from`, issue 22): a completed SFT task is the starting point of a
DPO or GRPO task. The adapter that trains is the SFT one, its copy as it started is DPO's reference, and the
result is one adapter on the base model, so chat, compare and export take it as they take any."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from support import api_client, in_memory
from trainer_fixtures import FAST, assert_adapter_loads, merged, shared_home, train


def _b_weights(adapter: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return {k: v for k, v in load_file(adapter / "adapter_model.safetensors").items() if "lora_B" in k}


@pytest.fixture(scope="module")
def sft_adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real SFT adapter of builtin:tiny (rank 4), trained once for the module."""
    task = tmp_path_factory.mktemp("sft") / "task"
    code, events = train(task, merged(FAST, {"optim": {"max_steps": 6, "learning_rate": 3e-3}}), shared_home())
    assert code == 0, events[-1]
    return task / "adapter"


@pytest.mark.slow
@pytest.mark.parametrize("method", ["dpo", "grpo"])
def test_a_dpo_or_grpo_run_goes_on_from_the_sft_adapter(method: str, sft_adapter: Path, tmp_path: Path) -> None:
    over: dict[str, Any] = {
        "method": method,
        "model": {"start_from": str(sft_adapter)},
        "lora": {"rank": 16},  # not used: the adapter that goes on keeps its own rank
        # A step too small to move anything: what is saved shows where the run started.
        "optim": {"max_steps": 1, "learning_rate": 1e-9, "warmup_ratio": 0},
        "data": {"path": "builtin:preferences" if method == "dpo" else "builtin:math", "max_length": 64},
    }
    if method == "grpo":
        over |= {"grpo": {"max_completion_length": 8}, "optim": {**over["optim"], "batch_size": 4}}
    code, events = train(tmp_path / "task", merged(FAST, over), shared_home())
    assert code == 0, events[-1]
    begin = next(e for e in events if e["kind"] == "train_begin")
    assert begin["started_from"] == str(sft_adapter)
    adapter = tmp_path / "task" / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 4
    assert not (adapter / "ref").exists()  # TRL's frozen reference copy is not part of the result
    before, after = _b_weights(sft_adapter), _b_weights(adapter)
    assert before.keys() == after.keys() and all(before[k].abs().sum() > 0 for k in before)
    assert all((before[k] - after[k]).abs().max() < 1e-5 for k in before)  # the SFT adapter, not a fresh one
    if method == "dpo":
        first = next(e for e in events if e["kind"] == "progress")
        assert first["metrics"]["rewards/margins"] == 0.0  # the reference is the adapter as the run started
    summary = json.loads((adapter / "summary.json").read_text())
    assert summary["started_from"] == str(sft_adapter) and summary["base_model"]["name"] == "builtin:tiny"
    assert_adapter_loads(adapter, shared_home())


@pytest.mark.slow
def test_start_from_names_a_completed_task_over_http(home: Path, sft_adapter: Path) -> None:
    service = in_memory(home, in_server=True, on_submit=lambda runner: runner.complete(steps=3))
    with api_client(service) as client:
        sft = client.post("/api/tasks", json={"config": {"preset": "cpu-demo"}}).json()
        service.supervisor.sync(service.store.get(sft["id"]))  # no supervisor runs in-process
        done = service.store.get(sft["id"])
        assert done.status == "completed"
        # The in-memory runner leaves an empty adapter; the real one of an SFT run stands in its place.
        shutil.rmtree(done.dir.adapter)
        shutil.copytree(sft_adapter, done.dir.adapter)

        r = client.post("/api/tasks", json={"config": {"method": "dpo", "model": {"start_from": sft["id"]}}})
        assert r.status_code == 201, r.text
        model = r.json()["config"]["model"]
        assert model["start_from"] == str(done.dir.adapter) and model["name"] == "builtin:tiny"

        before = client.get("/api/tasks").json()["total"]

        def refused(config: dict[str, Any], needle: str) -> None:
            bad = client.post("/api/tasks", json={"config": {"method": "dpo", **config}})
            assert bad.status_code == 422 and needle in bad.json()["detail"], bad.text

        refused({"model": {"start_from": "no-such-task"}}, "is neither a completed task of this studio nor an adapter")
        refused(
            {"model": {"start_from": sft["id"], "name": "Qwen/Qwen2.5-0.5B"}},
            "was trained on builtin:tiny, not Qwen/Qwen2.5-0.5B; set model.name (--model) to builtin:tiny",
        )
        service.executor.on_submit = lambda runner: None  # a task still training cannot be gone on from
        busy = client.post("/api/tasks", json={"config": {"preset": "cpu-demo"}}).json()
        refused({"model": {"start_from": busy["id"]}}, "a run can go on only from a completed task's adapter")
        assert client.get("/api/tasks").json()["total"] == before + 1  # the busy SFT task only
