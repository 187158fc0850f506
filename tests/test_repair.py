"""Rebuilding the index from task folders (studio.repair), over real files and a real store, no process."""

from __future__ import annotations

import json
from pathlib import Path

from ftstudio.home import Home, TaskDir, write_json_atomic
from ftstudio.studio.repair import reindex
from ftstudio.studio.store import Store


def folder(home: Home, task_id: str, *, spec: object = None, exit_record: object = None, steps: int = 0) -> TaskDir:
    tdir = TaskDir(home.tasks / task_id)
    tdir.path.mkdir(parents=True)
    config = {"model": {"name": "builtin:tiny"}, "data": {"path": "builtin:sample"}, "resources": {"priority": 2}}
    write_json_atomic(
        tdir.spec, spec if spec is not None else {"format": 1, "task_id": task_id, "name": "old one", "config": config}
    )
    if exit_record is not None:
        write_json_atomic(tdir.exit, exit_record)
    with open(tdir.events, "w") as f:
        for s in range(1, steps + 1):
            f.write(
                json.dumps({"kind": "progress", "step": s, "total_steps": steps, "loss": 1.0 / s, "ts": float(s)})
                + "\n"
            )
    return tdir


def test_folders_from_before_the_journal_are_rebuilt_from_their_records(tmp_path: Path) -> None:
    home = Home(tmp_path / "home").ensure()
    store = Store(home.db)
    folder(home, "20261101-0000-aaaaaaaa", exit_record={"outcome": "completed", "reason": "done"}, steps=7)
    folder(home, "20261101-0000-bbbbbbbb", exit_record={"outcome": "failed", "reason": "CUDA out of memory"}, steps=2)
    folder(home, "20261101-0000-cccccccc")  # never launched
    folder(home, "20261101-0000-dddddddd", spec={"task_id": "someone-else"})
    (home.tasks / "My notes").mkdir()
    found = reindex(store, home)
    assert sorted(found.rebuilt) == ["20261101-0000-aaaaaaaa", "20261101-0000-bbbbbbbb", "20261101-0000-cccccccc"]
    assert found.skipped == [
        "tasks/20261101-0000-dddddddd: no readable spec.json for this task; left out of the index",
        "tasks/My notes: not a task folder's name; left alone",
    ]
    done = store.get("20261101-0000-aaaaaaaa")
    assert (done.status, done.step, done.total_steps, done.name, done.priority) == ("completed", 7, 7, "old one", 2)
    assert [e["step"] for e in store.events("20261101-0000-aaaaaaaa") if e["kind"] == "progress"] == list(range(1, 8))
    failed = store.get("20261101-0000-bbbbbbbb")
    assert failed.status == "failed" and failed.error.startswith("CUDA out of memory (rebuilt from its folder")
    assert store.get("20261101-0000-cccccccc").status == "queued"
    assert reindex(store, home).rebuilt == []  # known now: nothing twice
