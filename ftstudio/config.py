"""The training configuration: what the CLI flags, the API's JSON and `spec.json` carry.

Typed dataclasses, one per concern, each field documented by the docstring
under it (read at run time by `describe_fields`, so the page, the CLI help and
the docs all show the same words). `TrainingConfig.from_dict` validates and
gathers every problem into one `ValidationError`, each naming the field path
(`optim.learning_rate`) and, where there is one, its CLI flag (`--lr`). Every
value has bounds, declared beside its field (`bounded(...)`, see bounds.py).
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import itertools
import math
import textwrap
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, get_args, get_origin

from ftstudio.bounds import Bounds, bounded, bounds_of, list_bounds, number, shown
from ftstudio.errors import Problem, ValidationError
from ftstudio.resources import parse_gpu_ids, parse_memory

NAMES = list_bounds(max_items=256, max_len=256)  # the bounds of every list-of-names setting


@dataclass
class ModelConfig:
    name: str = bounded("builtin:tiny", max_len=4096)
    """Base model: a Hugging Face hub id (org/name), a local directory, or `builtin:tiny`."""
    trust_remote_code: bool = False
    """Run the model repository's own Python code. Only for models you trust."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights dtype: `auto` picks bf16 where the GPU supports it, fp16 on other GPUs, fp32 on CPU."""
    quantization: Literal["none", "4bit", "8bit"] = "none"
    """QLoRA: load the base model in 4-bit or 8-bit (needs a CUDA GPU and bitsandbytes)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, about 30% slower."""
    compile: bool = False
    """torch.compile the model: faster steps after a one-off compile (a minute or so); pays off on long runs."""
    kernels: Literal["none", "liger"] = "none"
    """`liger`: Liger's fused Triton kernels (RMSNorm, RoPE, SwiGLU, and the output layer fused with the loss, so
    the logits are never held whole): less GPU memory and faster steps. Needs a CUDA GPU and liger-kernel."""
    offload_checkpoints: bool = False
    """With gradient_checkpointing: keep the layer inputs it saves in host memory instead of on the GPU, for
    longer sequences or larger batches at some speed. Needs a CUDA GPU."""
    start_from: str = bounded("", max_len=4096)
    """Go on from a trained adapter: a completed task's id (or its adapter folder), e.g. an SFT run before DPO
    or GRPO. Its adapter is this run's starting point and trains further (its rank and kind, not the `lora`
    settings); for dpo and kto the reference is that adapter as the run starts. Empty: a new adapter."""


@dataclass
class DataConfig:
    path: str = bounded("builtin:sample", max_len=4096)
    """Training data: `builtin:sample`, an uploaded dataset name, or a .json/.jsonl/.csv/.parquet file or dataset dir."""
    format: Literal["auto", "alpaca", "sharegpt", "messages", "text", "preference", "unpaired"] = "auto"
    """Row shape; `auto` detects it from the columns. `preference`: prompt, chosen and rejected (dpo, orpo, kto);
    `unpaired`: prompt, completion and a true/false label (kto)."""
    validation: str = bounded("0.1", max_len=4096)
    """Validation split: a fraction of the data (e.g. 0.1), a file path, a split of a saved DatasetDict
    (e.g. validation), or 0 for none."""
    max_length: int = bounded(512, 8, 1_048_576, unit="tokens")
    """Longest sequence in tokens; longer samples are truncated."""
    packing: bool = False
    """Pack several samples into one sequence (no cross-sample attention where the model supports it)."""
    group_by_length: bool = True
    """Batch samples of similar length together to waste less compute on padding."""


@dataclass
class LoraConfig:
    rank: int = bounded(16, 1, 4096)
    """LoRA rank r: the size of the low-rank update. 8-64 is usual."""
    alpha: int = bounded(32, 1, 65_536)
    """LoRA alpha: the update is scaled by alpha / rank."""
    dropout: float = bounded(0.0, 0, 1, max_excluded=True)
    """Dropout on the LoRA input. 0 (as in PEFT and LLaMA-Factory) is fastest; 0.05-0.1 regularises small datasets."""
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"], metadata=NAMES)
    """Modules that get adapters: `all-linear`, or module names such as q_proj, v_proj."""
    modules_to_save: list[str] = field(default_factory=list, metadata=NAMES)
    """Modules trained in full and saved with the adapter (e.g. lm_head, embed_tokens)."""
    plus_ratio: float = bounded(0.0, 0, 1000)
    """LoRA+: the adapter's B matrices learn this many times faster than its A matrices (16 in the LoRA+ paper;
    often with a learning rate about half the usual). 0: off, one learning rate for both."""


