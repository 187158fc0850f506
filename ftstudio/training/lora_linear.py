"""A LoRA linear layer whose forward and backward fold the adapter into the base matmul.

peft computes `base(x) + lora_B(lora_A(dropout(x))) * scaling` as separate operations:
the scaling is a pass over the whole [tokens x out] output, the sum another, and in
the backward autograd scales the gradient again and adds the two gradients of x (one
through the frozen weight, one through the adapter) in yet another pass. On a CPU,
where those passes cost as much as a good share of the matmuls, doing without them
made a training step 9-14 % faster on fixed batches (docs/benchmarks.md).

Here the adapter rides on the matmuls instead: `out = x Wᵀ + b`, then
`out += scaling · (x Aᵀ) Bᵀ` in place (`addmm_` with alpha = scaling), and the
backward does the same for the gradient of x, `g W + scaling · (g B) A`. The
arithmetic is the same; the parameters, their names and the saved adapter are
plain peft (the adapter loads with peft alone).

Only the common case takes this path: one active adapter, not merged, no DoRA or
other variant, a plain frozen `nn.Linear` base, input and all weights in one dtype,
no autocast (in practice: fp32 training, which is the CPU's). Anything else goes
through peft's own forward, unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners.lora.layer import Linear as PeftLoraLinear
from torch import nn


class _LoraMatmul(torch.autograd.Function):
    """y = x Wᵀ + b + s · (d Aᵀ) Bᵀ, where d is x after LoRA dropout (None: d is x itself)."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        dropped: torch.Tensor | None,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
        scaling: float,
    ) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        d2 = x2 if dropped is None else dropped.reshape(-1, shape[-1])
        h = torch.mm(d2, lora_a.t())  # [tokens, rank]: small, kept for lora_B's gradient
        out = torch.addmm(bias, x2, weight.t()) if bias is not None else torch.mm(x2, weight.t())
        out.addmm_(h, lora_b.t(), alpha=scaling)
        ctx.save_for_backward(d2, weight, lora_a, lora_b, h)
        ctx.scaling = scaling
        ctx.shape = shape
        ctx.separate_dropout = dropped is not None
        return out.view(*shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        d2, weight, lora_a, lora_b, h = ctx.saved_tensors
        s = ctx.scaling
        g2 = grad.reshape(-1, grad.shape[-1])
        gh = torch.mm(g2, lora_b)  # gradient at h, before the scaling
        gx = gd = None
        if ctx.needs_input_grad[0]:
            gx = torch.mm(g2, weight)
            if not ctx.separate_dropout:
                gx.addmm_(gh, lora_a, alpha=s)
            gx = gx.view(ctx.shape)
        if ctx.separate_dropout and ctx.needs_input_grad[1]:
            gd = torch.mm(gh, lora_a).mul_(s).view(ctx.shape)
        ga = torch.mm(gh.t(), d2).mul_(s) if ctx.needs_input_grad[4] else None
        gb = torch.mm(g2.t(), h).mul_(s) if ctx.needs_input_grad[5] else None
        return gx, gd, None, None, ga, gb, None


class FusedLoraLinear(PeftLoraLinear):
    """peft's LoRA `Linear`, with `_LoraMatmul` for the common case. Registered with
    `LoraConfig._register_custom_module({nn.Linear: FusedLoraLinear})` (see models.lora_config)."""

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        name = self._plain_adapter(x, args, kwargs)
        if name is None:
            return super().forward(x, *args, **kwargs)
        base = self.base_layer
        dropout = self.lora_dropout[name]
        dropped = None if isinstance(dropout, nn.Identity) else dropout(x)
        weight_a, weight_b = self.lora_A[name].weight, self.lora_B[name].weight
        out: torch.Tensor = _LoraMatmul.apply(
            x, dropped, base.weight, base.bias, weight_a, weight_b, float(self.scaling[name])
        )
        return out

    def _plain_adapter(self, x: torch.Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
        """The one active adapter when this call can take the fused path, else None."""
        if args or kwargs or self.disable_adapters or self.merged or self.fan_in_fan_out:
            return None
        if len(self.active_adapters) != 1 or type(self.base_layer) is not nn.Linear:
            return None
        name: str = self.active_adapters[0]
        if name not in self.lora_A or name in self.lora_variant:
            return None
        if torch.is_autocast_enabled(x.device.type):
            return None
        base = self.base_layer
        if base.weight.requires_grad or (base.bias is not None and base.bias.requires_grad):
            return None  # the fused backward has no gradient for the base layer
        params = [base.weight, self.lora_A[name].weight, self.lora_B[name].weight]
        if base.bias is not None:
            params.append(base.bias)
        if any(p.dtype != x.dtype or p.device != x.device for p in params):
            return None
        return name
