"""Out of memory on the CPU, for real: a task whose batch does not fit in its memory limit (`--memory`).

The model (12 layers, hidden 512) keeps most of a step in activations of a few MB each, which the allocator keeps
between steps (ftstudio.training.allocator): past the limit a task stays past it, for every mechanism, the
watchdog's half-second samples included. At length 256 it peaks at about 2.1 GiB at batch 8 and 1.4 GiB at batch
4 (bench/bench_memory.py's method). The limit is 1750 MiB:

- the studio refuses the task at submit, naming the batch that fits (its estimate says so before anything runs);
- started anyway (the runner alone, as a hand-written spec would be), it is killed at its limit and fails with a
  message naming the settings;
- with optim.auto_batch the studio takes it, the kill splits its batches, and it resumes and completes on the same
  loss curve as an unlimited run at batch 8.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from support import Studio, home_env
from test_memlimit import make_task, start_runner, stop_all
from trainer_fixtures import read_events

from ftstudio.batchsplit import SPLIT_FILE
from ftstudio.home import TaskDir, read_json

pytestmark = [pytest.mark.process, pytest.mark.slow]

LIMIT = "1750M"
SHAPE = dict(
    hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8, num_key_value_heads=4,
    vocab_size=1024, tie_word_embeddings=True, max_position_embeddings=1024,
)  # fmt: skip


def build(folder: Path) -> tuple[Path, Path]:
    """The model and data folder under `folder` (the studio's home, where requests may read)."""
    import random

    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from ftstudio.training.builtin import build_tokenizer
    from ftstudio.training.samples import SAMPLE_PATH

    model = folder / "deep"
    torch.manual_seed(0)
    Qwen2ForCausalLM(Qwen2Config(**SHAPE)).save_pretrained(model)
    build_tokenizer().save_pretrained(model)  # type: ignore[attr-defined]
    words = " ".join(json.loads(line)["output"] for line in SAMPLE_PATH.read_text().splitlines()).split()
    rng = random.Random(0)
    data = folder / "long.jsonl"
    with data.open("w") as f:  # every response runs past max_length: every batch is 256 tokens long
        for n in range(24):
            f.write(json.dumps({"instruction": f"Passage {n}.", "output": " ".join(rng.choices(words, k=600))}) + "\n")
    return model, data


def config(model: Path, data: Path, **optim: Any) -> dict[str, Any]:
    return {
        "model": {"name": str(model), "dtype": "float32"},
        "data": {"path": str(data), "max_length": 256, "validation": "0"},
        "lora": {"rank": 4, "alpha": 8},
        "optim": {"max_steps": 3, "batch_size": 8, "grad_accum": 1, "learning_rate": 1e-3, **optim},
        "checkpoint": {"every_steps": 1},
        "logging": {"eval_on_start": False},
        "resources": {"memory": LIMIT},
    }


def losses(task_dir: Path) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in read_events(task_dir) if e["kind"] == "progress"}


def test_over_its_limit_a_task_is_refused_at_submit_and_fails_if_started_and_auto_batch_completes_it(
    home: Path, tmp_path: Path
) -> None:
    model, data = build(home)
    studio = Studio(home, home_env(home, OMP_NUM_THREADS="1")).start("--slots", "2")
    try:
        # The estimate refuses it before anything runs, naming the batch that fits.
        r = studio.http.post("/api/tasks", json={"config": config(model, data)})
        assert r.status_code == 422, r.text
        detail = r.json()["detail"]
        assert "needs about 2.1 GiB of memory at batch 8 and length 256; its --memory limit leaves 1.7 GiB" in detail
        assert "; batch 4 fits (about 1.4 GiB), with grad_accum 2 for the same effective batch" in detail, detail
        assert "optim.auto_batch" in detail and "raise --memory" in detail

        # An unlimited run at batch 8: the curve to hold the split run to.
        unlimited = config(model, data)
        unlimited["resources"] = {"memory": ""}
        reference = studio.http.post("/api/tasks", json={"config": unlimited}).json()["id"]
        split = studio.http.post("/api/tasks", json={"config": config(model, data, auto_batch=True)})
        assert split.status_code == 201, split.text
        tid = split.json()["id"]
        done = studio.wait_status(tid, "completed", "failed", timeout=300)
        assert done["status"] == "completed", done
        studio.wait_status(reference, "completed", timeout=300)
        tdir = TaskDir(home / "tasks" / tid)
        assert json.loads((tdir.path / SPLIT_FILE).read_text())["parts"] >= 2
        history = json.dumps(studio.http.get(f"/api/tasks/{tid}/history").json())
        assert "memory limit of 1.71 GiB reached" in history, history
        assert "optim.auto_batch: from now on batch 8 trains in 2 parts of 4 rows" in history, history
        got, want = losses(tdir.path), losses(home / "tasks" / reference)
        assert sorted(got) == sorted(want) == [1, 2, 3]
        assert [got[s] for s in (1, 2, 3)] == pytest.approx([want[s] for s in (1, 2, 3)], rel=1e-3)
    finally:
        studio.stop()

    # The same task started by the runner alone, without auto_batch: killed at the limit, failed, with the fix.
    tdir = make_task(tmp_path, "20260101-0000-overover", "t", config(model, data))
    runner = start_runner(tdir, "ftstudio.train", OMP_NUM_THREADS="1")
    try:
        assert runner.wait(timeout=240) == 0
        record = read_json(tdir.exit)
        assert record["outcome"] == "failed", tdir.log.read_text()[-3000:]
        assert record["reason"] == (
            "memory limit of 1.71 GiB exceeded; raise --memory, or lower optim.batch_size or data.max_length, "
            "or turn on optim.auto_batch"
        )
    finally:
        stop_all([runner], [tdir])
