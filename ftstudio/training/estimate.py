"""How much memory a run needs at its peak, before it starts: "needs about X GiB of GPU memory at batch B and
length L; this GPU has Y GiB free".

Counted from the model's shape (its config.json) and the settings, never by loading the model, so it answers in
milliseconds on the New fine-tune form and in `ftstudio submit --dry-run`. The peak of a training step is the
moment its backward pass begins: every layer's saved activations are still held, and the loss's gradients over
the whole vocabulary are being made. So the estimate is the sum of

- the weights, in the dtype (or 4-/8-bit) they train in;
- what trains: the adapter's (or every) parameter with its gradient and AdamW's two moments;
- the activations each decoder layer keeps for the backward, per token of the batch (with gradient
  checkpointing, only each layer's input, and one layer's in full while it is recomputed);
- the logits and the loss's work over the vocabulary, per token;
- the runtime: on the CPU, Python, torch and transformers (the trainer's resident memory before the model
  loads); on a GPU, the CUDA context and the allocator's slack.

On the CPU, loading the weights can be the peak instead (the file's pages and the model's tensors at once), so
the estimate is the larger of the two. Each constant below says where it comes from; `bench/bench_memory.py`
holds the estimate against the measured peak for several model sizes and batches, and docs/benchmarks.md has
the latest figures.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ftstudio.config import TrainingConfig
from ftstudio.footprint import cached_snapshot
from ftstudio.training.builtin import TINY_SHAPE, TINY_VOCAB_MAX, tiny_model_dir

GiB = 1 << 30
MiB = 1 << 20

CPU_RUNTIME_BYTES = 480 * MiB
"""Resident memory of a trainer process beside its model and its step: Python, torch, transformers, peft, the
tokenizer and the tokenized data (bench/bench_memory.py: what is left of the peak of the smallest runs)."""
CPU_HEAP_SLACK = 1.3
"""On the CPU the activations take ~30 % more resident memory than their tensors' bytes: glibc's heap keeps the
blocks freed in one step for the next (ftstudio.training.allocator), and they do not fit the next step's sizes
exactly. Fitted on bench/bench_memory.py's runs at length 256, checked on others at length 512."""
GPU_RUNTIME_BYTES = 600 * MiB
"""GPU memory outside torch's tensors: the CUDA context, cuBLAS's workspace. Read from `nvidia-smi` against
torch's count on a GPU by the GPU check (scripts/gpu-check)."""
GPU_SLACK = 1.10
"""torch's caching allocator holds blocks freed in one step for the next: what it reserves runs ~10 % over what
the tensors need."""
LOSS_BYTES_PER_VOCAB = {"cpu": 12, "gpu": 14}
"""Per token and vocabulary entry, when the backward pass begins: the log-softmax kept for the backward and the
gradient being made from it, in float32 (4 bytes each), and the logits' own gradient; on a GPU also the logits
in 16 bits beside their float32 copy."""
LORA_STATE_BYTES = 16
"""Per trainable adapter parameter: float32 weight, gradient, and AdamW's two moments."""
QUANTIZED_BYTES = {"4bit": 0.53, "8bit": 1.03}
"""Per quantized weight: nf4 is half a byte, with double-quantized block scales (~0.03); int8 a byte and its
row scales."""
ERROR = 0.15
"""How far off the estimate may be, either way (bench/bench_memory.py holds it to that): a run is refused only
when even the low end of its estimate is over what it can have."""
TWO_SEQUENCES = ("dpo", "orpo")
"""Methods whose every row trains as two sequences in one batch (chosen and rejected)."""


