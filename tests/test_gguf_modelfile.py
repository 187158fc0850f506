"""The parts of a GGUF export that need no llama.cpp: the training chat template said in Ollama's template
language (exactly, or not at all), the stop tokens, the Modelfile, and the one pin of llama.cpp."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

import pytest

from ftstudio.training.builtin import ensure_tiny
from ftstudio.training.gguf import LLAMA_CPP_PYTHON, WORK_PREFIX, modelfile, ollama_template, stop_tokens, tidy_work

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def tokenizer(tmp_path: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(ensure_tiny(tmp_path / "home"))


def test_chatml_becomes_one_branch_per_role_and_the_generation_prompt(tokenizer: Any) -> None:
    assert ollama_template(tokenizer) == (
        '{{ range .Messages }}{{ if eq .Role "system" }}<|im_start|>system\n{{ .Content }}<|im_end|>\n'
        '{{ else if eq .Role "user" }}<|im_start|>user\n{{ .Content }}<|im_end|>\n'
        '{{ else if eq .Role "assistant" }}<|im_start|>assistant\n{{ .Content }}<|im_end|>\n'
        "{{ end }}{{ end }}<|im_start|>assistant\n"
    )
    assert stop_tokens(tokenizer) == ["<|im_end|>", "<|endoftext|>"]


def test_llama3_style_keeps_its_leading_text_once_and_escapes_template_braces(tokenizer: Any) -> None:
    tokenizer.chat_template = (
        "{{ '<|begin|>' }}{% for m in messages %}{{ '<h>' + m['role'] + '</h>{{' + m['content'] + '}}<eot>' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<h>assistant</h>' }}{% endif %}"
    )
    text = ollama_template(tokenizer)
    assert text is not None and text.startswith("<|begin|>{{ range .Messages }}")
    assert '{{ else if eq .Role "user" }}{{ "<h>user</h>{{" }}{{ .Content }}{{ "}}<eot>" }}' in text
    assert text.endswith("{{ end }}{{ end }}<h>assistant</h>")


def test_a_template_that_is_not_one_piece_per_message_is_left_to_the_gguf(tokenizer: Any) -> None:
    tokenizer.chat_template = (
        "{% for m in messages %}{{ loop.index|string + m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
    )
    assert ollama_template(tokenizer) is None
    text = modelfile("x-q8_0.gguf", tokenizer)
    assert "TEMPLATE" not in text and "reads the template stored in the GGUF" in text
    assert "FROM ./x-q8_0.gguf\n" in text and 'PARAMETER stop "<|im_end|>"' in text


def test_a_system_prompt_goes_into_the_modelfile(tokenizer: Any) -> None:
    text = modelfile("m.gguf", tokenizer, system="Answer in French.")
    assert 'SYSTEM """Answer in French."""' in text and 'TEMPLATE """' in text


def test_the_gguf_extra_pins_the_release_the_converter_comes_from() -> None:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["gguf"]
    assert f"llama-cpp-python=={LLAMA_CPP_PYTHON}" in extras


def test_the_system_prompt_every_training_conversation_began_with_is_the_modelfiles(tmp_path: Path) -> None:
    import json

    from ftstudio.training.gguf import trained_system

    def trained_on(rows: list[dict[str, Any]]) -> str | None:
        data = tmp_path / "d.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        (tmp_path / "training_config.json").write_text(json.dumps({"data": {"path": str(data)}}))
        return trained_system(tmp_path, tmp_path / "home")

    def row(system: str | None) -> dict[str, Any]:
        turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
        return {"messages": ([{"role": "system", "content": system}] if system else []) + turns}

    assert trained_on([row("Be brief."), row("Be brief.")]) == "Be brief."
    assert trained_on([row("Be brief."), row("Be kind.")]) is None
    assert trained_on([row("Be brief."), row(None)]) is None
    assert trained_on([{"instruction": "Add 1 and 2", "output": "3"}]) is None
    (tmp_path / "training_config.json").write_text(json.dumps({"data": {"path": str(tmp_path / "gone.jsonl")}}))
    assert trained_system(tmp_path, tmp_path / "home") is None


def test_a_killed_exports_work_folder_is_removed_by_the_next_and_a_running_ones_kept(tmp_path: Path) -> None:
    """A work folder holds a merged model (gigabytes): one whose export was killed goes when the next export starts."""
    live = tmp_path / f"{WORK_PREFIX}{os.getppid()}-abc"  # the process that runs pytest: alive
    dead = tmp_path / f"{WORK_PREFIX}{2**22 + 11}-def"
    older = tmp_path / f"{WORK_PREFIX}k2j_x9"  # named before folders carried their process
    for folder in (live, dead, older):
        (folder / "merged").mkdir(parents=True)
        (folder / "merged" / "model.safetensors").write_bytes(b"0" * 64)
    tidy_work(tmp_path)
    assert live.is_dir() and not dead.exists() and not older.exists()
