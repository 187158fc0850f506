"""The memory estimate before launch: the arithmetic (pure), and how the studio, the CLI and the API use it. The
estimate against real runs' measured peaks is bench/bench_memory.py's, and tests/test_memory_limit_batch.py's."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from support import api_client, in_memory, run_cli

from ftstudio.config import TrainingConfig
from ftstudio.training.estimate import GiB, Shape, estimate, largest_batch, read_shape, shape_for

QWEN2_05B = {
    "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
    "num_key_value_heads": 2, "vocab_size": 151936, "tie_word_embeddings": True,
}  # fmt: skip
QWEN2_7B = {
    "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
    "num_key_value_heads": 4, "vocab_size": 152064, "tie_word_embeddings": False,
}  # fmt: skip


def cfg(**over: Any) -> TrainingConfig:
    base: dict[str, Any] = {"data": {"max_length": 1024}, "optim": {"batch_size": 4}}
    for path, value in over.items():
        section, _, name = path.partition("__")
        if name:
            base.setdefault(section, {})[name] = value
        else:
            base[section] = value
    return TrainingConfig.from_dict(base)


def test_the_shape_counts_the_parameters_of_known_models() -> None:
    small, big = Shape.of(QWEN2_05B), Shape.of(QWEN2_7B)
    assert small is not None and big is not None
    assert small.params == pytest.approx(494e6, rel=0.01)  # Qwen2-0.5B: 494M (biases left out: 0.01%)
    assert big.params == pytest.approx(7.62e9, rel=0.01)  # Qwen2-7B: 7.62B
    assert Shape.of({"hidden_size": 8}) is None  # not a shape it knows: no guess
    assert Shape.of({**QWEN2_05B, "num_local_experts": 8}) is None  # a mixture of experts
    assert Shape.of({"text_config": QWEN2_05B}) == small  # a multimodal model's language part


def test_each_setting_moves_the_estimate_the_way_it_should() -> None:
    shape = Shape.of(QWEN2_7B)
    assert shape is not None
    plain = estimate(cfg(), shape, on_gpu=True)
    assert plain.line() == f"needs about {plain.bytes / GiB:,.1f} GiB of GPU memory at batch 4 and length 1024"
    assert plain.parts["weights"] == pytest.approx(2 * shape.params)  # bf16
    assert estimate(cfg(optim={"batch_size": 8}), shape, on_gpu=True).bytes > plain.bytes
    assert estimate(cfg(data={"max_length": 2048}), shape, on_gpu=True).bytes > plain.bytes
    checkpointing = estimate(cfg(model={"gradient_checkpointing": True}), shape, on_gpu=True)
    assert checkpointing.parts["activations"] < plain.parts["activations"] / 10
    offloaded = estimate(cfg(model={"gradient_checkpointing": True, "offload_checkpoints": True}), shape, on_gpu=True)
    assert offloaded.parts["activations"] < checkpointing.parts["activations"]
    qlora = estimate(cfg(adapter="qlora"), shape, on_gpu=True)
    # nf4 linears, and (peft upcasts what it does not quantize) float32 embeddings: about half of bf16 for a 7B.
    assert qlora.parts["weights"] < plain.parts["weights"] * 0.55
    liger = estimate(cfg(model={"kernels": "liger"}), shape, on_gpu=True)
    assert liger.parts["loss"] < plain.parts["loss"] / 10  # the logits are never held whole
    full = estimate(cfg(adapter="full"), shape, on_gpu=True)
    assert full.parts["training"] == 3 * plain.parts["weights"]  # gradient and two moments, bf16
    eight = estimate(cfg(adapter="full", optim={"optimizer": "adamw_8bit"}), shape, on_gpu=True)
    assert eight.parts["training"] == pytest.approx(2 * shape.params * 2, rel=0.01)  # bf16 gradient, 2 byte moments
    dpo = estimate(cfg(method="dpo"), shape, on_gpu=True)
    assert dpo.parts["activations"] == 2 * plain.parts["activations"]  # chosen and rejected in one batch
    cpu = estimate(cfg(), shape, on_gpu=False)
    assert cpu.device == "cpu" and cpu.parts["weights"] == 4 * shape.params  # float32 on the CPU
    assert "of memory at batch 4" in cpu.line()


def test_the_batch_that_fits_divides_the_effective_batch() -> None:
    shape = Shape.of(QWEN2_05B)
    assert shape is not None
    c = cfg(optim={"batch_size": 12, "grad_accum": 1})
    room = estimate(c, shape, on_gpu=True, batch=5).bytes
    assert largest_batch(c, shape, room, on_gpu=True) == 4  # 5 fits, but 12 is no multiple of it
    assert largest_batch(c, shape, 1, on_gpu=True) is None


def test_the_shape_is_read_from_the_model_on_this_machine(tmp_path: Path) -> None:
    assert shape_for("builtin:tiny", tmp_path) is not None  # not built yet: its recipe
    folder = tmp_path / "m"
    folder.mkdir()
    assert read_shape(folder) is None
    (folder / "config.json").write_text(json.dumps(QWEN2_05B))
    assert shape_for(str(folder), tmp_path) == Shape.of(QWEN2_05B)
    (folder / "config.json").write_text("{broken")
    assert shape_for(str(folder), tmp_path) is None
    assert shape_for("org/not-in-the-cache", tmp_path) is None  # nothing is downloaded to count


def test_the_api_estimates_checks_and_refuses_without_recording_anything(home: Path) -> None:
    big = home / "models-here" / "qwen2-7b"
    big.mkdir(parents=True)
    (big / "config.json").write_text(json.dumps(QWEN2_7B))
    with api_client(in_memory(home, in_server=True)) as client:
        before = client.get("/api/tasks").json()["total"]
        r = client.post("/api/tasks/estimate", json={"config": {"preset": "cpu-demo"}})
        assert r.status_code == 200, r.text
        memory = r.json()["memory"]
        assert memory["fits"] and memory["device"] == "cpu" and memory["batch"] == 8 and memory["length"] == 256
        assert memory["line"].startswith("needs about ") and "; this machine has " in memory["line"]

        # 7B on the CPU in float32 under a 16 GiB limit: the estimate says it, and a submit is refused.
        config = {"preset": "cpu-demo", "model": {"name": str(big)}, "resources": {"memory": "16G"}}
        memory = client.post("/api/tasks/estimate", json={"config": config}).json()["memory"]
        assert not memory["fits"] and memory["suggest_batch"] is None and "not even batch 1 fits" in memory["line"]
        r = client.post("/api/tasks", json={"config": config})
        detail = r.json()["detail"]
        assert r.status_code == 422 and detail.startswith("optim.batch_size (--batch-size): this run needs about ")
        assert "GiB of memory at batch 8 and length 256; its --memory limit leaves " in detail
        assert "not even batch 1 fits in 16.0 GiB; lower optim.batch_size or data.max_length" in detail

        r = client.post("/api/tasks/check", json={"config": {"preset": "cpu-demo"}})
        assert r.status_code == 200 and r.json()["config"]["optim"]["batch_size"] == 8 and r.json()["memory"]
        for bad, words in [
            ({"optim": {"learning_rate": -1}}, "optim.learning_rate"),
            ({"model": {"name": "/etc"}}, "model.name"),
            ({"optim": {"auto_batch": True}, "method": "kto"}, "optim.auto_batch"),
        ]:
            for route in ("/api/tasks/estimate", "/api/tasks/check"):
                r = client.post(route, json={"config": {"preset": "cpu-demo", **bad}})
                assert r.status_code == 422 and words in r.json()["detail"], (route, r.text)
        assert client.get("/api/tasks").json()["total"] == before


@pytest.mark.process
def test_submit_dry_run_prints_the_estimate_and_submits_nothing(home: Path) -> None:
    r = run_cli(home, "submit", "--preset", "cpu-demo", "--dry-run")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "the settings pass every check; nothing was submitted"
    assert lines[1].startswith("memory: needs about ") and "at batch 8 and length 256" in lines[1]
    r = run_cli(home, "submit", "--preset", "cpu-demo", "--dry-run", "--json", "--batch-size", "2")
    assert r.returncode == 0 and json.loads(r.stdout)["memory"]["batch"] == 2
    r = run_cli(home, "submit", "--preset", "cpu-demo", "--dry-run", "--lr", "-1")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "optim.learning_rate" in r.stderr
    assert run_cli(home, "tasks", "--json").stdout.count('"id"') == 0


@pytest.mark.parametrize(
    ("over", "words"),
    [
        (
            {"model": {"kernels": "liger"}},
            "model.kernels: kernels liger (Triton kernels) needs the liger-kernel package",
        ),
        (
            {"optim": {"optimizer": "paged_adamw_8bit"}},
            "optim.optimizer: optimizer paged_adamw_8bit needs the bitsandbytes",
        ),
        (
            {"model": {"gradient_checkpointing": True, "offload_checkpoints": True}},
            "model.offload_checkpoints: offloading checkpoints to host memory needs a CUDA GPU",
        ),
    ],
)
def test_the_gpu_settings_are_refused_at_submit_without_a_cuda_gpu(
    home: Path, over: dict[str, Any], words: str
) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU: tests/test_gpu.py runs these settings")
    with api_client(in_memory(home, in_server=True)) as client:
        r = client.post("/api/tasks", json={"config": {"preset": "cpu-demo", **over}})
        assert r.status_code == 422 and words in r.json()["detail"], r.text
        assert client.get("/api/tasks").json()["total"] == 0
