"""Resumable checkpoints: written complete, then marked; resume picks the newest complete one.

The Hugging Face Trainer writes `checkpoint-N/` (adapter weights, optimizer,
scheduler, RNG state, `trainer_state.json`). It does not fsync and a kill can
land mid-write, so ftstudio adds `ftstudio-complete.json` LAST, after every file
is fsynced; the marker records each file's size. A checkpoint counts only when:

- the marker is there and every file it lists has the recorded size,
- `trainer_state.json` says `global_step == N`,
- every `.safetensors` file has a readable header covering the whole file,
- every rank's RNG state is in it: under torchrun each rank writes its own
  `rng_state_{rank}.pth`, rank 0 writes the rest, and the marker records how many
  ranks there were (`rng_state.pth` for a single process). A checkpoint missing a
  rank's RNG would resume that rank with a different dropout stream.

Anything else is partial: skipped, never loaded, and removed at the next start.
Pruning happens only after a new checkpoint is marked, so at least one complete
checkpoint exists at every moment once the first one does.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
from pathlib import Path

from ftstudio.home import write_json_atomic

MARKER = "ftstudio-complete.json"
_NAME = re.compile(r"^checkpoint-(\d+)$")


def step_of(path: Path) -> int | None:
    m = _NAME.match(Path(path).name)
    return int(m.group(1)) if m else None


def list_checkpoints(checkpoints_dir: Path) -> list[Path]:
    """Every `checkpoint-N` directory, oldest step first, complete or not."""
    try:
        found = [p for p in Path(checkpoints_dir).iterdir() if p.is_dir() and step_of(p) is not None]
    except FileNotFoundError:
        return []
    return sorted(found, key=lambda p: step_of(p) or 0)


def rng_files(ranks: int) -> list[str]:
    """The RNG state files the HF Trainer writes for a run of `ranks` processes."""
    return ["rng_state.pth"] if ranks == 1 else [f"rng_state_{r}.pth" for r in range(ranks)]


def mark_complete(path: Path, ranks: int = 1) -> int:
    """Flush every file of a freshly written checkpoint to disk, then write the marker; returns the
    checkpoint's size in bytes.

    Under torchrun, call it on rank 0 only after every rank has finished saving (a barrier)."""
    path = Path(path)
    sizes: dict[str, int] = {}
    for file in sorted(p for p in path.rglob("*") if p.is_file() and p.name != MARKER):
        with open(file, "rb") as f:
            os.fsync(f.fileno())
        sizes[str(file.relative_to(path))] = file.stat().st_size
    _fsync_dir(path)
    write_json_atomic(path / MARKER, {"step": step_of(path), "ranks": ranks, "files": sizes})
    return sum(sizes.values())


def is_complete(path: Path) -> bool:
    """True only for a checkpoint that can be resumed from (see the module docstring)."""
    path = Path(path)
    step = step_of(path)
    if step is None:
        return False
    try:
        marker = json.loads((path / MARKER).read_text())
        state = json.loads((path / "trainer_state.json").read_text())
        if marker.get("step") != step or state.get("global_step") != step:
            return False
        for rel, size in marker["files"].items():
            if (path / rel).stat().st_size != size:
                return False
        # Markers written before the rank count was recorded: their files were checked above.
        if "ranks" in marker:
            ranks = marker["ranks"]
            if not isinstance(ranks, int) or isinstance(ranks, bool) or ranks < 1:
                return False
            if any(name not in marker["files"] for name in rng_files(ranks)):
                return False
        weights = list(path.glob("*.safetensors"))
        return bool(weights) and all(_safetensors_ok(w) for w in weights)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def _safetensors_ok(path: Path) -> bool:
    """The header parses and its tensors end exactly at the end of the file (not truncated)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            return False
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            return False
        header = json.loads(f.read(n))
    ends: list[int] = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"]
    return bool(8 + n + max(ends, default=0) == size)


def find_resume_checkpoint(checkpoints_dir: Path) -> Path | None:
    """The newest complete checkpoint under checkpoints_dir, or None."""
    for path in reversed(list_checkpoints(checkpoints_dir)):
        if is_complete(path):
            return path
    return None


def remove_incomplete(checkpoints_dir: Path) -> list[Path]:
    """Delete partial checkpoints (a kill mid-save leaves them); returns what went."""
    removed = [p for p in list_checkpoints(checkpoints_dir) if not is_complete(p)]
    for p in removed:
        shutil.rmtree(p, ignore_errors=True)
    return removed


def prune(checkpoints_dir: Path, keep: int) -> list[Path]:
    """Keep the newest `keep` complete checkpoints; older ones (complete or partial) go."""
    all_ckpts = list_checkpoints(checkpoints_dir)
    complete = [p for p in all_ckpts if is_complete(p)]
    if not complete:
        return []
    kept = set(complete[-keep:])
    oldest_kept = step_of(min(kept, key=lambda p: step_of(p) or 0)) or 0
    removed = [p for p in all_ckpts if p not in kept and (step_of(p) or 0) < oldest_kept]
    for p in removed:
        shutil.rmtree(p, ignore_errors=True)
    return removed


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
