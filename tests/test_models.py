"""models.padding_mask_matters: right-padded batches without their attention mask, checked against real models."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch
from trainer_fixtures import shared_home
from transformers import AutoConfig, AutoModelForCausalLM

from ftstudio.training import batches
from ftstudio.training.builtin import tiny_model_dir
from ftstudio.training.models import padding_mask_matters

# Small enough to build in milliseconds; the keys each family does not know are ignored.
TINY = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": 128,
    "max_position_embeddings": 256,
    "pad_token_id": 0,
}
FAMILIES = ["llama", "qwen2", "qwen3", "mistral", "gemma2", "phi3", "gpt_neox", "opt", "mixtral"]


def _right_padded(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, TINY["vocab_size"], (3, 24), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 9:] = 0
    mask[1, 17:] = 0
    ids = ids.masked_fill(mask == 0, 0)
    return ids, mask, ids.masked_fill(mask == 0, batches.IGNORE)


def _loss_logits_grads(model: Any, ids: torch.Tensor, mask: torch.Tensor | None, labels: torch.Tensor) -> Any:
    model.zero_grad()
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach(), out.logits.detach(), grads


def _model(family: str, attention: str = "default", **over: Any) -> Any:
    torch.manual_seed(0)
    config = AutoConfig.for_model(family, **{**TINY, **over})
    # "default": transformers' own choice, sdpa for most families (gemma2: eager)
    kwargs = {} if attention == "default" else {"attn_implementation": attention}
    model = AutoModelForCausalLM.from_config(config, **kwargs)
    return model.eval()  # no dropout: the two forwards must see the same arithmetic


def _mask_changes_nothing(model: Any) -> None:
    ids, mask, labels = _right_padded()
    loss, logits, grads = _loss_logits_grads(model, ids, mask, labels)
    loss_nm, logits_nm, grads_nm = _loss_logits_grads(model, ids, None, labels)
    torch.testing.assert_close(loss_nm, loss)
    real = mask.bool()
    torch.testing.assert_close(logits_nm[real], logits[real])
    assert grads_nm.keys() == grads.keys() and grads
    for name, grad in grads.items():
        torch.testing.assert_close(grads_nm[name], grad, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.slow
@pytest.mark.parametrize("attention", ["default", "eager"])
@pytest.mark.parametrize("family", FAMILIES)
def test_dropping_the_mask_changes_nothing_for_real_tokens(family: str, attention: str) -> None:
    model = _model(family, attention)
    assert not padding_mask_matters(model)
    _mask_changes_nothing(model)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("family", "window"),
    [("mistral", {"sliding_window": 8}), ("gemma2", {"sliding_window": 8}), ("qwen2", {"use_sliding_window": True})],
)
def test_sliding_window_attention_shorter_than_the_rows(family: str, window: dict[str, Any]) -> None:
    model = _model(family, **{"sliding_window": 8, "max_window_layers": 0, **window})
    assert not padding_mask_matters(model)
    _mask_changes_nothing(model)


@pytest.mark.slow
def test_router_loss_keeps_the_mask_because_it_counts_pads() -> None:
    model = _model("mixtral", output_router_logits=True, router_aux_loss_coef=0.5)
    assert padding_mask_matters(model)
    ids, mask, labels = _right_padded()
    loss, _, _ = _loss_logits_grads(model, ids, mask, labels)
    loss_nm, _, _ = _loss_logits_grads(model, ids, None, labels)
    assert abs(float(loss_nm - loss)) > 1e-4  # the reason for the exception: pads would join the balance


def test_bidirectional_attention_keeps_the_mask() -> None:
    gemma = _model("gemma3_text", use_bidirectional_attention=True)
    assert padding_mask_matters(gemma)
    ids, mask, labels = _right_padded()
    loss, _, _ = _loss_logits_grads(gemma, ids, mask, labels)
    loss_nm, _, _ = _loss_logits_grads(gemma, ids, None, labels)
    assert abs(float(loss_nm - loss)) > 1e-5  # real tokens would see the pads after them
    assert padding_mask_matters(_model("bert"))  # a BERT LM head without is_decoder attends both ways


def test_unmeasured_kernels_remote_code_and_multimodal_keep_the_mask() -> None:
    from transformers import Qwen2ForCausalLM

    flash = _model("qwen2")
    flash.config._attn_implementation = "flash_attention_2"  # needs CUDA to run; the decision is the config's
    assert padding_mask_matters(flash)

    class RemoteForCausalLM(Qwen2ForCausalLM):
        pass

    RemoteForCausalLM.__module__ = "transformers_modules.someorg.modeling_remote"  # where remote code loads from
    assert padding_mask_matters(RemoteForCausalLM(AutoConfig.for_model("qwen2", **TINY)))
    multimodal = SimpleNamespace(config=AutoConfig.for_model("gemma3"), modules=lambda: iter(()))
    assert padding_mask_matters(multimodal)
    tiny = AutoModelForCausalLM.from_pretrained(tiny_model_dir(shared_home()))
    assert not padding_mask_matters(tiny)


def test_collator_without_padding_mask_still_masks_the_labels() -> None:
    rows = [batches.Row([5, 6, 7, 8], [-100, 6, 7, 8]), batches.Row([5, 6], [-100, 6])]
    batch = batches.Collator(0, padding_mask=False)(rows)
    assert "attention_mask" not in batch
    assert batch["input_ids"][1].tolist() == [5, 6, 0, 0]
    assert batch["labels"][1].tolist() == [-100, 6, -100, -100]
    assert int(batch["num_real_tokens"]) == 6
    assert "attention_mask" in batches.Collator(0)(rows)