@dataclass(frozen=True)
class Shape:
    """The sizes of a decoder-only transformer that memory depends on (a Llama/Qwen2/Mistral-style config)."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool

    @classmethod
    def of(cls, config: Mapping[str, Any]) -> Shape | None:
        """From a config.json's fields; None for a shape this estimate does not know (a mixture of experts,
        an encoder-decoder, a config without the usual names)."""
        text = config.get("text_config")
        if isinstance(text, Mapping):  # a multimodal model's language part
            config = text
        if config.get("num_local_experts") or config.get("num_experts") or config.get("is_encoder_decoder"):
            return None
        try:
            hidden = int(config["hidden_size"])
            heads = int(config["num_attention_heads"])
            return cls(
                hidden=hidden,
                intermediate=int(config["intermediate_size"]),
                layers=int(config["num_hidden_layers"]),
                heads=heads,
                kv_heads=int(config.get("num_key_value_heads") or heads),
                head_dim=int(config.get("head_dim") or hidden // heads),
                vocab=int(config["vocab_size"]),
                tied=bool(config.get("tie_word_embeddings", False)),
            )
        except (KeyError, TypeError, ValueError, ZeroDivisionError):
            return None

    def linears(self) -> dict[str, tuple[int, int]]:
        """Each decoder layer's linear layers by name: (inputs, outputs)."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        h, i = self.hidden, self.intermediate
        return {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    @property
    def layer_params(self) -> int:
        return sum(a * b for a, b in self.linears().values()) + 2 * self.hidden

    @property
    def embedding_params(self) -> int:
        """The input embeddings and the output layer (once when they are tied)."""
        return self.vocab * self.hidden * (1 if self.tied else 2)

    @property
    def params(self) -> int:
        return self.layers * self.layer_params + self.embedding_params + self.hidden


@dataclass(frozen=True)
class Estimate:
    """The peak memory of one training process, and what makes it up."""

    bytes: int
    device: str  # "gpu" or "cpu"
    batch: int
    length: int
    parts: dict[str, int] = field(default_factory=dict)

    @property
    def gib(self) -> float:
        return self.bytes / GiB

    def line(self) -> str:
        where = "GPU memory" if self.device == "gpu" else "memory"
        return f"needs about {amount(self.bytes)} of {where} at batch {self.batch} and length {self.length}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "bytes": self.bytes,
            "gib": round(self.gib, 2),
            "device": self.device,
            "batch": self.batch,
            "length": self.length,
            "parts": dict(self.parts),
            "line": self.line(),
        }


def amount(n: float) -> str:
    """An amount of memory as people read it: 1.3 GiB, 909 MiB."""
    return f"{n / GiB:,.1f} GiB" if n >= GiB else f"{n / MiB:,.0f} MiB"


def read_shape(model_dir: Path | None) -> Shape | None:
    """The shape in a model folder's config.json; None when there is none to read."""
    if model_dir is None:
        return None
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return Shape.of(config) if isinstance(config, dict) else None


def shape_for(name: str, home: Path) -> Shape | None:
    """The shape of the model `name` names, from its config.json on this machine: builtin:tiny, a local folder,
    or a hub id in the local Hugging Face cache. None when it is not here to read (nothing is downloaded)."""
    name = name.strip()
    if name == "builtin:tiny":
        built = read_shape(tiny_model_dir(home))
        # Not built yet: its recipe, with the tokenizer's largest vocabulary.
        return built or Shape.of({**TINY_SHAPE, "vocab_size": TINY_VOCAB_MAX, "tie_word_embeddings": True})
    path = Path(name).expanduser()
    if path.is_dir():
        return read_shape(path)
    return read_shape(cached_snapshot(name))