@dataclass
class OptimConfig:
    epochs: float = bounded(3.0, 0, 10_000)
    """Passes over the training data."""
    max_steps: int = bounded(-1, -1, 1_000_000_000)
    """Stop after this many optimizer steps (-1: run all epochs)."""
    learning_rate: float = bounded(2e-4, 0, 1, min_excluded=True, max_excluded=True)
    """Peak learning rate."""
    batch_size: int = bounded(4, 1, 65_536)
    """Samples per device per step."""
    grad_accum: int = bounded(4, 1, 65_536)
    """Gradient accumulation steps; effective batch = batch_size x grad_accum x processes x nodes."""
    warmup_ratio: float = bounded(0.03, 0, 1, max_excluded=True)
    """Fraction of steps spent warming the learning rate up."""
    weight_decay: float = bounded(0.0, 0, 10)
    """AdamW weight decay."""
    scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    """Learning-rate schedule after warmup."""
    max_grad_norm: float = bounded(1.0, 0, 1000)
    """Gradient clipping norm (0 disables)."""
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit"] = "adamw"
    """`adamw`: torch's AdamW. `adamw_8bit`: its two moments kept in 8 bits (bitsandbytes), a quarter of the memory,
    which matters when many weights train (adapter full or freeze); `paged_adamw_8bit`: the same, its state paged
    to host memory when the GPU runs short. Both need a CUDA GPU and bitsandbytes."""
    auto_batch: bool = False
    """Out of memory: split every batch into two halves trained one after the other (as gradient accumulation
    does), again while it does not fit, and go on from the same step. The effective batch, the data order and the
    loss curve stay the same. Not for kto and grpo, whose losses look across the whole batch."""
    seed: int = bounded(42, 0, 2**32 - 1)
    """Random seed for initialisation, data order and dropout."""
    divergence_factor: float = bounded(4.0, 0, 1000)
    """Stop with an error when the smoothed loss stays above this multiple of its best value (0 disables)."""
    divergence_patience: int = bounded(20, 1, 1_000_000_000)
    """Steps the smoothed loss may stay above divergence_factor x best before training stops."""


@dataclass
class PreferenceConfig:
    beta: float = bounded(0.1, 0, 100, min_excluded=True)
    """How far training may move from the reference model (dpo, kto), or the weight of the odds-ratio term (orpo),
    or SimPO's reward scale. 0.1 is usual; with loss simpo it is 2.0 unless set (SimPO works with 2 to 10)."""
    loss: Literal["sigmoid", "ipo", "simpo"] = "sigmoid"
    """The dpo variant: `sigmoid` is DPO, `ipo` is IPO, `simpo` is SimPO (no reference model; length-normalised)."""
    simpo_gamma: float = bounded(0.5, 0, 100)
    """SimPO's target reward margin (loss simpo only)."""
    desirable_weight: float = bounded(1.0, 0, 100, min_excluded=True)
    """kto: the weight of good completions' loss; raise it when good ones are fewer."""
    undesirable_weight: float = bounded(1.0, 0, 100, min_excluded=True)
    """kto: the weight of bad completions' loss; raise it when bad ones are fewer."""
    precompute_reference: Literal["auto", "on", "off"] = "auto"
    """dpo (sigmoid, ipo) and kto: score the data with the reference model once, before the first step, instead of
    at every step, so each step does one forward pass less; every start (a resume too) makes that pass again.
    `auto`: when the run trains on at least one epoch of the data, where it is faster."""


@dataclass
class GrpoConfig:
    generations: int = bounded(4, 2, 256)
    """Completions sampled per prompt; each is scored against the others of its group. optim.batch_size x
    optim.grad_accum must be a multiple of it."""
    max_completion_length: int = bounded(64, 1, 65_536, unit="tokens")
    """Longest completion sampled, in tokens."""
    temperature: float = bounded(1.0, 0, 10, min_excluded=True)
    """Sampling temperature of the completions: lower samples more alike, and leaves less to learn from."""
    beta: float = bounded(0.0, 0, 100)
    """Weight of the KL penalty against the model as it started (0: none, and no reference pass: faster)."""


@dataclass
class CheckpointConfig:
    every_steps: int = bounded(100, 1, 1_000_000_000)
    """Save a resumable checkpoint every N steps."""
    keep: int = bounded(2, 2, 1000, why="so a half-written checkpoint never leaves none")
    """Checkpoints kept on disk (at least 2)."""
    resume_from: str = bounded("", max_len=4096)
    """Resume from a checkpoint path, `auto` for the newest complete one, or empty for a fresh start."""


@dataclass
class LoggingConfig:
    every_steps: int = bounded(1, 1, 1_000_000_000)
    """Write a progress event every N steps."""
    eval_every_steps: int = bounded(0, 0, 1_000_000_000)
    """Evaluate every N steps (0: once per epoch)."""
    eval_on_start: bool = True
    """Evaluate once before the first step, so the eval loss before training is on record."""
    report_to: list[str] = field(default_factory=list, metadata=NAMES)
    """Also report to: tensorboard, wandb, mlflow."""


