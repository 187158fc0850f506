"""Submit-time checks: every bad input is refused with the field named, before any training."""

from __future__ import annotations

from pathlib import Path

import pytest
from trainer_fixtures import ALPACA, shared_home, write_jsonl

from ftstudio.config import TrainingConfig
from ftstudio.errors import ValidationError
from ftstudio.training.preflight import check


def _problems(config: dict, home: Path) -> dict[str, str]:
    with pytest.raises(ValidationError) as e:
        check(TrainingConfig.from_dict(config), home)
    return {p.field: p.message for p in e.value.problems}


def test_good_config_passes(tmp_path: Path) -> None:
    check(TrainingConfig.from_dict({"preset": "cpu-demo"}), tmp_path)
    data = write_jsonl(tmp_path / "d.jsonl", ALPACA)
    check(TrainingConfig.from_dict({"data": {"path": str(data), "validation": str(data)}}), tmp_path)


def test_bad_model_references(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert "unknown built-in model" in _problems({"model": {"name": "builtin:huge"}}, tmp_path)["model.name (--model)"]
    assert "is not a hub id" in _problems({"model": {"name": "not a model!"}}, tmp_path)["model.name (--model)"]
    assert "has no config.json" in _problems({"model": {"name": str(tmp_path)}}, tmp_path)["model.name (--model)"]
    missing = _problems({"model": {"name": str(tmp_path / "gone")}}, tmp_path)["model.name (--model)"]
    assert "is not a directory" in missing
    offline = _problems({"model": {"name": "someorg/some-model-not-cached"}}, tmp_path)["model.name (--model)"]
    assert "not in the local Hugging Face cache" in offline and "offline" in offline
    # a local model directory is fine
    check(TrainingConfig.from_dict({"model": {"name": str(shared_home() / "models" / "tiny")}}), tmp_path)


def test_bad_datasets(tmp_path: Path) -> None:
    bad = tmp_path / "data.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": \n')
    assert (
        "data.jsonl line 2: not valid JSON"
        in _problems({"data": {"path": str(bad)}}, tmp_path)["data.path (--dataset)"]
    )
    (tmp_path / "empty.jsonl").write_text("")
    assert (
        "has no rows" in _problems({"data": {"path": str(tmp_path / "empty.jsonl")}}, tmp_path)["data.path (--dataset)"]
    )
    assert "no dataset" in _problems({"data": {"path": "missing-name"}}, tmp_path)["data.path (--dataset)"]
    assert "no dataset" in _problems({"data": {"validation": "missing.jsonl"}}, tmp_path)["data.validation"]


def test_quantization_without_gpu_and_bad_resume(tmp_path: Path) -> None:
    problems = _problems(
        {"model": {"quantization": "4bit"}, "checkpoint": {"resume_from": str(tmp_path / "x")}}, tmp_path
    )
    assert "needs" in problems["model.quantization"] and "model.quantization=none" in problems["model.quantization"]
    assert "does not exist" in problems["checkpoint.resume_from"]
    (tmp_path / "checkpoint-5").mkdir()
    problems = _problems({"checkpoint": {"resume_from": str(tmp_path / "checkpoint-5")}}, tmp_path)
    assert "not a complete checkpoint" in problems["checkpoint.resume_from"]


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    with pytest.raises(ValidationError) as e:
        TrainingConfig.from_dict({"optim": {"learning_rate": -1, "batch_size": 0}, "lora": {"rank": 0}})
    fields = {p.field for p in e.value.problems}
    assert fields == {"optim.learning_rate (--lr)", "optim.batch_size (--batch-size)", "lora.rank (--lora-rank)"}


def test_compile_without_a_compiler_and_reporters_that_are_not_installed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no g++, c++ or clang++ to be found
    monkeypatch.delenv("CXX", raising=False)
    config = {"model": {"compile": True}, "logging": {"report_to": ["wandb", "mlflow"]}}
    with pytest.raises(ValidationError) as e:
        check(TrainingConfig.from_dict(config), tmp_path)
    messages = [(p.field, p.message) for p in e.value.problems]
    assert [f for f, _ in messages] == ["model.compile", "logging.report_to", "logging.report_to"]
    assert "needs a C++ compiler" in messages[0][1] and "model.compile=false" in messages[0][1]
    assert "pip install wandb" in messages[1][1] and "pip install mlflow" in messages[2][1]
    monkeypatch.undo()
    # Installed for the tests (requirements-test.txt): tensorboard reporting passes.
    check(TrainingConfig.from_dict({"model": {"compile": True}, "logging": {"report_to": ["tensorboard"]}}), tmp_path)
