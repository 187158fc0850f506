"""The final adapter: loads with peft, merges into a plain transformers model, generates text."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from trainer_fixtures import ALPACA, FAST, merged, shared_home, train, write_jsonl

from ftstudio.errors import NotFound
from ftstudio.training.adapters import generate, merge
from ftstudio.training.builtin import tiny_model_dir

pytestmark = pytest.mark.slow  # one real fine-tune of builtin:tiny serves the module


@pytest.fixture(scope="module")
def task(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("adapter")
    data = write_jsonl(root / "d.jsonl", ALPACA)
    config = merged(FAST, {"data": {"path": str(data)}, "optim": {"max_steps": 8}, "lora": {"rank": 8, "alpha": 16}})
    code, _ = train(root / "task", config, shared_home())
    assert code == 0
    return root / "task"


def test_adapter_files(task: Path) -> None:
    adapter = task / "adapter"
    for name in (
        "adapter_model.safetensors",
        "adapter_config.json",
        "tokenizer.json",
        "training_config.json",
        "summary.json",
    ):
        assert (adapter / name).exists(), name
    summary = json.loads((adapter / "summary.json").read_text())
    assert {"steps", "epochs", "final_loss", "best_loss", "tokens", "tokens_per_s", "wall_s"} <= set(summary)
    assert summary["target_modules"] and summary["trainable_params"] > 0


def test_adapter_loads_with_peft_and_generates(task: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir(shared_home()))
    model = PeftModel.from_pretrained(base, task / "adapter")
    tok = AutoTokenizer.from_pretrained(task / "adapter")
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "What is 1 plus 2?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**ids, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] > ids["input_ids"].shape[1]
    reply = generate(task, "What is 1 plus 2?", max_new_tokens=8)
    assert isinstance(reply, str) and reply


def test_merge_loads_without_peft(task: Path, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = merge(task, tmp_path / "merged")
    assert (out / "model.safetensors").exists() and not (out / "adapter_config.json").exists()
    plain = AutoModelForCausalLM.from_pretrained(out)
    assert not any("lora" in name for name, _ in plain.named_parameters())
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("What is 1 plus 2?", return_tensors="pt")
    adapted = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir(shared_home())), task / "adapter"
    )
    adapted.eval()
    plain.eval()
    with torch.no_grad():
        assert torch.allclose(plain(**ids).logits, adapted(**ids).logits, atol=1e-4)
    text = tok.decode(plain.generate(**ids, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)[0])
    assert text.startswith("What is 1 plus 2?")


def test_missing_adapter_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="has not finished training"):
        generate(tmp_path, "hi")
