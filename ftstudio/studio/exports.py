"""The studio's side of export jobs (training/exportjob.py): starting one, listing them with their files,
cancelling, and reading back a job whose process is gone. The job writes its own record; the studio
writes only the process identity beside it (it is the one that knows it first), the cancel file, and
the verdict on a job that died without one.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

from ftstudio import taskfiles
from ftstudio.errors import Conflict, NotFound, ValidationError
from ftstudio.execution.facts import Liveness
from ftstudio.execution.procs import Identity, check
from ftstudio.home import read_json, write_json_atomic
from ftstudio.training.exportjob import EXPORTS_DIR, FINAL, job_id, paths, read
from ftstudio.training.gguf import MANIFEST, QUANTS, missing_tools

MARKER = "ftstudio.training.exportjob"
REGISTRY = "exports"
"""Under the data home: one file per export job not yet seen ended (TASK.JOB, holding the task folder), so the
queue lists them without reading every task's folder."""
FILES = ("Modelfile", "README.md", MANIFEST)
"""What an export folder holds beside its .gguf, and may be downloaded."""


def _identity_path(task_dir: Path, job: str) -> Path:
    return task_dir / EXPORTS_DIR / f"{job}.process.json"


def _alive(task_dir: Path, job: str) -> bool:
    ident = read_json(_identity_path(task_dir, job))
    if not isinstance(ident, dict):
        return False
    try:
        state = check(Identity(int(ident["pid"]), float(ident["start_time"]), str(ident["boot_id"])), marker=MARKER)
    except (KeyError, TypeError, ValueError):
        return False
    return state in (Liveness.ALIVE, Liveness.UNKNOWN)


def view(task_id: str, task_dir: Path, job: str) -> dict[str, Any] | None:
    """A job as the API shows it, with its files once completed; a job whose process is gone without saying
    how it ended is recorded `failed` here, with why."""
    record = read(task_dir, job)
    if record is None:
        return None
    if record.get("status") not in FINAL and not _alive(task_dir, job):
        # Read again now that the process is known gone: it may have written how it ended since the first read.
        record = read(task_dir, job) or record
        started = record.get("created", 0)
        # Without its identity yet, a job may be a moment old (start() writes it right after the spawn).
        known = _identity_path(task_dir, job).exists()
        if record.get("status") not in FINAL and (known or time.time() - float(started or 0) > 10):
            record.update(
                status="failed",
                ended=time.time(),
                error="the export's process ended without finishing (the machine restarted, or it was killed); "
                "start it again",
            )
            write_json_atomic(paths(task_dir, job)["record"], record)
    out = {k: record.get(k) for k in ("id", "format", "quant", "status", "progress", "error", "created", "started")}
    out["ended"] = record.get("ended")
    files: list[dict[str, Any]] = []
    out["files"] = files
    manifest = record.get("manifest") or {}
    if record.get("status") == "completed" and manifest.get("file"):
        folder = paths(task_dir, job)["folder"]
        for name in (manifest["file"], *FILES):
            try:
                size = (folder / name).stat().st_size
            except OSError:
                continue
            entry: dict[str, Any] = {
                "name": name,
                "bytes": size,
                "url": f"/api/tasks/{task_id}/exports/{job}/files/{name}",
            }
            if name == manifest["file"]:
                entry["sha256"] = manifest.get("sha256")
            files.append(entry)
        out["agreement"] = manifest.get("agreement")
        out["seconds"] = manifest.get("seconds")
    return out


def listing(task_id: str, task_dir: Path) -> list[dict[str, Any]]:
    jobs = [view(task_id, task_dir, job_id(q)) for q in QUANTS]
    return [j for j in jobs if j is not None]


