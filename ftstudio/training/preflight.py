"""Cheap checks at submit time, so a bad task is refused with a 4xx instead of failing later.

`check(config, home)` gathers every problem it finds into one ValidationError,
each naming the field. It reads files and the local Hugging Face cache only; it
never imports, executes or loads anything a user named (no model code, no
weights), and builds nothing: `builtin:tiny` is built by the trainer.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
from pathlib import Path

from ftstudio.config import TrainingConfig, format_problem, label, validation_fraction
from ftstudio.errors import Problem, ValidationError
from ftstudio.training.builtin import BUILTIN_MODELS, looks_like_hub_id, resolve_dataset
from ftstudio.training.data import inspect_dataset, splits

MODEL = label("model.name")


def check(config: TrainingConfig, home: Path, *, max_row_bytes: int | None = None) -> None:
    """Raise ValidationError listing everything that would stop this config from training.

    `max_row_bytes`: the studio's row limit when it checks a request (None: read any row, as the trainer does)."""
    problems: list[Problem] = []
    problems += model_problems(config.model.name)
    problems += _quantization(config.model.quantization)
    problems += gpu_feature_problems(config)
    if config.model.compile and not compiler():
        problems.append(
            Problem(
                "model.compile",
                "torch.compile needs a C++ compiler and none was found (g++, c++ or $CXX); "
                "install one (apt-get install g++) or set model.compile=false",
            )
        )
    problems += _dataset(
        config.data.path, config.data.format, home, label("data.path"), max_row_bytes, method=config.method
    )
    problems += _reporting(config.logging.report_to)
    validation = config.data.validation.strip()
    if validation_fraction(validation) is None:
        problems += _validation(config, validation, home, max_row_bytes)
    if config.evaluation.prompts.strip():
        problems += _dataset(
            config.evaluation.prompts, "auto", home, label("evaluation.prompts"), max_row_bytes, prompts=True
        )
    problems += _resume(config.checkpoint.resume_from)
    if config.model.start_from.strip():
        problems += _start_from(config)
    if config.method == "grpo":
        problems += _rewards(config, home)
    if problems:
        raise ValidationError(problems)


def _start_from(config: TrainingConfig) -> list[Problem]:
    """The adapter to go on from: a peft adapter folder, trained on this run's base model, not on a 4-bit one."""
    import json

    field = label("model.start_from")
    folder = Path(config.model.start_from.strip()).expanduser()
    if not (folder / "adapter_config.json").is_file():
        return [
            Problem(
                field,
                f"{config.model.start_from.strip()[:200]!r} is neither a completed task of this studio nor an adapter "
                "folder (no adapter_config.json); give a completed task's id",
            )
        ]
    try:
        trained = json.loads((folder / "training_config.json").read_text())
        base = str(trained["model"]["name"])
    except (OSError, ValueError, KeyError, TypeError):
        return []  # an adapter from elsewhere: its base is the person's to match
    if base != config.model.name.strip():
        return [
            Problem(
                field,
                f"the adapter in {folder} was trained on {base[:200]}, not {config.model.name.strip()[:200]}; "
                f"set model.name (--model) to {base[:200]}",
            )
        ]
    return []


def _rewards(config: TrainingConfig, home: Path) -> list[Problem]:
    """The rewards parse (no custom reward's code is run here: only its file is looked for), and those that
    compare with an answer have one: a `prompts` file needs its `answer` column; the other shapes give their
    last assistant turn."""
    from ftstudio.training.rewards import CustomReward, answer_problems, parse_rewards

    try:
        # Whether a request may name custom code is the studio's rule, decided before this (service.submit).
        rewards = parse_rewards(config.rewards, custom_allowed=True)
    except ValidationError as e:
        return e.problems
    problems = [
        Problem(label("rewards"), f"reward {r.spec!r}: {r.path} is not a file; check the path")
        for r in rewards
        if isinstance(r, CustomReward) and not _exists(r.path)
    ]
    try:
        info = inspect_dataset(resolve_dataset(config.data.path, home), 5, config.data.format)
    except ValidationError:
        return problems  # reported under data.path
    if info.format == "prompts":
        columns = {k for row in info.preview if isinstance(row, dict) for k in row}
        problems += answer_problems(rewards, columns)
    return problems


def model_problems(ref: str) -> list[Problem]:
    ref = ref.strip()
    if ref.startswith("builtin:"):
        if ref not in BUILTIN_MODELS:
            return [Problem(MODEL, f"unknown built-in model {ref!r}; built-in: {', '.join(BUILTIN_MODELS)}")]
        return []
    path = Path(ref).expanduser()
    if _exists(path) or ref.startswith((".", "/", "~")):
        if not path.is_dir():
            return [Problem(MODEL, f"{ref} is not a directory; give a model directory with a config.json")]
        if not (path / "config.json").is_file():
            return [Problem(MODEL, f"{ref} has no config.json; it is not a Hugging Face model directory")]
        return []
    if not looks_like_hub_id(ref):
        return [Problem(MODEL, f"{ref!r} is not a hub id (org/name), a local directory or builtin:tiny")]
    if _in_hf_cache(ref):
        return []
    if _offline():
        return [
            Problem(
                MODEL,
                f"{ref} is not in the local Hugging Face cache and this machine is offline; "
                "download it where there is network (huggingface-cli download) or give a local directory",
            )
        ]
    return []


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except (OSError, ValueError):  # a name the system refuses (too long, a NUL): nothing is there
        return False


