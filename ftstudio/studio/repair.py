"""Rebuilding the index (studio.db) from the task folders.

Each task folder holds what its row in studio.db says: the spec (name, config), the status history and
attempts (`journal`, history.jsonl), the progress (events.jsonl) and the last attempt's records
(launch.json, exit.json). The studio re-indexes, at every start, the folders its index does not know
(an emptied or replaced studio.db, a backup that missed the newest tasks), and `ftstudio studio repair`
does the same after moving a damaged studio.db aside. A task that was running is put back as running
with its runner's identity from launch.json: the supervisor's start-up look then reattaches it, or finds
it gone and decides, as after any studio crash.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ftstudio import events
from ftstudio.execution import procs
from ftstudio.execution.facts import Liveness
from ftstudio.home import TASK_ID_RE, Home, TaskDir, read_json
from ftstudio.studio import journal, lifecycle
from ftstudio.studio.store import JOURNALED, Batch, Store
from ftstudio.studio.task import TaskStatus


@dataclass
class Reindexed:
    rebuilt: list[str] = field(default_factory=list)
    """Ids of the tasks put back in the index."""
    skipped: list[str] = field(default_factory=list)
    """One line each: a folder left out, and why."""


class Unreadable(Exception):
    pass


def reindex(store: Store, home: Home) -> Reindexed:
    """Put every task folder the index does not know back into it."""
    done = Reindexed()
    if not home.tasks.is_dir():
        return done
    known = store.ids()
    for path in sorted(home.tasks.iterdir()):
        if path.name in known or not path.is_dir():
            continue
        if not TASK_ID_RE.fullmatch(path.name):
            done.skipped.append(f"tasks/{path.name}: not a task folder's name; left alone")
            continue
        tdir = TaskDir(path)
        try:
            row, transitions, attempts = rebuild(tdir)
        except Unreadable as e:
            done.skipped.append(f"tasks/{path.name}: {e}; left out of the index")
            continue
        if store.restore(row, transitions, attempts):
            _read_events(store, tdir)
            done.rebuilt.append(path.name)
    return done


def rebuild(tdir: TaskDir) -> tuple[dict[str, Any], list[tuple[float, str | None, str, str]], list[dict[str, Any]]]:
    """A task's row, status history and attempts, from its folder."""
    spec = _read(tdir.spec)
    config = spec.get("config") if isinstance(spec, dict) else None
    if not isinstance(spec, dict) or spec.get("task_id") != tdir.path.name or not isinstance(config, dict):
        raise Unreadable("no readable spec.json for this task")
    model = (config.get("model") or {}).get("name", "")
    dataset = (config.get("data") or {}).get("path", "")
    priority = (config.get("resources") or {}).get("priority", 0)
    created = tdir.spec.stat().st_mtime
    records = journal.read(tdir.path)
    transitions: list[tuple[float, str | None, str, str]] = [(created, None, TaskStatus.QUEUED, "submitted")]
    attempts: dict[int, dict[str, Any]] = {}
    row: dict[str, Any] = {"attempt": 1, "restarts": 0, "error": None}
    status = TaskStatus.QUEUED
    for r in records:
        if r["kind"] == "launched":  # which executor runs it, and a cluster's job id
            row.update(executor=str(r.get("executor") or "local"), job_id=r.get("job_id"))
            continue
        ts, number = float(r.get("ts") or created), int(r.get("attempt") or 1)
        transitions.append((ts, r.get("src"), str(r.get("dst")), str(r.get("reason") or "")))
        status = TaskStatus(r["dst"]) if r.get("dst") in tuple(TaskStatus) else status
        row["attempt"] = number
        if r["kind"] == "claim":
            attempts[number] = {"attempt": number, "started_at": ts, "resumed_from_step": r.get("resumed_from_step")}
            row["started_at"] = row.get("started_at") or ts
        elif r.get("released") and number in attempts and attempts[number].get("ended_at") is None:
            attempts[number].update(
                ended_at=ts, end_reason=r.get("reason"), end_cause=r.get("cause"), end_step=r.get("step")
            )
        for key in JOURNALED:
            if key in r:
                row[key] = r[key]
    if not records:
        status, row = _without_journal(tdir, row)
    launch = _read(tdir.launch)
    if status.has_process:
        if not isinstance(launch, dict) or not isinstance(launch.get("pid"), int):
            # Claimed, never launched: the supervisor's look decides it (the studio stopped before it began).
            row["started_at"] = row.get("started_at") or created
        else:
            row.update(
                pid=launch["pid"], pid_start_time=launch.get("start_time"), boot_id=launch.get("boot_id"),
                pgid=launch.get("pgid") or launch["pid"], started_at=row.get("started_at") or launch.get("started_at"),
            )  # fmt: skip
    last = transitions[-1][0]
    row.update(
        id=tdir.path.name, name=str(spec.get("name") or tdir.path.name)[:200], status=status, model=str(model),
        dataset=str(dataset), config=json.dumps(config), task_dir=str(tdir.path), executor=row.get("executor") or "local",
        created_at=created, updated_at=last, priority=int(priority) if isinstance(priority, int) else 0,
        finished_at=last if status.is_final else None,
    )  # fmt: skip
    return row, transitions, sorted(attempts.values(), key=lambda a: a["attempt"])


def _without_journal(tdir: TaskDir, row: dict[str, Any]) -> tuple[TaskStatus, dict[str, Any]]:
    """A folder from before the journal: its status as its last attempt's records tell it (lifecycle.rebuilt)."""
    exit_record = _read(tdir.exit)
    attempt = _read(tdir.attempt)
    if isinstance(attempt, int) and attempt > 0:
        row["attempt"] = attempt
    launch = _read(tdir.launch)
    alive = False
    if isinstance(launch, dict) and isinstance(launch.get("pid"), int):
        ident = procs.Identity(launch["pid"], float(launch.get("start_time") or 0), str(launch.get("boot_id") or ""))
        alive = procs.check(ident, marker="ftstudio.runner") == Liveness.ALIVE
    record = exit_record if isinstance(exit_record, dict) else {}
    status, error = lifecycle.rebuilt(
        str(record.get("outcome") or "") or None,
        str(record.get("reason") or ""),
        launched=launch is not None,
        alive=alive,
    )
    row["error"] = error
    return status, row


def _read_events(store: Store, tdir: TaskDir) -> None:
    offset = 0
    while True:
        chunk = events.read_from(tdir.events, offset)
        if chunk.offset == offset:
            return
        store.ingest_many([Batch(tdir.path.name, chunk.events, chunk.offset, offset, chunk.lines)])
        offset = chunk.offset


def _read(path: Path) -> Any:
    try:
        return read_json(path)
    except (ValueError, OSError):
        return None
