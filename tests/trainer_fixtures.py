"""Shared helpers for the trainer's tests (imported explicitly; conftest.py belongs to the studio's tests).

One FTSTUDIO_HOME per test process holds the built-in tiny model, built once.
"""

from __future__ import annotations

import atexit
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ftstudio.training.builtin import ensure_tiny, tiny_model_dir
from ftstudio.training.trainer import main

_HOME: Path | None = None


def shared_home() -> Path:
    global _HOME
    if _HOME is None:
        _HOME = Path(tempfile.mkdtemp(prefix="ftstudio-test-home-"))
        atexit.register(shutil.rmtree, _HOME, True)
        ensure_tiny(_HOME)
    return _HOME


# Fast settings for a real run on builtin:tiny: a handful of steps, no eval unless asked.
FAST: dict[str, Any] = {
    "model": {"name": "builtin:tiny"},
    "data": {"max_length": 128, "validation": "0"},
    "lora": {"rank": 4, "alpha": 8},
    "optim": {"max_steps": 4, "batch_size": 4, "grad_accum": 1, "learning_rate": 1e-3},
    "checkpoint": {"every_steps": 100},
    "logging": {"eval_on_start": False},
}


def merged(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = json.loads(json.dumps(base))
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = value
    return out


def write_spec(task_dir: Path, config: dict[str, Any], home: Path) -> Path:
    task_dir.mkdir(parents=True, exist_ok=True)
    spec = task_dir / "spec.json"
    spec.write_text(
        json.dumps({"format": 1, "task_id": task_dir.name, "name": "t", "config": config, "home": str(home)})
    )
    return spec


def read_events(task_dir: Path) -> list[dict[str, Any]]:
    path = task_dir / "events.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def train(task_dir: Path, config: dict[str, Any], home: Path) -> tuple[int, list[dict[str, Any]]]:
    """Run the real trainer in this process; (exit code, events)."""
    code = main([str(write_spec(task_dir, config, home))])
    return code, read_events(task_dir)


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


ALPACA = [
    {"instruction": f"What is {a} plus {b}?", "input": "", "output": f"{a} plus {b} is {a + b}."}
    for a in range(1, 5)
    for b in range(1, 5)
]
SHAREGPT = [
    {
        "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": r["instruction"]},
            {"from": "gpt", "value": r["output"]},
            {"from": "human", "value": "Again?"},
            {"from": "gpt", "value": r["output"]},
        ]
    }
    for r in ALPACA
]
MESSAGES = [
    {"messages": [{"role": "user", "content": r["instruction"]}, {"role": "assistant", "content": r["output"]}]}
    for r in ALPACA
]
TEXT = [{"text": f"{r['instruction']} {r['output']}"} for r in ALPACA]


def assert_adapter_loads(adapter: Path, home: Path) -> None:
    """The final adapter loads with peft on the built-in tiny base (in `home`) and gives finite logits."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    assert (adapter / "adapter_model.safetensors").is_file() and (adapter / "adapter_config.json").is_file()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir(home))
    model = PeftModel.from_pretrained(base, adapter)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[1, 2, 3]])).logits
    assert logits.shape[:2] == (1, 3) and torch.isfinite(logits).all()
