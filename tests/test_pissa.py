"""PiSSA (adapter pissa, issue 22): LoRA started from the principal singular vectors of each weight, saved as a
plain LoRA adapter on the original base, and refused where the adapter switched off must be the starting model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from trainer_fixtures import FAST, assert_adapter_loads, merged, shared_home, train

from ftstudio.config import TrainingConfig
from ftstudio.errors import ValidationError


@pytest.mark.parametrize(
    ("over", "message"),
    [
        ({"method": "dpo"}, "which dpo's reference must be; use lora, or method orpo or dpo with loss simpo"),
        ({"method": "kto"}, "which kto's reference must be"),
        ({"method": "grpo", "grpo": {"beta": 0.1}}, "which grpo's KL penalty (grpo.beta) measures against"),
        ({"evaluation": {"prompts": "builtin:sample"}}, "which the held-out prompts' base answers come from"),
        ({"model": {"quantization": "4bit"}}, "pissa needs the base in full precision"),
        ({"model": {"start_from": "t-1"}}, "keeps that adapter's own kind"),
    ],
)
def test_pissa_is_refused_where_the_adapter_switched_off_must_be_the_starting_model(
    over: dict[str, object], message: str
) -> None:
    with pytest.raises(ValidationError, match=message.replace("(", r"\(").replace(")", r"\)")):
        TrainingConfig.from_dict({"adapter": "pissa", **over})
    TrainingConfig.from_dict({"adapter": "pissa", "method": "orpo"})  # no reference: fine


@pytest.mark.slow
def test_a_pissa_adapter_is_saved_as_lora_on_the_original_base_giving_the_trained_model(tmp_path: Path) -> None:
    """The saved adapter on the untouched base gives the logits the trained PiSSA model gave: that model is
    rebuilt from its last checkpoint (the same PiSSA start, then the checkpoint's adapter weights)."""
    import torch
    from peft import PeftModel, get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from ftstudio.config import LoraConfig
    from ftstudio.training.builtin import tiny_model_dir
    from ftstudio.training.models import lora_config

    config = merged(FAST, {"adapter": "pissa", "optim": {"max_steps": 4, "learning_rate": 3e-3}})
    config["checkpoint"] = {"every_steps": 4}
    code, events = train(tmp_path / "task", config, shared_home())
    assert code == 0, events[-1]
    adapter = tmp_path / "task" / "adapter"
    saved = json.loads((adapter / "adapter_config.json").read_text())
    assert saved["r"] == 2 * FAST["lora"]["rank"] and saved["init_lora_weights"] is True
    assert not (tmp_path / "task" / "pissa-start").exists()
    assert_adapter_loads(adapter, shared_home())

    base_dir = tiny_model_dir(shared_home())
    ids = torch.tensor([[5, 17, 42, 7, 99]])
    with torch.no_grad():
        converted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter)
        expected = converted(input_ids=ids).logits
        rebuilt = get_peft_model(
            AutoModelForCausalLM.from_pretrained(base_dir),
            lora_config(LoraConfig(rank=FAST["lora"]["rank"], alpha=FAST["lora"]["alpha"]), False, "pissa"),
        )
        state = load_file(tmp_path / "task" / "checkpoints" / "checkpoint-4" / "adapter_model.safetensors")
        set_peft_model_state_dict(rebuilt, state)
        trained = rebuilt(input_ids=ids).logits
        untouched = AutoModelForCausalLM.from_pretrained(base_dir)(input_ids=ids).logits
    assert (expected - trained).abs().max() < 1e-3
    assert (expected - untouched).abs().max() > 1e-3  # the training moved the model