@dataclass
class EvaluationConfig:
    prompts: str = bounded("", max_len=4096)
    """Held-out prompts the fine-tune and the base model answer when training ends, shown side by side: a file
    or an uploaded dataset in any data shape (empty: none). A row's last assistant turn is the expected answer."""
    max_prompts: int = bounded(20, 1, 200)
    """Answer at most this many prompts: the first ones in the file."""
    max_new_tokens: int = bounded(128, 1, 4096, unit="tokens")
    """Longest answer, in tokens (greedy decoding)."""
    at_checkpoints: bool = False
    """Also answer them after every checkpoint, to watch the answers change; training waits while they are written."""


@dataclass
class ResourcesConfig:
    processes: int = bounded(1, 1, 64)
    """Training processes (per node): above 1 runs torchrun, one process per GPU (or CPU processes on gloo)."""
    nodes: int = bounded(1, 1, 64)
    """Machines the task spreads over, each running `processes` of them (Slurm executor only: srun torchrun)."""
    gpus: int = bounded(-1, -1, 64)
    """GPUs to lease: -1 for one per process where the machine has GPUs (none otherwise), 0 for CPU only."""
    gpu_ids: str = bounded("", max_len=256)
    """Exactly these GPUs, e.g. `0,2`, numbered as nvidia-smi shows them; empty to take any free ones."""
    share_gpu: bool = False
    """Let this task use GPUs that other sharing tasks hold (otherwise a GPU runs one task at a time)."""
    memory: str = bounded("", max_len=32)
    """Memory limit of the task's processes, e.g. 8G or 512M; empty for none. Past it the task fails."""
    priority: int = bounded(0, -1000, 1000)
    """Queue priority: higher starts first; equal priorities start in submission order."""


@dataclass
class ResumeConfig:
    auto: bool = True
    """After a crash, reboot or shutdown, resume by itself from the newest complete checkpoint."""
    max_restarts: int = bounded(3, 0, 1000)
    """Automatic restarts after failures of the run itself (a crashed or OOM-killed trainer; a retry by hand
    counts from none again); past them the task fails. What the machine does (reboots, shutdowns,
    preemptions) is never counted."""


