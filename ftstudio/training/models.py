"""The base model and its LoRA adapters.

Any causal LM transformers can load, by hub id or local directory. Weights are
loaded in the dtype the hardware does best (bf16 where the GPU supports it, fp16
on other GPUs, fp32 on CPU), optionally quantized to 4 or 8 bits through
bitsandbytes (QLoRA; needs a CUDA GPU). `trust_remote_code` is passed only when
the user asked for it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ftstudio.config import LoraConfig, ModelConfig
from ftstudio.errors import Problem, ValidationError
from ftstudio.training.preflight import quantization_problem


@dataclass
class AdapterReport:
    target_modules: list[str]
    """Module names (last part, e.g. q_proj) that got LoRA adapters."""
    adapted_layers: int
    """How many linear layers got an adapter."""
    trainable_params: int
    """Parameters that train (adapters plus modules_to_save)."""
    total_params: int
    """All parameters of the model, frozen ones included."""

    def fields(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def pick_dtype(requested: str) -> torch.dtype:
    """The weights dtype: what was asked, or the hardware's best for `auto`."""
    if requested != "auto":
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[requested]
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def attention_implementation(dtype: torch.dtype) -> str | None:
    """flash-attention 2 where it can run (CUDA, half precision, package installed): packed rows then
    use its variable-length kernel. Otherwise None, transformers' default (sdpa)."""
    half = dtype in (torch.bfloat16, torch.float16)
    if half and torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return None


def padding_mask_matters(model: Any) -> bool:
    """Whether right-padded batches must carry their attention mask for this model.

    In a causal decoder a real token attends only to earlier positions, and the collator
    pads on the right, so no real token ever sees a pad: its outputs, the loss (pads are
    labelled -100) and every gradient are the same with or without the mask (tested over
    the common families in tests/test_models.py). Without one, sdpa runs its plain causal
    kernel instead of materialising a padding mask and repeating the key/value heads for
    grouped-query attention: about 2% of a step on a CPU (bench_step.py).

    The mask stays where pads could count, or where leaving it out was never measured:
    - a mixture-of-experts router loss (`output_router_logits`) balances over every token
      the mask lets through;
    - attention that is not causal (`is_causal` false on a module, e.g. Gemma with
      `use_bidirectional_attention`), encoder-decoders, and composite (multimodal) configs;
    - flash-attention, which uses the mask to skip the pads altogether;
    - remote code (`model.trust_remote_code`), whose forward ftstudio cannot vouch for."""
    config = model.config
    if getattr(config, "output_router_logits", False) or getattr(config, "is_encoder_decoder", False):
        return True
    if getattr(config, "use_bidirectional_attention", False) or getattr(config, "sub_configs", None):
        return True
    if getattr(config, "_attn_implementation", None) not in ("sdpa", "eager"):
        return True
    for module in model.modules():
        if type(module).__module__.startswith("transformers_modules") or getattr(module, "is_causal", True) is False:
            return True
    return False


def load_tokenizer(ref: str | Path, cfg: ModelConfig) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(ref), trust_remote_code=cfg.trust_remote_code)


def load_model(ref: str | Path, cfg: ModelConfig) -> Any:
    """The base model, ready for adapters (frozen, cache off, checkpointing as configured)."""
    from transformers import AutoModelForCausalLM

    problem = quantization_problem(cfg.quantization)
    if problem:
        raise ValidationError(Problem("model.quantization", problem))
    dtype = pick_dtype(cfg.dtype)
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": cfg.trust_remote_code}
    attention = attention_implementation(dtype)
    if attention:
        kwargs["attn_implementation"] = attention
    if cfg.quantization != "none":
        from transformers import BitsAndBytesConfig

        compute = dtype if dtype != torch.float32 else torch.bfloat16
        if cfg.quantization == "4bit":
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=compute,
            )
        else:
            kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    model = AutoModelForCausalLM.from_pretrained(str(ref), **kwargs)
    model.config.use_cache = False  # the KV cache is for generation; in training it only costs memory
    if cfg.quantization != "none":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=cfg.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": cfg.offload_checkpoints},  # see below
        )
    elif cfg.gradient_checkpointing:
        # Offloading (model.offload_checkpoints) moves what autograd saves to host memory with saved-tensor
        # hooks (trainers.py); the reentrant checkpoint saves each layer's input through those hooks, the other
        # kind keeps it on the GPU for its recompute.
        reentrant = cfg.offload_checkpoints
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    return model


def lora_config(cfg: LoraConfig, fused: bool = True, adapter: str = "lora") -> Any:
    """The peft LoraConfig for `cfg`, of the kind `adapter` names (config.TrainingConfig.adapter): dora and rslora
    are LoRA with peft's `use_dora` / `use_rslora`; qlora is LoRA (the 4-bit base is load_model's).

    `fused`: plain linear layers get `FusedLoraLinear` (lora_linear.py), the same adapter
    computed with fewer passes over the activations. Not for quantized models: bitsandbytes'
    layers are `nn.Linear` subclasses too, and must get peft's own bnb LoRA layers."""
    from peft import LoraConfig as PeftLoraConfig

    targets: str | list[str] = "all-linear" if cfg.target_modules == ["all-linear"] else list(cfg.target_modules)
    peft_config = PeftLoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=targets,
        modules_to_save=list(cfg.modules_to_save) or None,
        task_type="CAUSAL_LM",
        bias="none",
        use_dora=adapter == "dora",
        use_rslora=adapter == "rslora",
        # The exact SVD: the same residual base on every start, so a resumed run's checkpoint fits it.
        init_lora_weights="pissa" if adapter == "pissa" else True,
    )
    if fused:
        from ftstudio.training.lora_linear import FusedLoraLinear

        peft_config._register_custom_module({torch.nn.Linear: FusedLoraLinear})
    return peft_config