def estimate(cfg: TrainingConfig, shape: Shape, *, on_gpu: bool, batch: int | None = None) -> Estimate:
    """The peak memory of one training process of `cfg` (at `batch` instead of optim.batch_size when given)."""
    device = "gpu" if on_gpu else "cpu"
    b = batch or cfg.optim.batch_size
    length = cfg.data.max_length
    if cfg.method == "grpo":
        # Completions are the batch: each one its prompt and up to max_completion_length new tokens.
        length += cfg.grpo.max_completion_length
    sequences = b * (2 if cfg.method in TWO_SEQUENCES else 1)
    tokens = sequences * length

    half = on_gpu and cfg.model.dtype != "float32"
    width = 2 if half else 4  # bytes per weight and activation element
    quantized = cfg.model.quantization if cfg.model.quantization in QUANTIZED_BYTES else None
    linear_params = shape.layers * sum(a * o for a, o in shape.linears().values())
    other_params = shape.params - linear_params
    # Quantized: peft's prepare_model_for_kbit_training keeps what is not (embeddings, norms) in float32.
    weights = int(linear_params * QUANTIZED_BYTES[quantized]) + other_params * 4 if quantized else shape.params * width

    eight_bit = cfg.optim.optimizer != "adamw"
    if cfg.adapter in ("full", "freeze"):
        last = min(shape.layers, max(0, cfg.freeze_layers))
        trained = shape.params if cfg.adapter == "full" else last * shape.layer_params
        # Its gradient and AdamW's two moments, in the weights' own dtype (the moments in a byte each when 8-bit).
        training = trained * (width + (2 if eight_bit else 2 * width))
    else:
        trained = _adapter_params(cfg, shape)
        training = trained * (LORA_STATE_BYTES - (6 if eight_bit else 0))

    per_layer = _layer_activation_elements(shape, cfg.lora.rank) * width
    if half:
        per_layer += 2 * shape.hidden * 4  # each RMSNorm keeps a float32 copy of its input
    if cfg.model.gradient_checkpointing:
        # Each layer's input, kept for its recompute (in host memory when offloaded), and one layer recomputed.
        kept = 0 if on_gpu and cfg.model.offload_checkpoints else shape.layers * shape.hidden * width
        activations = tokens * (kept + per_layer)
    else:
        activations = tokens * shape.layers * per_layer
    if on_gpu and cfg.model.kernels == "liger":
        # Liger's fused output layer and loss work through the tokens in chunks of about tokens x hidden / vocab,
        # so the whole batch's logits never exist: two float32 chunks' worth of them.
        loss = tokens * shape.hidden * 8
    else:
        loss = tokens * shape.vocab * LOSS_BYTES_PER_VOCAB[device]

    if on_gpu:
        step = int((weights + training + activations + loss) * GPU_SLACK)
        total = GPU_RUNTIME_BYTES + step
        parts = {"runtime": GPU_RUNTIME_BYTES, "weights": weights, "training": training}
    else:
        activations = int(activations * CPU_HEAP_SLACK)
        step = weights + training + activations + loss
        # Loading: the file's pages and the model's tensors at once, before training frees the first.
        total = CPU_RUNTIME_BYTES + max(step, 2 * weights)
        parts = {"runtime": CPU_RUNTIME_BYTES, "weights": weights, "training": training}
    parts |= {"activations": activations, "loss": loss}
    return Estimate(total, device, b, length, parts)


def _adapter_params(cfg: TrainingConfig, shape: Shape) -> int:
    targets = cfg.lora.target_modules
    linears = shape.linears()
    chosen = linears.values() if targets == ["all-linear"] else [linears[n] for n in targets if n in linears]
    per_layer = sum(cfg.lora.rank * (a + o) + (o if cfg.adapter == "dora" else 0) for a, o in chosen)
    saved = sum(shape.vocab * shape.hidden for n in cfg.lora.modules_to_save if n in ("lm_head", "embed_tokens"))
    return shape.layers * per_layer + saved


def _layer_activation_elements(shape: Shape, rank: int) -> int:
    """Elements one decoder layer keeps per token for its backward pass (sdpa attention, LoRA on its linears):
    each RMSNorm's input and output (4 x hidden), the query and the attention's output before and after its
    reshape (3 x hidden), the keys and values (2 x kv width), the MLP's gate, up, activation and their product
    (4 x intermediate), and each adapter's rank-wide middle."""
    kv = shape.kv_heads * shape.head_dim
    return 7 * shape.hidden + 2 * kv + 4 * shape.intermediate + 7 * rank


def largest_batch(cfg: TrainingConfig, shape: Shape, room: int, *, on_gpu: bool) -> int | None:
    """The largest batch below optim.batch_size whose estimate fits in `room` bytes and that divides the effective
    batch (batch_size x grad_accum), so a larger grad_accum keeps it the same; None when not even 1 fits."""
    effective = cfg.optim.batch_size * cfg.optim.grad_accum
    for b in range(cfg.optim.batch_size, 0, -1):
        if effective % b == 0 and estimate(cfg, shape, on_gpu=on_gpu, batch=b).bytes <= room:
            return b
    return None