def start(task: Any, task_dir: Path, home: Path, quant: str, wall_s: float | None) -> dict[str, Any]:
    """Start a GGUF export of `quant` as a detached process; its record, queued."""
    if quant not in QUANTS:
        raise ValidationError(f"quant must be one of {', '.join(QUANTS)}, not {str(quant)[:40]!r}")
    problem = missing_tools()
    if problem:
        raise Conflict(problem)
    job = job_id(quant)
    where = paths(task_dir, job)
    current = view(task.id, task_dir, job)
    if current and current["status"] not in FINAL:
        raise Conflict(
            f"task {task.id} is being exported to {quant} already ({current['status']}); wait for it, or cancel it"
        )
    if current and current["status"] == "completed" and where["folder"].exists():
        raise Conflict(
            f"task {task.id} has a {quant} export already; download it from the task view, or delete it "
            f"(DELETE /api/tasks/{task.id}/exports/{job}) to export again"
        )
    where["record"].parent.mkdir(exist_ok=True)
    where["cancel"].unlink(missing_ok=True)
    record = {
        "id": job, "format": "gguf", "quant": quant, "status": "queued", "progress": "starting",
        "task": task.id, "task_name": task.name, "wall_s": wall_s, "created": time.time(),
    }  # fmt: skip
    write_json_atomic(where["record"], record)
    with where["log"].open("ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", MARKER, str(task_dir), job, str(home)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "FTSTUDIO_EXPORT_OF": task.id},
        )  # fmt: skip
    try:
        write_json_atomic(_identity_path(task_dir, job), Identity.of(proc.pid).to_json())
    except Exception:  # it died at once: its record or the log says why
        pass
    registry = home / REGISTRY
    registry.mkdir(exist_ok=True)
    (registry / f"{task.id}.{job}").write_text(str(task_dir))
    # Reap it when it ends, so a finished job leaves no zombie under a studio that runs for weeks.
    threading.Thread(target=proc.wait, name=f"export-{task.id}-{job}", daemon=True).start()
    return view(task.id, task_dir, job) or record


def active(home: Path) -> list[dict[str, Any]]:
    """The export jobs queued or running on this machine, oldest first, for the queue beside training."""
    found = []
    registry = home / REGISTRY
    for entry in sorted(registry.iterdir()) if registry.is_dir() else []:
        task_id, _, job = entry.name.partition(".")
        try:
            job_view = view(task_id, Path(entry.read_text().strip()), job)
        except OSError:
            job_view = None
        if job_view is None or job_view["status"] in FINAL:
            entry.unlink(missing_ok=True)
            continue
        found.append(
            {"task": task_id, "job": job, **{k: job_view[k] for k in ("quant", "status", "progress", "created")}}
        )
    return sorted(found, key=lambda e: e["created"] or 0)


def cancel(task_id: str, task_dir: Path, job: str) -> dict[str, Any]:
    current = view(task_id, task_dir, job)
    if current is None:
        raise NotFound(f"task {task_id} has no export {job!r}")
    if current["status"] in FINAL:
        raise Conflict(f"the export {job} of task {task_id} is {current['status']} already; there is nothing to cancel")
    where = paths(task_dir, job)
    where["cancel"].write_text("cancel requested\n")
    ident = read_json(_identity_path(task_dir, job)) or {}
    if _alive(task_dir, job):
        try:
            os.killpg(int(ident["pid"]), signal.SIGTERM)  # the job and llama.cpp's step under it
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        now = view(task_id, task_dir, job)
        if now is None or now["status"] in FINAL:
            return now or current
        time.sleep(0.1)
    return view(task_id, task_dir, job) or current


def delete(task_id: str, task_dir: Path, job: str) -> None:
    import shutil

    current = view(task_id, task_dir, job)
    if current is None:
        raise NotFound(f"task {task_id} has no export {job!r}")
    if current["status"] not in FINAL:
        raise Conflict(f"the export {job} of task {task_id} is {current['status']}; cancel it first")
    where = paths(task_dir, job)
    shutil.rmtree(where["folder"], ignore_errors=True)
    for p in (where["record"], where["cancel"], where["log"], _identity_path(task_dir, job)):
        p.unlink(missing_ok=True)


def open_file(task_id: str, task_dir: Path, job: str, name: str) -> tuple[IO[bytes], int]:
    current = view(task_id, task_dir, job)
    names = [f["name"] for f in (current or {}).get("files", [])]
    if name not in names:
        raise NotFound(
            f"task {task_id} has no exported file {name!r} in {job!r}; available: {', '.join(names) or 'none'}"
        )
    opened = taskfiles.open_inside(task_dir, Path(EXPORTS_DIR) / job / name)
    if opened is None:
        raise NotFound(f"task {task_id} has no exported file {name!r}")
    return opened


def valid_job(job: str) -> str:
    if job not in {job_id(q) for q in QUANTS}:
        raise NotFound(f"no export {job[:40]!r}; exports are named {', '.join(job_id(q) for q in QUANTS)}")
    return job
