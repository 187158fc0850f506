"""The task index (studio.db) on a machine left alone for a month (issue 21, item 5, first part): a backup
taken while tasks train is consistent, a stopped studio leaves studio.db complete on its own, and a
damaged studio.db or studio.json gets one line naming the file and the fix, never a traceback."""

from __future__ import annotations

import shutil
import signal
import sqlite3
from pathlib import Path

import pytest
from support import Studio, cli_json, home_env, run_cli, wait_for

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
                "/api/tasks", json={"name": f"t{n} scripted steps=4000 delay=0.02", "config": {"preset": "cpu-demo"}}
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
        for tid in ids:  # 80 s of steps each: none can end on its own before this on a loaded machine
            r = studio.http.post(f"/api/tasks/{tid}/cancel")
            assert r.status_code == 200, (r.text, studio.task(tid), studio.log_tail())
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


def listing(studio: Studio) -> dict[str, dict]:
    tasks = studio.http.get("/api/tasks", params={"limit": 100}).json()
    return {t["id"]: t for t in _tasks(tasks)}


def test_an_emptied_index_is_rebuilt_from_the_task_folders_and_running_tasks_are_reattached(home: Path) -> None:
    """Issue 21: truncate studio.db while 10 tasks exist, 2 running: after a start all 10 are listed with
    their history, and the 2 running ones are reattached (same runner). Then a damaged studio.db, and
    `ftstudio studio repair`."""
    studio = Studio(home, home_env(home, scripted=True)).start("--slots", "2")
    names = [f"done {n} scripted steps=3 delay=0.01" for n in range(6)] + ["failing scripted steps=2 exit=3"]
    ids = [
        studio.http.post("/api/tasks", json={"name": n, "config": {"preset": "cpu-demo"}}).json()["id"] for n in names
    ]
    for tid in ids:
        studio.wait_status(tid, "completed", "failed", timeout=60)
    held = studio.http.post(
        "/api/tasks", json={"name": "cancelled scripted steps=2000 delay=0.05", "config": {"preset": "cpu-demo"}}
    ).json()["id"]
    studio.wait_status(held, "training", timeout=60)
    studio.http.post(f"/api/tasks/{held}/cancel").raise_for_status()
    studio.wait_status(held, "cancelled", timeout=60)
    running = [
        studio.http.post(
            "/api/tasks", json={"name": f"running {n} scripted steps=3000 delay=0.05", "config": {"preset": "cpu-demo"}}
        ).json()["id"]
        for n in range(2)
    ]
    for tid in running:
        wait_for(lambda tid=tid: studio.task(tid)["step"] >= 3, timeout=60, what="training")
    before = listing(studio)
    histories = {tid: studio.http.get(f"/api/tasks/{tid}/history").json() for tid in before}
    assert len(before) == 10
    studio.kill(signal.SIGKILL)  # the training keeps running
    for suffix in ("-wal", "-shm"):
        (home / f"studio.db{suffix}").unlink(missing_ok=True)
    (home / "studio.db").write_bytes(b"")  # emptied: a valid, empty database

    studio.start("--slots", "2")
    after = listing(studio)
    assert sorted(after) == sorted(before)
    for tid, was in before.items():
        now = after[tid]
        assert (now["name"], now["config"], now["attempt"]) == (was["name"], was["config"], was["attempt"]), tid
        if tid in running:
            assert now["status"] == "training" and now["reattached"] is True and now["pid"] == was["pid"], now
        else:
            assert (now["status"], now["step"], now["error"]) == (was["status"], was["step"], was["error"]), (was, now)
        old, new = histories[tid], studio.http.get(f"/api/tasks/{tid}/history").json()
        assert [(t["src"], t["dst"]) for t in new["transitions"]] == [(t["src"], t["dst"]) for t in old["transitions"]][
            : len(new["transitions"])
        ]
        assert len(new["transitions"]) == len(old["transitions"]), (tid, old["transitions"], new["transitions"])
        assert [(a["attempt"], a["end_cause"]) for a in new["attempts"]] == [
            (a["attempt"], a["end_cause"]) for a in old["attempts"]
        ]
    assert "studio.db did not know 10 task folder(s)" in (home / "studio.log").read_text()
    at = studio.task(running[0])["step"]
    wait_for(lambda: studio.task(running[0])["step"] > at + 3, timeout=60, what="the reattached task to advance")

    # A damaged index: `studio repair` moves it aside and rebuilds it; the next start finds all ten.
    studio.stop()
    (home / "studio.db").write_bytes(b"garbage" * 1000)
    for suffix in ("-wal", "-shm"):
        (home / f"studio.db{suffix}").unlink(missing_ok=True)
    one_line_error(run_cli(home, "tasks"), "is damaged", "studio backup DIR")
    fixed = run_cli(home, "studio", "repair")
    assert fixed.returncode == 0, fixed.stderr
    assert (
        "moved aside to" in fixed.stdout and "rebuilt 10 task(s) from their folders; the index holds 10" in fixed.stdout
    )
    studio = Studio(home, home_env(home, scripted=True)).start("--slots", "2")
    again = listing(studio)
    assert sorted(again) == sorted(before) and all(again[t]["status"] == "training" for t in running)
    for tid in running:
        studio.http.post(f"/api/tasks/{tid}/cancel").raise_for_status()
    for tid in running:
        studio.wait_status(tid, "cancelled", timeout=60)
    studio.stop()
