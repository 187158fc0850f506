"""Each task folder's own account of its status changes (`history.jsonl`), so the index can be rebuilt.

studio.db is the index: quick to query, but one file, which a backup can miss, a disk can damage and a
person can delete. Everything a task needs is also in its folder: the spec (spec.json), the progress
(events.jsonl), the attempts' records (launch.json, exit.json) and, here, every status change the store
made, one JSON line each, appended after the store's transaction commits:

    {"kind": "move", "ts": ..., "src": "training", "dst": "interrupted", "reason": "...", "cause": "machine",
     "released": true, "attempt": 2, "step": 41, "error": "...", "restarts": 0}
    {"kind": "claim", "ts": ..., "attempt": 3, "resumed_from_step": 40, "reason": "launching"}
    {"kind": "launched", "ts": ..., "executor": "slurm", "job_id": "17"}

`studio.repair` reads it back. A line that cannot be written (a full disk) is logged and skipped: the
index stays the authority, the journal is its spare.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

NAME = "history.jsonl"

log = logging.getLogger(__name__)


def append(task_dir: str | Path, record: dict[str, Any]) -> None:
    path = Path(task_dir) / NAME
    if not path.parent.is_dir():
        return  # a task whose folder is not made yet (submit makes it after its row) or is gone
    line = json.dumps(record, separators=(",", ":"), default=str) + "\n"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)
    except OSError as e:
        log.warning("could not add to %s (%s); studio.db keeps the change", path, e.strerror)


def read(task_dir: str | Path) -> list[dict[str, Any]]:
    """The journal's records, oldest first; unreadable lines (a write cut short) are skipped."""
    try:
        text = (Path(task_dir) / NAME).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    records = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("kind") in ("move", "claim", "launched"):
            records.append(record)
    return records
