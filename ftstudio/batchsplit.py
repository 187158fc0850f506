"""How many parts optim.auto_batch splits each batch into, kept in the task folder (`batch_split.json`).

Shared by the trainer, which splits when a step runs out of memory (training/autobatch.py), and the runner,
which doubles the parts when the kernel kills a run at its memory limit (there is no exception to catch then)
and resumes it from its last checkpoint: the next attempt reads the file and starts split.
"""

from __future__ import annotations

import json
from pathlib import Path

from ftstudio.home import write_json_atomic

SPLIT_FILE = "batch_split.json"


def read_parts(task_dir: Path) -> int:
    """How many parts an earlier attempt of this task found each batch must be split into (1: none)."""
    try:
        parts = int(json.loads((task_dir / SPLIT_FILE).read_text())["parts"])
    except (OSError, ValueError, KeyError, TypeError):
        return 1
    return max(1, parts)


def write_parts(task_dir: Path, parts: int, batch_size: int, step: int | None) -> None:
    write_json_atomic(task_dir / SPLIT_FILE, {"parts": parts, "batch_size": batch_size, "step": step})


def rows_per_part(batch_size: int, parts: int) -> int:
    return -(-batch_size // max(1, parts))


def split_line(batch_size: int, parts: int) -> str:
    """How a split batch trains, in the words the log and the events use."""
    return (
        f"batch {batch_size} trains in {parts} parts of {rows_per_part(batch_size, parts)} rows, one after the "
        "other (the effective batch and the curve stay the same)"
    )