def _in_hf_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, "config.json")
    except ValueError:  # an id the hub library itself rejects
        return False
    return isinstance(found, str)


def _offline() -> bool:
    """True when the hub cannot be reached: offline mode is set, or a quick connection fails."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return True
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    host = endpoint.split("://", 1)[-1].split("/", 1)[0].split(":", 1)[0]
    try:
        socket.create_connection((host, 443), timeout=1.5).close()
    except OSError:
        return True
    return False


def compiler() -> str | None:
    """The C++ compiler torch.compile's inductor would build its kernels with, if there is one."""
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        found = shutil.which(name) if name else None
        if found:
            return found
    return None


def quantization_problem(quantization: str) -> str | None:
    """Why quantized loading cannot work here, or None when it can."""
    if quantization == "none":
        return None
    if importlib.util.find_spec("bitsandbytes") is None:
        return (
            f"{quantization} quantization needs the bitsandbytes package and a CUDA GPU; "
            "pip install bitsandbytes on a GPU machine, or set model.quantization=none"
        )
    import torch

    if not torch.cuda.is_available():
        return f"{quantization} quantization needs a CUDA GPU and none is visible; set model.quantization=none"
    return None


# What each `logging.report_to` integration needs installed (any one of the modules), and the pip package.
REPORTERS = {
    "tensorboard": (("tensorboard", "tensorboardX"), "tensorboard"),
    "wandb": (("wandb",), "wandb"),
    "mlflow": (("mlflow",), "mlflow"),
}


def _reporting(report_to: list[str]) -> list[Problem]:
    problems = []
    for name in report_to:
        modules, package = REPORTERS.get(name, ((), ""))
        if modules and not any(importlib.util.find_spec(m) for m in modules):
            problems.append(
                Problem(
                    "logging.report_to",
                    f"reporting to {name} needs the {package} package, which is not installed here; "
                    f"pip install {package}, or leave {name} out of logging.report_to",
                )
            )
    return problems


def gpu_feature_problems(config: TrainingConfig) -> list[Problem]:
    """The speed and memory settings that run on a CUDA GPU only, each with what it needs, where this machine
    lacks it: said at submit, not as a crash at the first step."""
    wanted: list[tuple[str, str, str | None]] = []  # (field, what it is, the package it needs)
    if config.model.kernels == "liger":
        wanted.append(("model.kernels", "kernels liger (Triton kernels)", "liger_kernel"))
    if config.optim.optimizer != "adamw":
        wanted.append(("optim.optimizer", f"optimizer {config.optim.optimizer}", "bitsandbytes"))
    if config.model.offload_checkpoints:
        wanted.append(("model.offload_checkpoints", "offloading checkpoints to host memory", None))
    if not wanted:
        return []
    import torch

    problems = []
    for path, what, module in wanted:
        default = "none" if path == "model.kernels" else "adamw" if path == "optim.optimizer" else "false"
        if module is not None and importlib.util.find_spec(module) is None:
            package = module.replace("_", "-")
            problems.append(
                Problem(path, f"{what} needs the {package} package and a CUDA GPU; pip install {package} on a GPU "
                        f"machine, or set {path}={default}")
            )  # fmt: skip
        elif not torch.cuda.is_available():
            problems.append(Problem(path, f"{what} needs a CUDA GPU and none is visible; set {path}={default}"))
    return problems


def _quantization(quantization: str) -> list[Problem]:
    problem = quantization_problem(quantization)
    return [Problem("model.quantization", problem)] if problem else []


def _validation(config: TrainingConfig, value: str, home: Path, max_row_bytes: int | None) -> list[Problem]:
    """A split of the training dataset (a saved DatasetDict) by name, or a dataset of its own."""
    try:
        data_path = resolve_dataset(config.data.path, home)
    except ValidationError:
        data_path = None  # reported under data.path
    if data_path is not None and value in splits(data_path):
        try:
            inspect_dataset(data_path, 0, config.data.format, value, max_row_bytes=max_row_bytes)
        except ValidationError as e:
            return [Problem("data.validation", p.message) for p in e.problems]
        return []
    return _dataset(value, config.data.format, home, "data.validation", max_row_bytes, method=config.method)


def _dataset(
    ref: str,
    data_format: str,
    home: Path,
    field: str,
    max_row_bytes: int | None,
    *,
    prompts: bool = False,
    method: str | None = None,
) -> list[Problem]:
    """`prompts`: held-out prompts (evaluation.prompts), in any shape, answers optional. `method`: the data must be
    of a shape it trains on."""
    try:
        info = inspect_dataset(resolve_dataset(ref, home), 0, data_format, max_row_bytes=max_row_bytes, prompts=prompts)
    except ValidationError as e:
        return [Problem(field, p.message) for p in e.problems]
    problem = format_problem(method, info.format) if method else None
    return [Problem(field, f"{Path(info.path).name}: {problem}")] if problem else []


def _resume(value: str) -> list[Problem]:
    from ftstudio.checkpoints import is_complete

    value = value.strip()
    if value in ("", "auto"):
        return []
    path = Path(value).expanduser()
    if not path.is_absolute():
        return []  # relative to the task's checkpoints/ directory, which the trainer resolves
    if not _exists(path):
        return [Problem("checkpoint.resume_from", f"{value} does not exist; give a checkpoint-N directory or auto")]
    if not is_complete(path):
        return [
            Problem(
                "checkpoint.resume_from",
                f"{value} is not a complete checkpoint (no completion marker or damaged files); use auto",
            )
        ]
    return []
