"""The runner: `python -m ftstudio.runner TASK_DIR`, the real parent of the trainer.

Started by an executor in a new session with stdin from /dev/null and
stdout/stderr appended to `training.log`, so nothing ties it to the studio: the
studio can die, restart or be upgraded while the runner keeps going.

It holds an exclusive lock on the task dir (a second runner refuses), writes
`launch.json`, tags every descendant with FTSTUDIO_TASK_ID, beats `heartbeat`,
forwards SIGTERM/SIGINT to the trainer, and when the trainer ends writes
`exit.json` atomically. The exit record is the only way the studio learns the
outcome; it never reads the log for that. The record says what happened to the
trainer; what that means for the task is `lifecycle.decide`'s to say.
"""

from __future__ import annotations

import argparse
import ctypes
import fcntl
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

from ftstudio import events, memlimit
from ftstudio.home import TaskDir, read_json, write_json_atomic
from ftstudio.lifecycle import Outcome
from ftstudio.procs import TASK_ENV, boot_id

HEARTBEAT_S = 2.0
EXIT_LOCKED = 75  # EX_TEMPFAIL: another runner owns this task dir
MODULE_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def log(msg: str) -> None:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    print(f"[{stamp}] [ftstudio runner] {msg}", flush=True)


def _die_with_parent() -> None:
    """In the trainer, before exec: if the runner is killed, take the trainer down too, so an
    orphan never keeps writing into a task the studio has already called dead."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def trainer_command(task: TaskDir, module: str) -> list[str]:
    spec = read_json(task.spec) or {}
    processes = int((spec.get("config") or {}).get("resources", {}).get("processes", 1) or 1)
    if processes > 1:
        return [
            sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
            "-m", module, str(task.spec),
        ]  # fmt: skip
    return [sys.executable, "-m", module, str(task.spec)]


def last_error(task: TaskDir) -> str | None:
    """The trainer's own one-line account of what went wrong, if it wrote one."""
    try:
        size = task.events.stat().st_size
    except OSError:
        return None
    chunk = events.read_from(task.events, max(0, size - (256 << 10)))
    for ev in reversed(chunk.events):
        if ev.get("kind") == "error" and isinstance(ev.get("message"), str):
            return ev["message"]
    return None


def outcome_of(returncode: int, stop_signal: int | None, task: TaskDir) -> dict[str, Any]:
    if returncode == 0:
        return {"outcome": Outcome.COMPLETED, "reason": "training finished and the adapter was saved"}
    if stop_signal is not None:
        name = signal.Signals(stop_signal).name
        return {"outcome": Outcome.CANCELLED, "reason": f"stopped on request ({name})"}
    message = last_error(task)
    if message:
        return {"outcome": Outcome.FAILED, "reason": message}
    if returncode < 0:
        name = signal.Signals(-returncode).name
        hint = " (often the system running out of memory)" if name == "SIGKILL" else ""
        return {
            "outcome": Outcome.FAILED,
            "reason": f"the training process was killed by {name}{hint}; see training.log",
        }
    return {
        "outcome": Outcome.FAILED,
        "reason": f"the training process exited with code {returncode}; see training.log",
    }


def run(task: TaskDir, module: str = "ftstudio.train", attempt: int = 1) -> int:
    lock_fd = os.open(task.lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        log(f"another runner is already running task {task.path.name}; this one refuses to start")
        return EXIT_LOCKED

    task_id = task.path.name
    env = {**os.environ, TASK_ENV: task_id, "PYTHONUNBUFFERED": "1"}
    argv = trainer_command(task, module)
    if attempt > 1:
        # Every later attempt (resume, retry, extend) continues from the newest complete checkpoint;
        # with none, the trainer starts from the beginning.
        argv += ["--resume", "auto"]
    log(f"starting training for task {task_id} (attempt {attempt}): {' '.join(argv[1:])}")
    limit = memlimit.start(read_json(task.spec) or {}, task_id, log)  # memory limit: memlimit.py
    trainer = subprocess.Popen(
        limit.command(argv),
        cwd=task.path,
        env=env,
        stdin=subprocess.DEVNULL,
        preexec_fn=lambda: (_die_with_parent(), limit.in_child()),
        close_fds=True,
    )
    limit.started(trainer.pid)

    me = psutil.Process()
    write_json_atomic(
        task.launch,
        {
            "pid": me.pid,
            "start_time": me.create_time(),
            "boot_id": boot_id(),
            "pgid": os.getpgid(0),
            "trainer_pid": trainer.pid,
            "argv": argv,
            "attempt": attempt,
            "started_at": time.time(),
            "memory_limit": limit.record(),
        },
    )

    stop: list[int] = []

    def forward(signum: int, _frame: object) -> None:
        if not stop:
            log(f"received {signal.Signals(signum).name}; stopping the training process")
        stop.append(signum)
        try:
            trainer.send_signal(signum)
        except ProcessLookupError:
            pass

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)

    returncode = _wait_beating(trainer, task)
    over_limit = limit.finish()
    record = {
        **outcome_of(returncode, stop[0] if stop else None, task),
        "exit_code": returncode if returncode >= 0 else None,
        "signal": signal.Signals(-returncode).name if returncode < 0 else None,
        "attempt": attempt,
        "finished_at": time.time(),
        "memory_limit": limit.record(),
    }
    if over_limit:  # the kill was the limit's, whatever the trainer managed to say before it
        record.update(outcome=Outcome.FAILED, reason=memlimit.exceeded_reason(limit.size or 0))
    write_json_atomic(task.exit, record)
    log(f"training {record['outcome']}: {record['reason']}")
    return 0


def _wait_beating(trainer: subprocess.Popen[bytes], task: TaskDir) -> int:
    while True:
        _beat(task)
        try:
            return trainer.wait(timeout=HEARTBEAT_S)
        except subprocess.TimeoutExpired:
            continue


def _beat(task: TaskDir) -> None:
    tmp = task.heartbeat.with_suffix(".tmp")
    try:
        tmp.write_text(f"{time.time():.3f}\n")
        os.replace(tmp, task.heartbeat)
    except OSError as e:  # a full disk must not kill the training
        log(f"could not write heartbeat: {e}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ftstudio.runner", description=__doc__.splitlines()[0])
    parser.add_argument("task_dir", type=Path)
    parser.add_argument("--module", default="ftstudio.train", help="trainer module (tests substitute a scripted one)")
    parser.add_argument("--attempt", type=int, default=1)
    args = parser.parse_args(argv)
    if not MODULE_RE.fullmatch(args.module):
        parser.error(f"--module must be a dotted module name, got {args.module!r}")
    task = TaskDir(args.task_dir.resolve())
    if not task.spec.is_file():
        parser.error(f"{task.spec} does not exist")
    return run(task, args.module, args.attempt)


if __name__ == "__main__":
    sys.exit(main())
