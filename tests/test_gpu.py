"""On a CUDA GPU, the paths a CPU never takes: bf16, QLoRA through bitsandbytes, sdpa and flash attention, packing,
a real CUDA out-of-memory, GPU leases with a real CUDA context, and chat on a GPU.

Marked `gpu`: without a CUDA GPU each skips, saying so (tests/conftest.py). `scripts/gpu-check` runs them on a GPU
machine and puts the outcome into its report. Each drives the real studio (its server, runners and trainers) or
the trainer's own functions on the GPU; nothing here stands in for the GPU.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from support import Studio, home_env, run_cli, wait_for
from test_chat import chat
from trainer_fixtures import read_events, shared_home

pytestmark = [pytest.mark.gpu, pytest.mark.slow, pytest.mark.process]

MIB = 1 << 20
TINY_GPU: dict[str, Any] = {
    "model": {"name": "builtin:tiny", "dtype": "auto"},
    "data": {"max_length": 128, "validation": "0"},
    "lora": {"rank": 8, "alpha": 16},
    "optim": {"batch_size": 8, "grad_accum": 1, "learning_rate": 1e-3},
    "logging": {"eval_on_start": False},
    "resources": {"gpus": 1},
}


def config(**over: Any) -> dict[str, Any]:
    out = json.loads(json.dumps(TINY_GPU))
    for key, value in over.items():
        if isinstance(value, dict):
            out.setdefault(key, {}).update(value)
        else:
            out[key] = value
    return out


def gpu_memory_used() -> int:
    """Bytes in use on GPU 0, as nvidia-smi sees them (the CUDA contexts of every process there included)."""
    out = subprocess.run(
        ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
        capture_output=True,
        text=True,
        check=True,
        timeout=20,
    ).stdout
    return int(out.strip().splitlines()[0]) * MIB


def begin(home: Path, tid: str) -> dict[str, Any]:
    return next(e for e in read_events(home / "tasks" / tid) if e["kind"] == "train_begin")


def step_of(studio: Studio, tid: str) -> int:
    return int(studio.task(tid).get("step") or 0)


@pytest.fixture
def studio(home: Path) -> Any:
    s = Studio(home, home_env(home)).start("--slots", "2")
    yield s
    s.stop()


def test_bf16_lora_trains_pauses_resumes_and_completes(studio: Studio, home: Path) -> None:
    tid = studio.http.post(
        "/api/tasks", json={"config": config(optim={"max_steps": 80}, checkpoint={"every_steps": 20})}
    ).json()["id"]
    wait_for(lambda: step_of(studio, tid) >= 5, timeout=180, what="five steps on the GPU")
    first = begin(home, tid)
    assert first["device"].startswith("cuda:0 (") and first["dtype"] == "bfloat16", first
    assert first["attention"] in ("sdpa", "flash_attention_2")
    studio.http.post(f"/api/tasks/{tid}/pause").raise_for_status()
    paused = studio.wait_status(tid, "paused", timeout=120)
    studio.http.post(f"/api/tasks/{tid}/resume").raise_for_status()
    done = studio.wait_status(tid, "completed", "failed", timeout=300)
    assert done["status"] == "completed", done
    steps = [e["step"] for e in read_events(home / "tasks" / tid) if e["kind"] == "progress"]
    assert steps[-1] == 80 and paused["step"] in steps
    assert (home / "tasks" / tid / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes is not installed")
def test_qlora_4bit_trains_resumes_and_merges_dequantized(studio: Studio, home: Path, tmp_path: Path) -> None:
    tid = studio.http.post(
        "/api/tasks",
        json={"config": config(adapter="qlora", optim={"max_steps": 40}, checkpoint={"every_steps": 10})},
    ).json()["id"]
    wait_for(lambda: step_of(studio, tid) >= 12, timeout=240, what="twelve QLoRA steps")
    studio.http.post(f"/api/tasks/{tid}/pause").raise_for_status()
    studio.wait_status(tid, "paused", timeout=120)
    studio.http.post(f"/api/tasks/{tid}/resume").raise_for_status()
    assert studio.wait_status(tid, "completed", "failed", timeout=300)["status"] == "completed"
    spec = json.loads((home / "tasks" / tid / "spec.json").read_text())["config"]["model"]
    assert spec["quantization"] == "4bit"
    out = tmp_path / "merged"
    r = run_cli(home, "export", tid, "--format", "merged", "--out", str(out))
    assert r.returncode == 0, r.stderr
    from safetensors import safe_open

    with safe_open(str(next(out.glob("*.safetensors"))), "pt") as f:
        dtypes = {str(f.get_tensor(k).dtype) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    assert dtypes <= {"torch.bfloat16", "torch.float16", "torch.float32"}, dtypes  # dequantized: no uint8 packs
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out).to("cuda")
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[1, 2, 3]], device="cuda")).logits
    assert torch.isfinite(logits).all()


def test_sdpa_or_flash_attention_and_packing_keep_examples_apart_on_the_gpu() -> None:
    import torch

    from ftstudio.config import ModelConfig
    from ftstudio.training import batches
    from ftstudio.training.builtin import tiny_model_dir
    from ftstudio.training.data import Example
    from ftstudio.training.models import load_model, load_tokenizer

    home = shared_home()
    model = load_model(tiny_model_dir(home), ModelConfig()).to("cuda").eval()
    want = "flash_attention_2" if importlib.util.find_spec("flash_attn") else "sdpa"
    assert model.config._attn_implementation == want
    assert next(model.parameters()).dtype == torch.bfloat16
    tokenizer = load_tokenizer(tiny_model_dir(home), ModelConfig())
    a = batches.tokenize(Example("a", text="What is 2 plus 2? It is 4."), tokenizer, 64)
    b = batches.tokenize(Example("b", text="The capital of France is Paris."), tokenizer, 64)
    batch = batches.Collator(tokenizer.pad_token_id)(batches.pack([a, b], 64))
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"].cuda(), position_ids=batch["position_ids"].cuda()).logits[0].float()
        alone = model(input_ids=torch.tensor([b.input_ids], device="cuda")).logits[0].float()
    # bf16: the same up to its rounding; attending across the pack would move them far more.
    assert torch.allclose(packed[len(a.input_ids) :], alone, atol=5e-2), (
        (packed[len(a.input_ids) :] - alone).abs().max()
    )


def wide_vocab_model(home: Path, rows: int, words: int) -> tuple[Path, Path]:
    """A model whose loss over a 32,000-token vocabulary outweighs the rest, and rows that fill max_length."""
    import random

    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from ftstudio.training.builtin import build_tokenizer
    from ftstudio.training.samples import SAMPLE_PATH

    folder = home / "wide-vocab"
    torch.manual_seed(0)
    shape = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=32000, tie_word_embeddings=False, max_position_embeddings=8192)  # fmt: skip
    Qwen2ForCausalLM(Qwen2Config(**shape)).save_pretrained(folder)
    build_tokenizer().save_pretrained(folder)  # type: ignore[attr-defined]
    vocab = " ".join(json.loads(line)["output"] for line in SAMPLE_PATH.read_text().splitlines()).split()
    rng = random.Random(0)
    data = home / "long.jsonl"
    with data.open("w") as f:
        for n in range(rows):
            f.write(
                json.dumps({"instruction": f"Passage {n}.", "output": " ".join(rng.choices(vocab, k=words))}) + "\n"
            )
    return folder, data


def test_cuda_out_of_memory_names_the_setting_and_auto_batch_goes_on_at_a_smaller_batch(
    studio: Studio, home: Path
) -> None:
    """Batch 128 x 4096 tokens over a 32,000-token vocabulary: over 200 GiB for the loss alone, more than any
    one GPU has; split in parts it fits."""
    model, data = wide_vocab_model(home, rows=128, words=5000)
    over = config(
        model={"name": str(model), "dtype": "bfloat16"},
        data={"path": str(data), "max_length": 4096},
        optim={"max_steps": 2, "batch_size": 128},
        checkpoint={"every_steps": 1},
    )
    refused = studio.http.post("/api/tasks", json={"config": over})
    assert refused.status_code == 422 and "GiB of GPU memory at batch 128 and length 4096" in refused.text
    over["optim"]["auto_batch"] = True
    tid = studio.http.post("/api/tasks", json={"config": over}).json()["id"]
    done = studio.wait_status(tid, "completed", "failed", timeout=400)
    assert done["status"] == "completed", done
    said = [e.get("message", "") for e in read_events(home / "tasks" / tid) if e["kind"] == "status"]
    assert any(m.startswith("out of memory at step 1: batch 128 trains in 2 parts of 64 rows") for m in said), said
    parts = json.loads((home / "tasks" / tid / "batch_split.json").read_text())["parts"]
    print(f"\nCUDA out of memory at batch 128 x 4096: trained in {parts} parts")


def test_without_auto_batch_a_cuda_out_of_memory_fails_naming_the_setting(tmp_path: Path) -> None:
    from test_memlimit import make_task, start_runner, stop_all

    from ftstudio.home import read_json

    model, data = wide_vocab_model(tmp_path, rows=128, words=5000)
    spec = config(
        model={"name": str(model), "dtype": "bfloat16"},
        data={"path": str(data), "max_length": 4096},
        optim={"max_steps": 2, "batch_size": 128},
    )
    tdir = make_task(tmp_path, "20260101-0000-cudaoom", "t", spec)
    runner = start_runner(tdir, "ftstudio.train", CUDA_VISIBLE_DEVICES="0")
    try:
        assert runner.wait(timeout=400) == 0
        record = read_json(tdir.exit)
        assert record["outcome"] == "failed", tdir.log.read_text()[-3000:]
        assert record["reason"].startswith("out of GPU memory: lower optim.batch_size (--batch-size)"), record
        assert "optim.auto_batch (--auto-batch)" in record["reason"]
    finally:
        stop_all([runner], [tdir])


def test_two_tasks_queue_for_one_gpu_a_pause_frees_its_memory_and_a_freeze_keeps_it(studio: Studio, home: Path) -> None:
    idle = gpu_memory_used()
    long = config(optim={"max_steps": 5000}, checkpoint={"every_steps": 50})
    first = studio.http.post("/api/tasks", json={"config": long}).json()["id"]
    wait_for(lambda: step_of(studio, first) >= 3, timeout=180, what="the first task to train")
    second = studio.http.post("/api/tasks", json={"config": long}).json()["id"]
    time.sleep(3)
    assert studio.task(second)["status"] == "queued"  # two slots, but one GPU: it waits for it
    held = gpu_memory_used()
    assert held > idle + 100 * MIB, (idle, held)

    studio.http.post(f"/api/tasks/{first}/freeze").raise_for_status()
    studio.wait_status(first, "paused", timeout=60)
    time.sleep(2)
    assert gpu_memory_used() > idle + 100 * MIB  # frozen: the process, and its GPU memory, stay
    assert studio.task(second)["status"] == "queued"  # a frozen task keeps its GPU
    studio.http.post(f"/api/tasks/{first}/resume").raise_for_status()
    wait_for(lambda: studio.task(first)["status"] == "training", timeout=60, what="the thaw")

    studio.http.post(f"/api/tasks/{first}/pause").raise_for_status()
    studio.wait_status(first, "paused", timeout=120)
    # Paused: its process is gone and the GPU goes to the second task.
    wait_for(lambda: step_of(studio, second) >= 1, timeout=180, what="the second task to get the GPU")
    for tid in (first, second):
        studio.http.post(f"/api/tasks/{tid}/cancel")
    wait_for(lambda: gpu_memory_used() < idle + 100 * MIB, timeout=120, what="the GPU memory to be freed")


def test_chat_answers_on_a_gpu_no_task_holds(studio: Studio, home: Path) -> None:
    tid = studio.http.post("/api/tasks", json={"config": config(optim={"max_steps": 6})}).json()["id"]
    assert studio.wait_status(tid, "completed", "failed", timeout=300)["status"] == "completed"
    events = chat(studio, tid, {"messages": [{"role": "user", "content": "hi"}], "max_new_tokens": 8})
    worker = next(d for n, d in events if n == "worker")
    assert worker["device"] == "GPU 0", worker
    assert [n for n, _ in events][-1] == "end"


def test_the_gpu_check_tools_are_here() -> None:
    assert shutil.which("nvidia-smi"), "nvidia-smi is how the studio sees GPUs"
