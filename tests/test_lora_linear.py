"""The fused LoRA layer computes what peft's own layer computes: the output and every gradient,
on the path it takes and on each path where it hands over to peft."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from trainer_fixtures import shared_home

from ftstudio.config import LoraConfig as StudioLoraConfig
from ftstudio.config import ModelConfig
from ftstudio.training.lora_linear import FusedLoraLinear
from ftstudio.training.models import attach_lora, load_model


class Toy(nn.Module):
    """A linear layer with a bias feeding one without."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(12, 20)
        self.down = nn.Linear(20, 12, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(x)))


def twins(dropout: float = 0.0, dtype: torch.dtype = torch.float64) -> tuple[nn.Module, nn.Module]:
    """The same toy wrapped by peft's layers and by the fused ones, with the same non-zero adapters
    (lora_B starts at zero, which would hide a wrong adapter path)."""
    torch.manual_seed(0)
    base = Toy().to(dtype)

    def wrap(fused: bool) -> nn.Module:
        config = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["up", "down"])
        if fused:
            config._register_custom_module({nn.Linear: FusedLoraLinear})
        return get_peft_model(copy.deepcopy(base), config)

    plain, fused = wrap(False), wrap(True)
    torch.manual_seed(1)
    with torch.no_grad():
        for p, q in zip(plain.parameters(), fused.parameters(), strict=True):
            if p.requires_grad:
                p.copy_(torch.randn_like(p))
                q.copy_(p)
    return plain, fused


def run(model: nn.Module, x: torch.Tensor, seed: int = 5) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Output, and the gradients of a weighted sum of it (x's included when x asks for one)."""
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(x.requires_grad)
    torch.manual_seed(seed)  # the same dropout masks for both twins
    out = model(x)
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)
    (out * weights).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    if x.requires_grad:
        grads["x"] = x.grad  # type: ignore[assignment]
    return out.detach(), grads


def assert_same(plain: nn.Module, fused: nn.Module, x: torch.Tensor, adapter_used: bool = True) -> torch.Tensor:
    out_p, grads_p = run(plain, x)
    out_f, grads_f = run(fused, x)
    torch.testing.assert_close(out_f, out_p)
    assert grads_f.keys() == grads_p.keys()
    assert any(n.endswith("lora_A.default.weight") for n in grads_f) == adapter_used
    for name in grads_p:
        torch.testing.assert_close(grads_f[name], grads_p[name], msg=name)
    return out_f


def fused_calls(model: nn.Module, x: torch.Tensor) -> int:
    """How many layers took the fused path in one forward (its graph nodes are _LoraMatmulBackward)."""
    seen = 0

    def count(module: nn.Module, inputs: object, output: torch.Tensor) -> None:
        nonlocal seen
        seen += type(output.grad_fn).__name__ == "_LoraMatmulBackward"

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, FusedLoraLinear)]
    model(x.detach().requires_grad_(True))
    for h in hooks:
        h.remove()
    return seen


def test_every_adapted_linear_is_fused() -> None:
    _, fused = twins()
    layers = [m for m in fused.modules() if hasattr(m, "lora_A")]
    assert len(layers) == 2 and all(isinstance(m, FusedLoraLinear) for m in layers)


@pytest.mark.parametrize("shape", [(7, 12), (3, 5, 12)], ids=["2d", "3d"])
@pytest.mark.parametrize("input_grad", [True, False], ids=["x-grad", "no-x-grad"])
def test_same_output_and_gradients_as_peft(shape: tuple[int, ...], input_grad: bool) -> None:
    plain, fused = twins()
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=input_grad)
    assert_same(plain, fused, x)
    assert fused_calls(fused, x) == 2


def test_lora_dropout_gives_the_same_result_on_the_fused_path() -> None:
    plain, fused = twins(dropout=0.3)
    x = torch.randn(4, 6, 12, dtype=torch.float64, requires_grad=True)
    out = assert_same(plain, fused, x)
    assert fused_calls(fused, x) == 2
    # dropout was really on: the output differs from the one without it
    assert not torch.allclose(out, run(twins()[1], x)[0])


def merged(model: nn.Module) -> None:
    model.merge_adapter()  # type: ignore[operator]


@pytest.mark.parametrize(
    ("change", "adapter_used"),
    [
        pytest.param(merged, False, id="merged"),
        pytest.param(lambda m: m.base_model.disable_adapter_layers(), False, id="adapters-disabled"),
        pytest.param(lambda m: m.base_model.model.up.base_layer.weight.requires_grad_(True), True, id="base-trains"),
    ],
)
def test_other_cases_are_left_to_peft(change: Callable[[nn.Module], None], adapter_used: bool) -> None:
    plain, fused = twins()
    change(plain)
    change(fused)
    x = torch.randn(3, 12, dtype=torch.float64, requires_grad=True)
    assert fused_calls(fused, x) == (1 if adapter_used else 0)  # "down" still fuses when only "up" trains its base
    assert_same(plain, fused, x, adapter_used)


def test_autocast_is_left_to_peft() -> None:
    plain, fused = twins(dtype=torch.float32)
    x = torch.randn(3, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fused_calls(fused, x) == 0
        out_p, out_f = plain(x), fused(x)
    assert out_f.dtype == torch.bfloat16
    torch.testing.assert_close(out_f, out_p)


@pytest.mark.slow
def test_builtin_model_trains_the_same_with_fused_layers() -> None:
    """The real model: attach_lora fuses every adapted layer, and a forward and backward on it
    give what peft's layers give (fp32, so a tolerance for the different summation order)."""
    ref = shared_home() / "models" / "tiny"
    cfg = StudioLoraConfig(rank=4, alpha=8)

    def adapted(fused: bool) -> nn.Module:
        torch.manual_seed(3)
        model, _ = attach_lora(load_model(ref, ModelConfig(name="builtin:tiny")), cfg, fused=fused)
        with torch.no_grad():  # non-zero lora_B, the same in both
            torch.manual_seed(4)
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn_like(p) * 0.1)
        return model

    plain, fused = adapted(False), adapted(True)
    layers = [m for m in fused.modules() if hasattr(m, "lora_A")]
    assert layers and all(isinstance(m, FusedLoraLinear) for m in layers)
    ids = torch.randint(3, 200, (2, 16))
    losses, grads = [], []
    for model in (plain, fused):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 2 * len(layers)
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-4, atol=1e-6, msg=name)
