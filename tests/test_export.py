"""Handing a result over: `export` writes a folder that stands on its own (an adapter vLLM and peft
load, or a merged model plain transformers loads, each with a model card), and the task view's
commands name it right. A real fine-tune of builtin:tiny."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import torch
from trainer_fixtures import ALPACA, FAST, merged, shared_home, train, write_jsonl

from ftstudio.training.export import ExportError, export, handover, lora_name

pytestmark = pytest.mark.slow  # one real fine-tune of builtin:tiny serves the module

TASK = "20261201-0000-exp0rt01"


@pytest.fixture(scope="module")
def task(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("export")
    data = write_jsonl(root / "d.jsonl", ALPACA)
    config = merged(FAST, {"data": {"path": str(data)}, "optim": {"max_steps": 6}, "lora": {"rank": 8, "alpha": 16}})
    code, _ = train(root / TASK, config, shared_home())
    assert code == 0
    return root / TASK


def test_the_adapter_export_is_what_vllm_and_peft_expect(task: Path, tmp_path: Path) -> None:
    from peft import AutoPeftModelForCausalLM

    out = export(TASK, "Reverse words", task, tmp_path / "rev", "adapter", shared_home(), wall_s=75.0)
    config = json.loads((out / "adapter_config.json").read_text())
    # vLLM matches target modules by their short names and wants the task type set.
    assert config["task_type"] == "CAUSAL_LM" and config["peft_type"] == "LORA"
    assert config["target_modules"] and all(
        "." not in m and not m.startswith("base_model") for m in config["target_modules"]
    ), config["target_modules"]
    assert config["base_model_name_or_path"] == str(shared_home() / "models" / "tiny")  # builtin: a local folder
    for name in ("adapter_model.safetensors", "tokenizer.json", "chat_template.jinja", "training_config.json"):
        assert (out / name).is_file(), name
    card = (out / "README.md").read_text()
    assert card.startswith("---\nbase_model: ") and "library_name: peft" in card
    assert "| steps | 6 (" in card and "| wall time | 1m 15s |" in card and '"rank": 8' in card
    model = AutoPeftModelForCausalLM.from_pretrained(out)  # the folder alone: the base from its config
    assert sum(p.numel() for n, p in model.named_parameters() if "lora_" in n) > 0


def test_the_merged_export_loads_in_plain_transformers_and_answers_as_the_adapter(task: Path, tmp_path: Path) -> None:
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = export(TASK, "Reverse words", task, tmp_path / "merged", "merged", shared_home())
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    assert not any("lora" in n for n, _ in plain.named_parameters())
    adapted = AutoPeftModelForCausalLM.from_pretrained(task / "adapter").eval()
    ids = AutoTokenizer.from_pretrained(out)("Reverse the word: stone", return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(plain(**ids).logits, adapted(**ids).logits, atol=1e-4)
    assert "library_name: transformers" in (out / "README.md").read_text()


def test_an_export_never_overwrites_and_leaves_nothing_half_written(task: Path, tmp_path: Path) -> None:
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "mine.txt").write_text("keep me")
    with pytest.raises(ExportError, match="already exists; name a new folder with --out"):
        export(TASK, "t", task, taken, "adapter", shared_home())
    assert (taken / "mine.txt").read_text() == "keep me"
    with pytest.raises(ExportError, match="does not exist; create it"):
        export(TASK, "t", task, tmp_path / "no" / "such" / "dir", "adapter", shared_home())
    with pytest.raises(ExportError, match="--format must be adapter or merged"):
        export(TASK, "t", task, tmp_path / "x", "gguf", shared_home())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]  # no temporary folder left behind


def test_the_commands_to_serve_it_name_the_adapter_the_base_and_the_rank(task: Path, tmp_path: Path) -> None:
    hand = handover(TASK, "Reverse words (v2)", task, shared_home())
    assert hand["name"] == "reverse-words-v2" == lora_name("Reverse words (v2)", TASK)
    vllm = shlex.split(hand["vllm"])
    assert vllm[:3] == ["vllm", "serve", str(shared_home() / "models" / "tiny")]
    assert vllm[vllm.index("--lora-modules") + 1] == f"reverse-words-v2={task / 'adapter'}"
    assert "--max-lora-rank" not in vllm  # rank 8: within vLLM's default of 16
    assert f"ADAPTER {task / 'adapter'}" in hand["ollama_modelfile"]
    assert f"AutoPeftModelForCausalLM.from_pretrained({str(task / 'adapter')!r})" in hand["peft"]
    compile(hand["peft"], "peft-snippet", "exec")  # the Python shown is Python
    assert lora_name("!!!", TASK) == TASK
    # A rank above vLLM's default needs --max-lora-rank, at the next size vLLM takes.
    config = json.loads((task / "adapter" / "adapter_config.json").read_text())
    high = tmp_path / "high"
    high.mkdir()
    for f in (task / "adapter").iterdir():
        (high / f.name).write_bytes(f.read_bytes())
    (high / "adapter_config.json").write_text(json.dumps({**config, "r": 24}))
    vllm = shlex.split(handover(TASK, "x", high, shared_home())["vllm"])
    assert vllm[vllm.index("--max-lora-rank") + 1] == "32"


def test_an_adapter_that_does_not_name_its_base_still_gets_commands(task: Path, tmp_path: Path) -> None:
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "adapter_config.json").write_text("{}")
    hand = handover(TASK, "bare", bare, shared_home())
    assert hand["base"] == "BASE_MODEL" and "vllm serve BASE_MODEL --enable-lora" in hand["vllm"]
