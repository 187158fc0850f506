"""A full or read-only data home is a 507 with one line saying so, on submit, upload, cancel and
delete, and leaves nothing half-made: no task row without its directory, no partial dataset, no
side directory. Tested on a real small tmpfs and a real read-only bind mount where this machine
allows mounting (root), and with injected errors everywhere."""

import errno
import io
import json
import os
import sqlite3
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from support import api_client, in_memory

from ftstudio.errors import StorageError
from ftstudio.storage import storage_error
from ftstudio.studio.service import Service
from ftstudio.web.auth import load_or_create_token

ROWS = b"".join(json.dumps({"instruction": f"q{i}", "output": "a"}).encode() + b"\n" for i in range(50))


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (OSError(errno.ENOSPC, "No space left on device"), "is full"),
        (OSError(errno.EDQUOT, "Disk quota exceeded"), "is full"),
        (OSError(errno.EROFS, "Read-only file system"), "is read-only"),
        (OSError(errno.EACCES, "Permission denied"), "is read-only"),
        (sqlite3.OperationalError("database or disk is full"), "is full"),
        (sqlite3.OperationalError("attempt to write a readonly database"), "is read-only"),
    ],
)
def test_full_and_read_only_errors_become_one_storage_error(exc, kind):
    err = storage_error(exc, Path("/data/home"))
    assert isinstance(err, StorageError) and err.http_status == 507
    assert f"the data home /data/home {kind}" in str(err) and "\n" not in str(err)


def test_other_errors_are_not_storage_errors():
    assert storage_error(OSError(errno.ENOENT, "gone"), Path("/h")) is None
    assert storage_error(sqlite3.OperationalError("no such table: x"), Path("/h")) is None


def _mount(*args: str) -> bool:
    return subprocess.run(["mount", *args], capture_output=True).returncode == 0


@contextmanager
def mounted(kind: str, where: Path) -> Iterator[None]:
    """A 3 MB tmpfs, or `where` bind-mounted over itself and made read-only; skip if not permitted."""
    ok = (
        _mount("-t", "tmpfs", "-o", "size=3m", "tmpfs", str(where))
        if kind == "tmpfs"
        else _mount("--bind", str(where), str(where))
    )
    if not ok:
        pytest.skip(f"cannot mount here ({kind}); needs root and a kernel that permits it")
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True, check=False)


def one_line_507(r, kind: str) -> None:
    assert r.status_code == 507, r.text
    detail = r.json()["detail"]
    assert "\n" not in detail and f"{kind}" in detail and "the data home" in detail, detail


def state(service: Service) -> tuple[list[tuple[str, str]], list[str], list[str]]:
    rows = service.store._conn().execute("SELECT id, status FROM tasks ORDER BY id").fetchall()
    return (
        [tuple(r) for r in rows],
        sorted(p.name for p in service.home.tasks.iterdir()),
        sorted(str(p.relative_to(service.home.root)) for p in service.home.datasets.rglob("*")),
    )


@pytest.mark.process  # mount and umount
def test_a_full_disk_gives_507_and_leaves_nothing(home, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    home.mkdir()
    with mounted("tmpfs", home):
        service = in_memory(home, in_server=True)
        with api_client(service) as client:
            queued = service.store.create_task(
                name="waiting", model="builtin:tiny", dataset="builtin:sample", config={}, tasks_root=service.home.tasks
            )
            queued.dir.path.mkdir()
            filler = home / "filler"
            with open(filler, "wb") as f, pytest.raises(OSError):
                while True:  # fill the disk to the last byte
                    f.write(b"\0" * 65536)
                    f.flush()
            before = state(service)
            r = client.post("/api/datasets", files={"file": ("d.jsonl", io.BytesIO(ROWS * 200), "application/jsonl")})
            one_line_507(r, "is full")
            r = client.post("/api/tasks", json={"name": "refused", "config": {"preset": "cpu-demo"}})
            one_line_507(r, "is full")
            assert state(service) == before
            filler.unlink()
            r = client.post("/api/datasets", files={"file": ("d.jsonl", io.BytesIO(ROWS), "application/jsonl")})
            assert r.status_code == 201, r.text


@pytest.mark.process  # mount and umount
def test_a_read_only_home_gives_507_and_changes_nothing(home, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    service = in_memory(home, in_server=True)
    queued = service.store.create_task(
        name="waiting", model="builtin:tiny", dataset="builtin:sample", config={}, tasks_root=service.home.tasks
    )
    queued.dir.path.mkdir()
    load_or_create_token(service.home)  # made at the studio's first start, before the home went read-only
    with mounted("bind", home):
        if not _mount("-o", "remount,ro,bind", str(home)):
            pytest.skip("cannot remount read-only here")
        with api_client(service) as client:
            before = state(service)
            one_line_507(client.post("/api/datasets", files={"file": ("d.jsonl", io.BytesIO(ROWS))}), "is read-only")
            r = client.post("/api/tasks", json={"name": "refused", "config": {"preset": "cpu-demo"}})
            one_line_507(r, "is read-only")
            one_line_507(client.post(f"/api/tasks/{queued.id}/cancel"), "is read-only")
            assert state(service) == before
    assert service.store.get(queued.id).status == "queued"


def test_an_injected_failure_while_writing_the_task_leaves_no_row(home, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    service = in_memory(home, in_server=True)
    before = state(service)

    def full(*_a: object, **_k: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("ftstudio.studio.service.write_json_atomic", full)
    with api_client(service) as client:
        r = client.post("/api/tasks", json={"name": "refused", "config": {"preset": "cpu-demo"}})
    one_line_507(r, "is full")
    assert state(service) == before
    monkeypatch.setattr(os, "link", full)  # how an upload takes its final name
    with api_client(service) as client:
        r = client.post("/api/datasets", files={"file": ("d.jsonl", io.BytesIO(ROWS))})
    one_line_507(r, "is full")
    assert state(service) == before
