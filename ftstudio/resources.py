"""What a task asks of the machine, and what the machine has.

A task's `resources` settings (config.py) say how many training processes it
runs, which GPUs it wants (a number, or explicit ids), whether it shares them,
its memory limit and its queue priority. This module reads those values and
finds the machine's GPUs; the scheduler (scheduler.py) decides who gets what.

GPU ids are numbered in PCI bus order, as `nvidia-smi` shows them, and handed
to the trainer as CUDA_VISIBLE_DEVICES with CUDA_DEVICE_ORDER=PCI_BUS_ID, so
the id a person typed is the card the task gets (CUDA's own default order is
"fastest first", which need not match nvidia-smi).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from typing import Any

MEMORY_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*$", re.IGNORECASE)
UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
MIN_MEMORY = 64 << 20  # below this not even the Python interpreter of the runner fits
MAX_GPU_ID = 1023


def parse_memory(text: str) -> int | None:
    """`8G`, `512M`, `1.5GiB`, `2048` (bytes) -> bytes; empty -> None. Raises ValueError with the fix."""
    if not text.strip():
        return None
    m = MEMORY_RE.match(text)
    if not m:
        raise ValueError("must be a size such as 8G, 1.5G or 512M (K, M, G and T are powers of 1024)")
    size = int(float(m.group(1)) * UNITS[m.group(2).upper()])
    if size < MIN_MEMORY:
        raise ValueError(f"must be at least 64M, or empty for no limit (got {text.strip()})")
    return size


def gib(size: int) -> str:
    """A limit as people wrote it back: 8 GiB, 1.5 GiB, 512 MiB."""
    if size >= 1 << 30:
        return f"{size / (1 << 30):.3g} GiB"
    return f"{size / (1 << 20):.4g} MiB"


def parse_gpu_ids(text: str) -> tuple[int, ...]:
    """`0,2` -> (0, 2); empty -> (). Raises ValueError with the fix."""
    if not text.strip():
        return ()
    ids: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not (part.isascii() and part.isdigit()) or int(part) > MAX_GPU_ID:
            raise ValueError("must be GPU numbers separated by commas, as nvidia-smi shows them, e.g. 0,2")
        if int(part) in ids:
            raise ValueError(f"names GPU {int(part)} twice")
        ids.append(int(part))
    return tuple(ids)


@dataclass(frozen=True)
class Want:
    """What one task needs from the machine before it may start."""

    gpus: int = 0
    """How many GPUs, any of them (0 with `gpu_ids` set)."""
    gpu_ids: tuple[int, ...] = ()
    """Exactly these GPUs."""
    share: bool = False
    """May use GPUs other sharing tasks hold."""

    @property
    def needs_gpu(self) -> bool:
        return bool(self.gpus or self.gpu_ids)


def want_of(resources: dict[str, object], machine_gpus: int) -> Want:
    """A task's `resources` settings (as stored in its config) as a `Want` on this machine.
    `gpus: -1` means one GPU per training process where the machine has GPUs, none otherwise."""
    ids = parse_gpu_ids(str(resources.get("gpu_ids") or ""))
    share = bool(resources.get("share_gpu"))
    if ids:
        return Want(gpu_ids=ids, share=share)
    gpus = int(resources.get("gpus", -1))  # type: ignore[call-overload]
    if gpus < 0:
        gpus = int(resources.get("processes", 1) or 1) if machine_gpus else 0  # type: ignore[call-overload]
    return Want(gpus=gpus, share=share)


def machine_gpus() -> tuple[int, ...]:
    """The GPU ids this studio may hand out: what nvidia-smi lists, narrowed by the studio's own
    CUDA_VISIBLE_DEVICES when that is a list of numbers. FTSTUDIO_GPUS (`0,1`, or `none`) overrides
    the discovery: for machines where nvidia-smi is missing or slow, and for the tests."""
    override = os.environ.get("FTSTUDIO_GPUS")
    if override is not None:
        return () if override.strip().lower() in ("", "none") else parse_gpu_ids(override)
    found = _nvidia_smi()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        try:
            allowed = parse_gpu_ids(visible) if visible.strip() else ()
        except ValueError:
            return found  # UUIDs or MIG names: not ours to interpret; offer what nvidia-smi lists
        found = tuple(i for i in found if i in allowed)
    return found


def _nvidia_smi() -> tuple[int, ...]:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return ()
    try:
        out = subprocess.run(
            [exe, "--query-gpu=index", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return ()
    return tuple(int(line) for line in out.split() if line.strip().isdigit())


def gpu_usage() -> list[dict[str, Any]]:
    """The GPUs the studio hands out (`machine_gpus`, so FTSTUDIO_GPUS and CUDA_VISIBLE_DEVICES count),
    with their name and memory from nvidia-smi where it answers; no torch import (it would slow start-up)."""
    ids = machine_gpus()
    if not ids:
        return []
    found: dict[int, dict[str, Any]] = {}
    exe = shutil.which("nvidia-smi")
    out = ""
    if exe is not None:
        try:
            out = subprocess.run(
                [exe, "--query-gpu=index,name,memory.total,memory.used", "--format=csv,noheader,nounits"],
                capture_output=True,
                text=True,
                timeout=5,
                check=True,
            ).stdout
        except (OSError, subprocess.SubprocessError):
            out = ""
    for line in out.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 4 and parts[0].isdigit() and parts[2].isdigit() and parts[3].isdigit():
            found[int(parts[0])] = {
                "index": int(parts[0]),
                "name": parts[1],
                "memory_total": int(parts[2]) << 20,
                "memory_used": int(parts[3]) << 20,
            }
    # A GPU named by FTSTUDIO_GPUS that nvidia-smi does not describe is still one the studio hands out.
    return [found.get(i, {"index": i, "name": "", "memory_total": None, "memory_used": None}) for i in ids]


def cuda_env(gpu_ids: tuple[int, ...]) -> dict[str, str]:
    """The environment that gives a trainer exactly these GPUs (none: CPU only)."""
    return {
        "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
        "CUDA_VISIBLE_DEVICES": ",".join(map(str, gpu_ids)),
    }