@dataclass
class TrainingConfig:
    adapter: Literal["lora", "qlora", "dora", "rslora", "pissa", "full", "freeze"] = "lora"
    """What trains beside the frozen base: `lora` (low-rank adapters, the `lora` settings); `qlora`: LoRA on the
    base loaded in 4-bit (a CUDA GPU and bitsandbytes; model.quantization 4bit unless set); `dora`: DoRA,
    weight-decomposed LoRA, often better at low ranks, slower per step; `rslora`: rank-stabilised LoRA, scaled by
    alpha / sqrt(rank), for high ranks; `pissa`: LoRA started from the weights' principal singular vectors (PiSSA),
    which learns faster early on, saved converted to a plain LoRA adapter of twice the rank on the original
    base. Each saves a peft adapter that chat, compare and export take as they are. `full`: every weight trains
    (memory for the weights, their gradients and AdamW's two moments: about 16 bytes per parameter); `freeze`:
    only the last `freeze_layers` transformer layers train, in full. Both save the whole model."""
    freeze_layers: int = bounded(2, 1, 10_000)
    """adapter freeze: how many of the last transformer layers train (the rest, and the embeddings, stay)."""
    method: Literal["sft", "pretrain", "dpo", "orpo", "kto", "grpo"] = "sft"
    """`sft`: supervised fine-tuning on instructions or conversations, the loss on the answers only. `pretrain`:
    continued pre-training on raw text (a `text` column, or .txt files), no chat template, the loss on every
    token, packing on unless set off. `dpo`: preference tuning on chosen/rejected pairs against the model as it
    started (the variant is preference.loss: DPO, IPO or SimPO). `orpo`: preference tuning and SFT in one loss, no
    reference model. `kto`: preference tuning from completions labelled good or bad, paired or not. `grpo`:
    reinforcement learning on prompts, each completion scored by the `rewards` (builtin:math unless told)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    preference: PreferenceConfig = field(default_factory=PreferenceConfig)
    grpo: GrpoConfig = field(default_factory=GrpoConfig)
    rewards: list[str] = field(default_factory=list, metadata=list_bounds(max_items=32, max_len=1024))
    """grpo: reward functions scoring each completion, `NAME[:ARG]`: exact, numeric (both against the data's
    `answer`, or an example's last assistant turn), regex:PATTERN, length:TOKENS, json. `numeric` unless set."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    resume: ResumeConfig = field(default_factory=ResumeConfig)
    preset: str = bounded("", max_len=256)
    """Preset the config started from (its values are recorded in the fields above)."""

    def __post_init__(self) -> None:
        problems = _check(self)
        if problems:
            raise ValidationError(problems)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainingConfig:
        """Build from nested JSON (`{"optim": {"learning_rate": 1e-4}}`), on top of the preset if one is named."""
        if not isinstance(data, dict):
            raise ValidationError("config: expected a JSON object")
        problems: list[Problem] = []
        base: dict[str, Any] = {}
        preset = data.get("preset") or ""
        if not isinstance(preset, str):
            # Looked up by name below: an object here must be a refusal, not a TypeError.
            problems.append(Problem("preset (--preset)", f"must be the name of a preset: {', '.join(PRESETS)}"))
            data, preset = {k: v for k, v in data.items() if k != "preset"}, ""
        if preset:
            if preset not in PRESETS:
                problems.append(
                    Problem("preset (--preset)", f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
                )
            else:
                base = _merge({}, PRESETS[preset])
        merged = _method_defaults(_merge(base, data))
        kwargs: dict[str, Any] = {}
        hints = typing.get_type_hints(cls)
        for key, value in merged.items():
            f = _FIELDS.get(key)
            if f is None:
                problems.append(Problem(key, f"unknown setting; known sections: {', '.join(_FIELDS)}"))
                continue
            hint = hints[key]
            if dataclasses.is_dataclass(hint):
                kwargs[key] = _build_section(key, hint, value, problems)
            else:
                kwargs[key] = _coerce(key, hint, value, problems)
        try:
            cfg = cls(**kwargs)
        except ValidationError as e:
            raise ValidationError(problems + e.problems) from None
        if problems:
            raise ValidationError(problems)
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_FIELDS = {f.name: f for f in dataclasses.fields(TrainingConfig)}


def _method_defaults(merged: dict[str, Any]) -> dict[str, Any]:
    """What a method changes in the defaults, where the config leaves a setting out: continued pre-training reads
    raw text (`data.format` auto means text there) and packs it (short documents fill whole rows); the preference
    methods train on `builtin:preferences`, and dpo and orpo read pairs; SimPO starts from its own beta; grpo
    trains on `builtin:math` with the `numeric` reward and no validation split."""
    if merged.get("adapter") == "qlora" and isinstance(merged.get("model", {}), dict):
        # QLoRA is LoRA on a 4-bit base: the adapter choice says so, unless the quantization is set outright.
        model = dict(merged.get("model") or {})
        model.setdefault("quantization", "4bit")
        merged = {**merged, "model": model}
    method = merged.get("method")
    preference = merged.get("preference")
    if method == "dpo" and isinstance(preference, dict) and preference.get("loss") == "simpo":
        # SimPO's rewards are length-normalised log-probabilities, much smaller than DPO's: its beta is larger.
        merged = {**merged, "preference": {"beta": SIMPO_BETA, **preference}}
    if method == "grpo" and "rewards" not in merged:
        merged = {**merged, "rewards": list(GRPO_REWARDS)}
    if method not in ("pretrain", "grpo", *PREFERENCE_METHODS) or not isinstance(merged.get("data", {}), dict):
        return merged
    data = dict(merged.get("data") or {})
    if method in PREFERENCE_METHODS:
        data.setdefault("path", PREFERENCE_DATASET)  # the demo's data, as builtin:sample is SFT's
    if method == "grpo":
        data.setdefault("path", GRPO_DATASET)
        # Evaluating a grpo run means sampling and scoring completions for every held-out prompt: asked for, not
        # a default.
        data.setdefault("validation", "0")
    if data.get("format", "auto") == "auto" and len(METHOD_FORMATS[method]) == 1:
        # The one shape the method takes, so a row missing a field is named as such, not taken for another shape.
        data["format"] = METHOD_FORMATS[method][0]
    if method == "pretrain":
        data.setdefault("packing", True)
    return {**merged, "data": data}


def _bounds_table() -> dict[str, Bounds]:
    """`section.field` -> its bounds, read once from the fields' metadata."""
    table: dict[str, Bounds] = {}
    for section in dataclasses.fields(TrainingConfig):
        cls = typing.get_type_hints(TrainingConfig)[section.name]
        inner = dataclasses.fields(cls) if dataclasses.is_dataclass(cls) else ()
        for f in inner:
            if (b := bounds_of(f)) is not None:
                table[f"{section.name}.{f.name}"] = b
        if not inner and (b := bounds_of(section)) is not None:
            table[section.name] = b
    return table


BOUNDS: dict[str, Bounds] = _bounds_table()

# Flags of the fields people set most often; every field is also settable as --set section.field=value.
CLI_FLAGS: dict[str, str] = {
    "model.name": "--model",
    "data.path": "--dataset",
    "optim.epochs": "--epochs",
    "optim.learning_rate": "--lr",
    "optim.max_steps": "--max-steps",
    "optim.batch_size": "--batch-size",
    "lora.rank": "--lora-rank",
    "checkpoint.every_steps": "--checkpoint-every",
    "evaluation.prompts": "--eval-prompts",
    "resources.processes": "--processes",
    "resources.nodes": "--nodes",
    "resources.gpus": "--gpus",
    "resources.gpu_ids": "--gpu-ids",
    "resources.share_gpu": "--share-gpu",
    "resources.memory": "--memory",
    "resources.priority": "--priority",
    "resume.auto": "--no-auto-resume",
    "resume.max_restarts": "--max-restarts",
    "preset": "--preset",
    "method": "--method",
    "preference.beta": "--beta",
    "preference.loss": "--loss",
    "rewards": "--reward",
    "adapter": "--adapter",
    "model.start_from": "--start-from",
    "model.kernels": "--kernels",
    "optim.optimizer": "--optimizer",
    "optim.auto_batch": "--auto-batch",
}

# The data shapes each method trains on (the single table: the config, the preflight and the page read it).
METHOD_FORMATS: dict[str, tuple[str, ...]] = {
    "sft": ("alpaca", "sharegpt", "messages", "text"),
    "pretrain": ("text",),
    "dpo": ("preference",),
    "orpo": ("preference",),
    "kto": ("unpaired", "preference"),
    "grpo": ("prompts", "alpaca", "sharegpt", "messages"),
}
PREFERENCE_METHODS = ("dpo", "orpo", "kto")
WHOLE_MODEL = ("full", "freeze")
"""The adapter choices that train the model's own weights and save the whole model, not a peft adapter."""
TRL_METHODS = (*PREFERENCE_METHODS, "grpo")
# Settings only some methods read (every other setting applies to all): the page shows them for those alone.
METHOD_FIELDS: dict[str, tuple[str, ...]] = {
    "data.packing": ("sft", "pretrain"),
    "preference.beta": PREFERENCE_METHODS,
    "preference.loss": ("dpo",),
    "preference.simpo_gamma": ("dpo",),
    "preference.desirable_weight": ("kto",),
    "preference.undesirable_weight": ("kto",),
    "preference.precompute_reference": ("dpo", "kto"),
    "grpo.generations": ("grpo",),
    "grpo.max_completion_length": ("grpo",),
    "grpo.temperature": ("grpo",),
    "grpo.beta": ("grpo",),
    "rewards": ("grpo",),
}
SIMPO_BETA = 2.0
PREFERENCE_DATASET = "builtin:preferences"
GRPO_DATASET = "builtin:math"
GRPO_REWARDS = ["numeric"]
_SHAPE_WORDS = {
    "alpaca": "instructions",
    "sharegpt": "conversations",
    "messages": "conversations",
    "text": "raw text",
    "preference": "preference pairs (prompt/chosen/rejected)",
    "unpaired": "labelled completions (prompt/completion/label)",
    "prompts": "prompts (prompt, and an optional answer)",
}


def custom_reward(spec: str) -> tuple[str, str] | None:
    """(PATH, FUNC) of a custom reward, `python:PATH:FUNC`; None for a built-in one."""
    kind, _, rest = spec.partition(":")
    if kind.strip() != "python":
        return None
    path, _, func = rest.rpartition(":")
    return path, func


def _either(words: list[str]) -> str:
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} or {words[-1]}"


def format_problem(method: str, shape: str) -> str | None:
    """Why `method` cannot train on data of `shape` (and what would), or None when it can."""
    if shape in METHOD_FORMATS[method]:
        return None
    takes = _either(list(dict.fromkeys(_SHAPE_WORDS[f] for f in METHOD_FORMATS[method])))
    fits = [m for m, shapes in METHOD_FORMATS.items() if shape in shapes and m != "pretrain"]
    use = f"; use method {_either(fits)} for it" if fits else ""
    return f"method {method} trains on {takes}, but this data holds {_SHAPE_WORDS.get(shape, shape)}{use}"


PRESETS: dict[str, dict[str, Any]] = {
    "cpu-demo": {
        "model": {"name": "builtin:tiny", "dtype": "float32"},
        "data": {"max_length": 256},
        "lora": {"rank": 8, "alpha": 16},
        "optim": {"epochs": 4.0, "learning_rate": 3e-3, "batch_size": 8, "grad_accum": 1},
        "checkpoint": {"every_steps": 20},
    },
    "single-gpu-24gb": {
        "model": {"dtype": "auto", "gradient_checkpointing": True},
        "data": {"max_length": 2048, "group_by_length": True},
        "lora": {"rank": 16, "alpha": 32},
        "optim": {"batch_size": 4, "grad_accum": 4, "learning_rate": 2e-4},
    },
    "low-memory": {
        "model": {"quantization": "4bit", "gradient_checkpointing": True},
        "data": {"max_length": 1024},
        "lora": {"rank": 8, "alpha": 16},
        "optim": {"batch_size": 1, "grad_accum": 16},
    },
}


def label(path: str) -> str:
    """`optim.learning_rate (--lr)`: how errors name a field."""
    flag = CLI_FLAGS.get(path)
    return f"{path} ({flag})" if flag else path


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _build_section(name: str, cls: Any, value: Any, problems: list[Problem]) -> Any:
    if not isinstance(value, dict):
        problems.append(Problem(name, "expected an object of settings"))
        return cls()
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, v in value.items():
        path = f"{name}.{key}"
        if key not in known:
            problems.append(Problem(path, f"unknown setting; {name} has: {', '.join(sorted(known))}"))
            continue
        kwargs[key] = _coerce(path, hints[key], v, problems)
    return cls(**kwargs)


def _coerce(path: str, hint: Any, value: Any, problems: list[Problem]) -> Any:
    """Accept JSON values and CLI strings; a wrong type is a problem, not a crash."""
    origin = get_origin(hint)
    try:
        # JSON's NaN / Infinity literals (Python's json reads them) and 1e999 are never a setting.
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError("must be a finite number")
        if origin is Literal:
            choices = get_args(hint)
            if value not in choices:
                raise ValueError(f"must be one of {', '.join(map(str, choices))}")
            return value
        if origin in (list, typing.List):  # noqa: UP006
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ValueError("must be a list of names")
            return value
        if hint is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
                return value.lower() in ("true", "1", "yes")
            raise ValueError("must be true or false")
        if hint is int:
            if isinstance(value, bool) or not isinstance(value, int | str | float):
                raise ValueError("must be a whole number")
            if isinstance(value, float) and not value.is_integer():
                raise ValueError("must be a whole number")
            if isinstance(value, str):
                value = value.strip()
                digits = value.lstrip("+-")
                if digits.isascii() and digits.isdigit() and len(digits) > 30:
                    # int() would refuse past 4,300 digits with a message about sys.set_int_max_str_digits.
                    raise ValueError(_too_large(path))
                try:
                    return int(value)
                except ValueError:
                    raise ValueError("must be a whole number") from None
            return int(value)  # in bounds or not: _check names the limit
        if hint is float:
            if isinstance(value, bool) or not isinstance(value, int | float | str):
                raise ValueError("must be a number")
            try:
                number = float(value)
            except OverflowError:  # an int past 1e308
                raise ValueError(_too_large(path)) from None
            if not math.isfinite(number):  # the CLI's "nan", "inf", "1e999"
                raise ValueError("must be a finite number")
            return number
        if hint is str:
            if isinstance(value, int | float) and not isinstance(value, bool):
                return str(value)
            if not isinstance(value, str):
                raise ValueError("must be text")
            return value
    except ValueError as e:
        msg = str(e)
        if msg.startswith(("invalid literal", "could not convert")):
            msg = "must be a number"
        problems.append(Problem(label(path), f"{msg} (got {shown(value)})"))
        return _default_for(path)
    raise TypeError(f"unsupported config type {hint!r} at {path}")  # a bug in this module


def _too_large(path: str) -> str:
    limit = BOUNDS[path].max if path in BOUNDS else None
    return f"must be at most {number(limit)}" if limit is not None else "is far too large"


def _default_for(path: str) -> Any:
    section, _, name = path.partition(".")
    cls = typing.get_type_hints(TrainingConfig)[section]
    if not name:
        if isinstance(cls, type) and dataclasses.is_dataclass(cls):
            return cls()
        top = _FIELDS[section]
        return top.default_factory() if top.default_factory is not dataclasses.MISSING else top.default
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _check(cfg: TrainingConfig) -> list[Problem]:
    """Cross-field and range checks, gathered so the user fixes everything in one go.

    The checks with advice of their own run first; then every field is held to its
    declared bounds (`BOUNDS`), unless it already has a problem.
    """
    p: list[Problem] = []
    reported: set[str] = set()

    def bad(path: str, msg: str) -> None:
        if path not in reported:
            reported.add(path)
            p.append(Problem(label(path), msg))

    values = {path: _value_at(cfg, path) for path in BOUNDS}
    for path, value in values.items():
        if isinstance(value, float) and not math.isfinite(value):  # built in Python, not from_dict
            bad(path, f"must be a finite number (got {shown(value)})")
    if not cfg.model.name.strip():
        bad("model.name", "is empty; give a hub id (org/name), a local directory or builtin:tiny")
    if cfg.data.format != "auto" and (problem := format_problem(cfg.method, cfg.data.format)):
        bad("data.format", f"is {cfg.data.format}: {problem}")
    if cfg.adapter == "pissa":
        # PiSSA moves the principal part of each weight into the adapter: with the adapter switched off the model is
        # the residual, not the model the run started from, which is what a reference and "base" answers need.
        why = (
            "adapter pissa moves part of each base weight into the adapter, so the model with the adapter off is not "
            "the starting model"
        )
        if cfg.model.quantization != "none":
            bad("adapter", "pissa needs the base in full precision (model.quantization none); use qlora for 4-bit")
        elif (cfg.method == "dpo" and cfg.preference.loss != "simpo") or cfg.method == "kto":
            bad(
                "adapter",
                f"{why}, which {cfg.method}'s reference must be; use lora, or method orpo or dpo with loss simpo",
            )
        elif cfg.method == "grpo" and cfg.grpo.beta > 0:
            bad("adapter", f"{why}, which grpo's KL penalty (grpo.beta) measures against; set it to 0 or use lora")
        elif cfg.evaluation.prompts.strip():
            bad(
                "adapter",
                f"{why}, which the held-out prompts' base answers come from; use lora, or no held-out prompts",
            )
        elif cfg.model.start_from.strip():
            bad("adapter", "a run that goes on from an adapter (model.start_from) keeps that adapter's own kind")
    if cfg.adapter in WHOLE_MODEL:
        if cfg.model.quantization != "none":
            bad("model.quantization", f"a 4- or 8-bit base cannot train in full (adapter {cfg.adapter}); use qlora")
        elif cfg.model.start_from.strip():
            bad("model.start_from", f"adapter {cfg.adapter} trains the model itself, not an adapter to go on from")
    if cfg.adapter == "qlora" and cfg.model.quantization == "none":
        bad(
            "model.quantization", "is none, but adapter qlora trains on a 4-bit base; set 4bit or 8bit, or adapter lora"
        )
    if cfg.method in PREFERENCE_METHODS and cfg.data.packing:
        bad("data.packing", f"method {cfg.method} compares whole replies, which packing would cut apart; set it off")
    if cfg.method == "grpo":
        if cfg.data.packing:
            bad("data.packing", "method grpo samples whole completions; set it off")
        if not cfg.rewards:
            bad(
                "rewards",
                "method grpo needs at least one reward (--reward NAME[:ARG]): exact, numeric, "
                "regex:PATTERN, length:TOKENS or json",
            )
        group = cfg.optim.batch_size * cfg.optim.grad_accum
        if group % cfg.grpo.generations:
            bad(
                "optim.batch_size",
                f"method grpo scores completions in groups of grpo.generations ({cfg.grpo.generations}): "
                f"batch_size x grad_accum ({group}) must be a multiple of it",
            )
    elif cfg.rewards:
        bad("rewards", f"only method grpo uses rewards, and this is method {cfg.method}; set method grpo or drop them")
    if cfg.optim.auto_batch and cfg.method in ("kto", "grpo"):
        bad(
            "optim.auto_batch",
            f"method {cfg.method} computes its loss across the whole batch, which splitting it would change; "
            "set it off and lower optim.batch_size (raising grad_accum) if memory is short",
        )
    if cfg.optim.auto_batch and cfg.resources.processes * cfg.resources.nodes > 1:
        bad(
            "optim.auto_batch",
            "splits batches in one training process only; with several, set it off and lower optim.batch_size",
        )
    if cfg.model.offload_checkpoints and not cfg.model.gradient_checkpointing:
        bad(
            "model.offload_checkpoints", "moves what gradient checkpointing saves; turn on model.gradient_checkpointing"
        )
    if cfg.method == "kto" and cfg.optim.batch_size < 2:
        bad(
            "optim.batch_size",
            "method kto needs at least 2 per batch: it measures drift from the reference model on the batch's "
            "completions paired with other prompts",
        )
    if not cfg.data.path.strip():
        bad("data.path", "is empty; give builtin:sample, an uploaded dataset or a file path")
    fraction = validation_fraction(cfg.data.validation)
    if fraction is not None and not 0 <= fraction < 1:
        bad("data.validation", f"a fraction must be in [0, 1), e.g. 0.1 (got {shown(cfg.data.validation)})")
    if not cfg.lora.target_modules:
        bad("lora.target_modules", "needs at least one module, or all-linear")
    o = cfg.optim
    if not o.learning_rate > 0:
        bad("optim.learning_rate", f"must be positive (got {o.learning_rate}); 1e-4 to 3e-4 is usual for LoRA")
    elif o.learning_rate >= 1:
        bad("optim.learning_rate", f"{o.learning_rate} is far too large; 1e-4 to 3e-4 is usual for LoRA")
    if o.epochs <= 0 and o.max_steps <= 0:
        bad("optim.epochs", f"must be positive, or set max_steps (got {o.epochs})")
    if o.max_steps == 0 or o.max_steps < -1:
        bad("optim.max_steps", f"must be a positive number of steps, or -1 for all epochs (got {shown(o.max_steps)})")
    if o.divergence_factor != 0 and o.divergence_factor <= 1:
        bad("optim.divergence_factor", f"must be above 1, or 0 to disable (got {o.divergence_factor})")
    unknown_reports = set(cfg.logging.report_to) - {"tensorboard", "wandb", "mlflow"}
    if unknown_reports and len(cfg.logging.report_to) <= 256:
        bad(
            "logging.report_to",
            f"unknown reporter(s) {shown(', '.join(sorted(unknown_reports)))}; use tensorboard, wandb or mlflow",
        )
    r = cfg.resources
    try:
        parse_memory(r.memory)
    except ValueError as e:
        bad("resources.memory", str(e))
    try:
        ids = parse_gpu_ids(r.gpu_ids)
    except ValueError as e:
        bad("resources.gpu_ids", str(e))
    else:
        if ids and r.gpus not in (-1, len(ids)):
            bad("resources.gpus", f"asks for {r.gpus} GPU(s) but gpu_ids names {len(ids)}; set one of the two")
    for path, value in values.items():
        problem = BOUNDS[path].problem(value)
        if problem:
            bad(path, problem)
    return p


def _value_at(cfg: TrainingConfig, path: str) -> Any:
    section, _, name = path.partition(".")
    value = getattr(cfg, section)
    return getattr(value, name) if name else value


def validation_fraction(value: str) -> float | None:
    """`data.validation` as a fraction, or None when it names a file."""
    try:
        return float(value.strip() or "0")
    except ValueError:
        return None


@dataclass(frozen=True)
class FieldInfo:
    path: str
    type: str
    default: Any
    help: str
    choices: tuple[Any, ...] = ()
    flag: str = ""
    min: int | float | None = None
    max: int | float | None = None
    range: str = ""  # the bounds in words: "1 to 4,096", "up to 4,096 characters"
    max_length: int | None = None  # text fields and each entry of a list
    methods: tuple[str, ...] = ()  # the methods that read it; empty: all of them


def _docstrings(cls: type) -> dict[str, str]:
    """The string literal under each field of a dataclass, read from its source."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for prev, node in itertools.pairwise(body):
        if (
            isinstance(prev, ast.AnnAssign)
            and isinstance(prev.target, ast.Name)
            and isinstance(node, ast.Expr)
            and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str)
        ):
            docs[prev.target.id] = " ".join(node.value.value.split())
    return docs


def describe_fields() -> list[FieldInfo]:
    """Every leaf setting with its type, default and help, for the page, the CLI and the docs."""
    out: list[FieldInfo] = []
    default = TrainingConfig()
    for section in dataclasses.fields(TrainingConfig):
        hint = typing.get_type_hints(TrainingConfig)[section.name]
        if dataclasses.is_dataclass(hint):
            docs = _docstrings(hint)  # type: ignore[arg-type]
            hints = typing.get_type_hints(hint)
            for f in dataclasses.fields(hint):
                path = f"{section.name}.{f.name}"
                out.append(
                    _info(
                        path,
                        hints[f.name],
                        getattr(getattr(default, section.name), f.name),
                        docs.get(f.name, ""),
                    )
                )
        else:
            out.append(
                _info(
                    section.name,
                    hint,
                    getattr(default, section.name),
                    _docstrings(TrainingConfig).get(section.name, ""),
                )
            )
    return out


def _info(path: str, hint: Any, default: Any, text: str) -> FieldInfo:
    flag = CLI_FLAGS.get(path, "")
    methods = METHOD_FIELDS.get(path, ())
    if get_origin(hint) is Literal:
        return FieldInfo(path, "choice", default, text, get_args(hint), flag, methods=methods)
    b = BOUNDS.get(path, Bounds())
    listed = get_origin(hint) in (list, typing.List)  # noqa: UP006
    name = "list" if listed else hint.__name__ if isinstance(hint, type) else str(hint)
    in_words = b.text() if path in BOUNDS else ""
    return FieldInfo(path, name, default, text, (), flag, b.min, b.max, in_words, b.max_len, methods)


def set_path(data: dict[str, Any], path: str, value: Any) -> None:
    """Set `section.field` in a nested config dict (used for CLI flags and --set)."""
    section, _, name = path.partition(".")
    if name:
        data.setdefault(section, {})[name] = value
    else:
        data[section] = value


def precompute_reference(config: TrainingConfig, epochs: float) -> bool:
    """Whether to score the reference once before training: asked for, or (`auto`) when the run covers at least one
    epoch, so the pass replaces at least as many reference passes as it makes (docs/benchmarks.md: 1.20x over
    3 epochs, and faster already at 1.33). Only the methods with a reference pass have one to save."""
    setting = config.preference.precompute_reference
    uses_reference = config.method == "kto" or (config.method == "dpo" and config.preference.loss != "simpo")
    if not uses_reference:
        return False
    if config.adapter in WHOLE_MODEL:
        # No adapter to switch off: the reference is scored once, before the first step (and again, the same, on
        # every start: the weights are the starting model's until the checkpoint loads), not a second model kept.
        return True
    if setting == "off":
        return False
    return setting == "on" or epochs >= 1.0
