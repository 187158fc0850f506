"""A GGUF export as a job of its own, started from the page or the API (`python -m ftstudio.training.exportjob`).

One job per task and quantization; its record and its result live in the task's folder:

    TASK_DIR/exports/gguf-q4_k_m.json        the record: status, the progress line, the error, times
    TASK_DIR/exports/gguf-q4_k_m.cancel      written by the studio before it signals a cancel
    TASK_DIR/exports/gguf-q4_k_m.log         the job's own output and llama.cpp's
    TASK_DIR/exports/gguf-q4_k_m/            the finished export (gguf.py), present only when whole

The job is a detached process, so it goes on across a restart of the studio. Jobs wait their turn on a
lock under the data home, one export at a time on the machine, and run at a lower priority than training
(nice 10): a training run beside an export slows little. It ends `completed`, `failed` (the error says why
and what to do) or `cancelled`. A SIGTERM with no cancel file (a shutdown) ends it `failed`, saying it was
stopped, so a person knows to start it again; the studio marks a job whose process is gone `failed` too.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any

from ftstudio.errors import UserError
from ftstudio.home import read_json, write_json_atomic

EXPORTS_DIR = "exports"
STATUSES = ("queued", "running", "completed", "failed", "cancelled")
FINAL = ("completed", "failed", "cancelled")
LOCK = "exports.lock"


def job_id(quant: str) -> str:
    return f"gguf-{quant}"


def paths(task_dir: Path, job: str) -> dict[str, Path]:
    base = task_dir / EXPORTS_DIR
    return {
        "record": base / f"{job}.json",
        "cancel": base / f"{job}.cancel",
        "log": base / f"{job}.log",
        "folder": base / job,
    }


def read(task_dir: Path, job: str) -> dict[str, Any] | None:
    record = read_json(paths(task_dir, job)["record"])
    return record if isinstance(record, dict) else None


class _Stopped(BaseException):
    """A SIGTERM: end the export now (gguf.py stops llama.cpp and removes what it had written)."""


def _on_term(signum: int, frame: FrameType | None) -> None:
    raise _Stopped()


def run(task_dir: Path, job: str, home: Path) -> int:
    from ftstudio.training.gguf import export_gguf

    where = paths(task_dir, job)
    record = read(task_dir, job) or {}
    signal.signal(signal.SIGTERM, _on_term)

    def update(**fields: Any) -> None:
        record.update(fields)
        write_json_atomic(where["record"], record)

    try:
        update(status="queued", progress="waits for the export before it to finish", pid=os.getpid())
        (home / LOCK).touch()
        with (home / LOCK).open("rb") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one export at a time: each holds a whole model in memory
            os.nice(10)  # training comes first
            update(status="running", progress="starting", started=time.time())
            export_gguf(
                record["task"], record["task_name"], task_dir, where["folder"], record["quant"], home,
                wall_s=record.get("wall_s"), progress=lambda line: update(progress=line),
            )  # fmt: skip
        manifest = read_json(where["folder"] / "export.json") or {}
        update(status="completed", progress="done", ended=time.time(), manifest=manifest)
        return 0
    except BaseException as e:
        # The cancel file first: a cancel's signal may reach llama.cpp's step before this process.
        if where["cancel"].exists():
            update(status="cancelled", progress="cancelled", ended=time.time())
        elif isinstance(e, _Stopped):
            update(status="failed", error="the export was stopped (a shutdown?) before it finished; start it again",
                   ended=time.time())  # fmt: skip
        elif isinstance(e, UserError):
            update(status="failed", error=str(e), ended=time.time())
        else:
            update(status="failed", error=f"the export failed: {type(e).__name__}: {e}"[:500], ended=time.time())
            raise
        return 1


if __name__ == "__main__":
    if len(sys.argv) != 4:
        raise SystemExit("usage: python -m ftstudio.training.exportjob TASK_DIR JOB HOME")
    print(json.dumps({"job": sys.argv[2], "pid": os.getpid()}), flush=True)
    raise SystemExit(run(Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])))
