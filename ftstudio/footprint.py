"""How much memory a task needs: what its Slurm job asks for when the task names none (`--memory`), and the
least its weights take while it trains, which the studio holds against this machine before a task is accepted.

A job that asks for no `--mem` gets the partition's default, which on most clusters is the whole node's
memory: one fine-tune then holds a node that several could share, and admins' policies reject such
jobs. So every job asks for an amount, from the first of:

1. the task's own `resources.memory` (`--memory`), which is also the limit Slurm enforces;
2. an estimate from the model's weights as they lie on this machine (a local folder, or the Hugging Face
   cache of a hub id), scaled by what loading and training take beside them;
3. a fixed amount per process when the weights are nowhere to be read here.

The figures are for host memory (RSS), per process, and are measured in `bench/bench_job_memory.py`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MiB = 1 << 20
GiB = 1 << 30
RUNTIME_BYTES = 1 * GiB
"""Python, torch, transformers, peft, the tokenizer and the data of one trainer process, before weights
(a builtin:tiny trainer peaks at about 0.5 GiB; bench/bench_job_memory.py)."""
CUDA_RUNTIME_BYTES = 2 * GiB
"""More per process on a GPU node: the CUDA context and libraries in host memory, pinned transfer buffers.
Not measured on these machines (no GPU); the one-call GPU check is where it will be."""
LOAD_FACTOR = 2.0
"""Weights are read from disk into a state dict and then into the model: twice their size at the peak."""
CPU_TRAIN_FACTOR = 1.0
"""Without a GPU the model stays in host memory while it trains: its size again for activations and the
adapter's optimizer."""
UNKNOWN_BYTES = 8 * GiB
"""Per process, for a model whose weights this machine cannot see (a hub id not in the local cache)."""
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


@dataclass(frozen=True)
class Footprint:
    bytes: int
    basis: str  # how the amount was reached, for the studio's log and the task's Slurm line

    @property
    def sbatch_mem(self) -> str:
        """Slurm's --mem value, in whole MiB."""
        return f"{max(1, -(-self.bytes // MiB))}M"


def weights_on_disk(model: str) -> int | None:
    """Bytes of the model's weight files on this machine; None when they are not here."""
    if model.startswith("builtin:"):
        return 0  # built from a config at start-up: a few MB
    path = Path(model).expanduser()
    if path.is_dir():
        return _weights_in(path)
    snapshot = cached_snapshot(model)
    return _weights_in(snapshot) if snapshot is not None else None


def _weights_in(folder: Path) -> int | None:
    total, found = 0, False
    try:
        for entry in folder.iterdir():
            if entry.name.endswith(WEIGHT_SUFFIXES):
                total += entry.stat().st_size  # follows the cache's links to its blobs
                found = True
    except OSError:
        return None
    return total if found else None


def cached_snapshot(repo_id: str) -> Path | None:
    """The newest snapshot of a hub id in the local Hugging Face cache (HF_HUB_CACHE, HF_HOME/hub, or
    ~/.cache/huggingface/hub), read as a folder: the studio never downloads to estimate."""
    if repo_id.count("/") != 1 or any(part in ("", ".", "..") for part in repo_id.split("/")):
        return None
    hf_home = os.environ.get("HF_HOME") or str(Path("~/.cache/huggingface").expanduser())
    cache = Path(os.environ.get("HF_HUB_CACHE") or os.path.join(hf_home, "hub"))
    snapshots = cache / ("models--" + repo_id.replace("/", "--")) / "snapshots"
    try:
        found = sorted(snapshots.iterdir(), key=lambda p: p.stat().st_mtime)
    except OSError:
        return None
    return found[-1] if found else None


def job_memory(config: Mapping[str, Any], memory_bytes: int | None) -> Footprint:
    """What a task's job asks for. `memory_bytes`: the task's own `resources.memory`, parsed."""
    resources = config.get("resources") or {}
    processes = max(1, int(resources.get("processes") or 1))
    if memory_bytes:
        return Footprint(memory_bytes, "the task's --memory")
    model = str((config.get("model") or {}).get("name") or "builtin:tiny")
    weights = weights_on_disk(model)
    if weights is None:
        return Footprint(
            processes * UNKNOWN_BYTES,
            f"{UNKNOWN_BYTES // GiB} GiB per process: the weights of {model[:80]} are not on this machine to size "
            "it by; set --memory to ask for another amount",
        )
    gpus = resources.get("gpus")
    on_gpu = isinstance(gpus, int) and gpus > 0  # asked for GPUs; otherwise it may well train on the CPU
    factor = LOAD_FACTOR + (0.0 if on_gpu else CPU_TRAIN_FACTOR)
    each = RUNTIME_BYTES + (CUDA_RUNTIME_BYTES if on_gpu else 0) + int(weights * factor)
    shown = f"{weights / GiB:.1f} GiB" if weights >= GiB // 10 else f"{weights / MiB:.0f} MiB"
    return Footprint(
        processes * each,
        f"estimated from {shown} of weights, {processes} process(es); set --memory to ask for another amount",
    )


DISK_BYTES_PER_PARAM = {"float32": 4, "float16": 2, "bfloat16": 2}
"""Bytes per parameter of the weight files by the dtype config.json declares (2 when it says nothing)."""


def training_weights(config: Mapping[str, Any], on_gpu: bool) -> tuple[int, str] | None:
    """The least memory the model's weights take in training (adapter full: with their gradients and optimizer
    state), on one device (a GPU, or the host without one), and
    how it was reached; None when the weights are not on this machine to size (a hub id not cached). Activations,
    the adapter's optimizer and the runtime come on top, so a run that needs more than this can never fit."""
    model = config.get("model") or {}
    name = str(model.get("name") or "builtin:tiny")
    weights = weights_on_disk(name)
    if not weights:
        return None
    path = Path(name).expanduser() if Path(name).expanduser().is_dir() else cached_snapshot(name)
    on_disk = 2
    try:
        declared = json.loads((path / "config.json").read_text()) if path is not None else {}
        on_disk = DISK_BYTES_PER_PARAM.get(str(declared.get("torch_dtype") or declared.get("dtype")), 2)
    except (OSError, ValueError, AttributeError):
        pass
    params = weights / on_disk
    quantization = str(model.get("quantization") or "none")
    dtype = str(model.get("dtype") or "auto")
    if quantization == "4bit":
        each, how = 0.5, "4-bit"
    elif quantization == "8bit":
        each, how = 1.0, "8-bit"
    elif dtype == "float32" or (dtype == "auto" and not on_gpu):
        each, how = 4.0, "float32"
    else:
        each, how = 2.0, "16-bit"
    need = int(params * each)
    if config.get("adapter") == "full":
        # Every weight trains: its gradient and AdamW's two moments beside it, in the same dtype.
        return need * 4, f"{params / 1e9:.1f}B parameters in {how}, with their gradients and AdamW's two moments"
    return need, f"{params / 1e9:.1f}B parameters in {how}"
