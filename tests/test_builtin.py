"""The built-in tiny model and sample dataset: built locally, deterministically, atomically."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from trainer_fixtures import shared_home

from ftstudio.errors import ValidationError
from ftstudio.training import samples
from ftstudio.training.builtin import SAMPLE_PATH, ensure_tiny, resolve_dataset, resolve_model, tiny_model_dir


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_tiny_model_builds_the_same_every_time(tmp_path: Path) -> None:
    built = ensure_tiny(tmp_path)
    assert built == tiny_model_dir(tmp_path)
    reference = tiny_model_dir(shared_home())
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert _digest(built / name) == _digest(reference / name), name
    # no temporary build directories are left behind
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["tiny"]


def test_tiny_model_is_qwen2_with_chatml() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny_model_dir(shared_home())
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "qwen2"
    tok = AutoTokenizer.from_pretrained(path)
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert "<|im_start|>" in tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert sum(p.numel() for p in model.parameters()) < 5_000_000


def test_half_built_model_is_replaced(tmp_path: Path) -> None:
    target = tiny_model_dir(tmp_path)
    target.mkdir(parents=True)
    (target / "config.json").write_text("{")  # a crash mid-build by an older version
    ensure_tiny(tmp_path)
    assert json.loads((target / "config.json").read_text())["model_type"] == "qwen2"


def test_sample_file_matches_its_recipe() -> None:
    rows = [json.loads(line) for line in SAMPLE_PATH.read_text().splitlines()]
    assert rows == samples.generate()
    assert 300 <= len(rows) <= 1000


def test_resolve_model_and_dataset(tmp_path: Path) -> None:
    home = shared_home()
    assert resolve_model("builtin:tiny", home) == tiny_model_dir(home)
    assert resolve_model("Qwen/Qwen2.5-0.5B", home) == "Qwen/Qwen2.5-0.5B"
    assert resolve_model(str(tmp_path), home) == tmp_path.resolve()
    with pytest.raises(ValidationError, match="unknown built-in model 'builtin:big'"):
        resolve_model("builtin:big", home)

    assert resolve_dataset("builtin:sample", home) == SAMPLE_PATH
    uploads = tmp_path / "datasets"
    uploads.mkdir()
    (uploads / "mine.jsonl").write_text("{}\n")
    assert resolve_dataset("mine", tmp_path) == uploads / "mine.jsonl"
    assert resolve_dataset(str(uploads / "mine.jsonl"), tmp_path) == (uploads / "mine.jsonl").resolve()
    with pytest.raises(ValidationError, match="no dataset 'nope'"):
        resolve_dataset("nope", tmp_path)