@contextlib.contextmanager
def adapters_attached() -> Iterator[None]:
    """Around the call that wraps a model with its adapter (here, or inside a TRL trainer): peft names a module it
    cannot find in a ValueError, passed on with the fix."""
    try:
        with warnings.catch_warnings():
            # peft asks transformers for a property transformers now calls deprecated: noise in
            # training.log that the person reading it can do nothing about.
            warnings.filterwarnings(
                "ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning
            )
            yield
    except ValueError as e:
        if "target modules" not in str(e).lower() and "target_modules" not in str(e):
            raise
        raise ValidationError(
            Problem("lora.target_modules", f"{str(e).splitlines()[0]}; use all-linear or names from the model")
        ) from None


def trl_peft_config(config: Any, model: Any) -> Any:
    """The LoRA config a TRL trainer attaches itself, or None: a model that has an adapter already
    (model.start_from) trains that one, and one that trains its own weights (adapter full or freeze) gets none.
    Also quiets a deprecation TRL triggers at every reference pass: noise the reader of training.log can do
    nothing about."""
    from ftstudio.config import WHOLE_MODEL

    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    if hasattr(model, "peft_config") or config.adapter in WHOLE_MODEL:
        return None
    return lora_config(config.lora, config.model.quantization == "none", config.adapter)


def attach_lora(model: Any, cfg: LoraConfig, fused: bool = True, adapter: str = "lora") -> tuple[Any, AdapterReport]:
    """Wrap the model with LoRA adapters (see `lora_config`) and say exactly what got them."""
    from peft import get_peft_model

    with adapters_attached():
        peft_model = get_peft_model(model, lora_config(cfg, fused, adapter))
    return peft_model, adapter_report(peft_model)


PISSA_START = "pissa-start"
"""The PiSSA adapter as it was before the first step (in the task directory): what the final save converts from."""


def keep_pissa_start(peft_model: Any, task_dir: Path) -> Path:
    """Save the freshly initialised PiSSA adapter (rank 0, before training; a resumed start writes the same one):
    the final adapter is saved as its difference from this, a plain LoRA adapter on the original base."""
    folder = Path(task_dir) / PISSA_START
    config = peft_model.peft_config["default"]
    kind = config.init_lora_weights
    config.init_lora_weights = True  # saved as a plain adapter, as peft's conversion reads it
    try:
        peft_model.save_pretrained(folder, selected_adapters=["default"])
    finally:
        config.init_lora_weights = kind
    return folder


def continue_adapter(model: Any, folder: Path, fused: bool = True) -> tuple[Any, AdapterReport]:
    """The trained adapter in `folder` on the base, as this run's adapter to train further (model.start_from):
    its own rank, targets and kind, with the fused layer where `lora_config` would use it."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import PeftModel

    saved = PeftLoraConfig.from_pretrained(str(folder))
    if fused:
        from ftstudio.training.lora_linear import FusedLoraLinear

        saved._register_custom_module({torch.nn.Linear: FusedLoraLinear})
    with adapters_attached():
        peft_model = PeftModel.from_pretrained(model, str(folder), config=saved, is_trainable=True)
    return peft_model, adapter_report(peft_model)


def train_whole(model: Any, adapter: str, freeze_layers: int) -> AdapterReport:
    """adapter full: every weight trains; freeze: only the last `freeze_layers` transformer layers do (found as
    the model's list of `num_hidden_layers` blocks). What trains, said as for an adapter."""
    if adapter == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        trained = ["all"]
        layers = int(getattr(model.config, "num_hidden_layers", 0) or 0)
    else:
        blocks = _decoder_layers(model)
        if blocks is None:
            raise ValidationError(
                Problem(
                    "adapter", "adapter freeze needs a model whose transformer layers it can find; use full or lora"
                )
            )
        if freeze_layers > len(blocks):
            raise ValidationError(
                Problem(
                    "freeze_layers", f"is {freeze_layers}, but the model has {len(blocks)} layers; give at most that"
                )
            )
        for p in model.parameters():
            p.requires_grad_(False)
        for block in blocks[-freeze_layers:]:
            for p in block.parameters():
                p.requires_grad_(True)
        first = len(blocks) - freeze_layers
        trained = [f"layers {first}-{len(blocks) - 1}" if freeze_layers > 1 else f"layer {first}"]
        layers = freeze_layers
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return AdapterReport(target_modules=trained, adapted_layers=layers, trainable_params=trainable, total_params=total)


def _decoder_layers(model: Any) -> Any:
    """The model's transformer blocks: the ModuleList with one entry per hidden layer."""
    count = int(getattr(model.config, "num_hidden_layers", 0) or 0)
    for _name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and count and len(module) == count:
            return module
    return None


def adapter_report(peft_model: Any) -> AdapterReport:
    """What got an adapter, and how many parameters train."""
    from peft.tuners.lora import LoraLayer

    layers = [name for name, module in peft_model.named_modules() if isinstance(module, LoraLayer)]
    trainable, total = peft_model.get_nb_trainable_parameters()
    return AdapterReport(
        target_modules=sorted({name.rsplit(".", 1)[-1] for name in layers}),
        adapted_layers=len(layers),
        trainable_params=int(trainable),
        total_params=int(total),
    )
