"""The task index (studio.db) on a machine left alone for a month (issue 21, item 5, first part): a backup
taken while tasks train is consistent, a stopped studio leaves studio.db complete on its own, and a
damaged studio.db or studio.json gets one line naming the file and the fix, never a traceback."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import pytest
from support import Studio, cli_json, home_env, run_cli

from ftstudio.errors import DamagedFile
from ftstudio.studio.store import SCHEMA_VERSION, Store

pytestmark = pytest.mark.process  # the CLI runs as a process, as a person runs it


def one_line_error(r, *needles: str) -> str:
    assert r.returncode != 0, r.stdout
    err = r.stderr.strip()
    assert "\n" not in err and "Traceback" not in err and err.startswith("error: "), err
    for needle in needles:
        assert needle in err, err
    return err


def test_a_damaged_database_is_named_with_its_fix(home: Path) -> None:
    home.mkdir()
    (home / "studio.db").write_bytes(b"this is not a database" * 100)
    with pytest.raises(DamagedFile, match=r"studio\.db is damaged .*studio backup DIR.*move it aside"):
        Store(home / "studio.db")
    err = one_line_error(run_cli(home, "tasks"), str(home / "studio.db"), "is damaged", "task folders")
    assert "file is not a database" in err


def test_a_database_from_a_newer_release_is_named_too(home: Path) -> None:
    home.mkdir()
    conn = sqlite3.connect(home / "studio.db")
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    one_line_error(run_cli(home, "tasks"), f"schema version {SCHEMA_VERSION + 1}", "upgrade ftstudio")


@pytest.mark.parametrize("record", ['{"pid": "x", bad', "[1, 2]", '{"pid": "7", "port": "x"}', ""])
def test_a_damaged_studio_json_with_no_studio_running_is_stale(home: Path, record: str) -> None:
    home.mkdir()
    (home / "studio.json").write_text(record)
    r = run_cli(home, "studio", "status")
    assert r.returncode == 3 and "studio is not running" in r.stdout and not r.stderr, (r.stdout, r.stderr)


def test_a_damaged_studio_json_while_a_studio_runs_says_what_to_do(home: Path) -> None:
    studio = Studio(home, home_env(home, scripted=True)).start()
    try:
        (home / "studio.json").write_text('{"pid": 1, "port": ')
        for args in (("studio", "status"), ("studio", "url"), ("studio", "start")):
            one_line_error(
                run_cli(home, *args), str(home / "studio.json"), "is damaged (not valid JSON)", "start it again"
            )
    finally:
        studio.stop()
    assert run_cli(home, "studio", "status").returncode == 3  # stale now: the next start writes a new record


def test_a_backup_taken_while_tasks_train_is_consistent_and_a_stop_leaves_studio_db_complete(
    home: Path, tmp_path: Path
) -> None:
    studio = Studio(home, home_env(home, scripted=True)).start("--slots", "2")
    try:
        ids = []
        for n in range(4):
            r = studio.http.post(
                "/api/tasks", json={"name": f"t{n} scripted steps=400 delay=0.02", "config": {"preset": "cpu-demo"}}
            )
            assert r.status_code == 201, r.text
            ids.append(r.json()["id"])
        studio.wait_status(ids[0], "training", timeout=60)
        made = run_cli(home, "studio", "backup", str(tmp_path / "b1"))
        assert made.returncode == 0 and "backed up 4 task(s) to " in made.stdout, made.stderr
        again = run_cli(home, "studio", "backup", str(tmp_path / "b1"))
        one_line_error(again, "exists already", "never replaces")
        assert again.returncode == 2
        assert sorted(p.name for p in (tmp_path / "b1").iterdir()) == ["studio.db"]  # one self-contained file
        copy = Store(tmp_path / "b1" / "studio.db")
        assert sorted(t.id for t in copy.page_of_tasks(limit=100)[0]) == sorted(ids)
        assert {t.id: t.config_dict for t in copy.page_of_tasks(limit=100)[0]} == {
            t: studio.task(t)["config"] for t in ids
        }
        for tid in ids:
            studio.http.post(f"/api/tasks/{tid}/cancel").raise_for_status()
        for tid in ids:
            studio.wait_status(tid, "cancelled", timeout=60)
        listed = cli_json(home, "tasks")
    finally:
        studio.stop()
    wal = home / "studio.db-wal"
    assert not wal.exists() or wal.stat().st_size == 0, "the stop left the index in the write-ahead log"
    # A backup that copies studio.db alone, after a stop, keeps everything.
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(home / "studio.db", alone / "studio.db")
    restored = Store(alone / "studio.db")
    assert {(t.id, t.status) for t in restored.page_of_tasks(limit=100)[0]} == {
        (t["id"], t["status"]) for t in _tasks(listed)
    }
    assert all(restored.history(t) for t in ids)


def _tasks(listed: object) -> list[dict]:
    return listed["tasks"] if isinstance(listed, dict) else listed  # type: ignore[return-value]


def test_backup_needs_a_folder(home: Path) -> None:
    one_line_error(run_cli(home, "studio", "backup"), "studio backup needs a folder")
