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

SIGUSR1 pauses (see `ftstudio.pause`). It goes to the trainer, or under torchrun
to every worker rank and never to the torchrun agent (SIGUSR1's default action
would kill it). A process still starting Python has no handler yet and would be
killed by it, so the pause is held and forwarded once the process catches it.
A `resources.processes` > 1 task runs under `torchrun --standalone` with
`--max-restarts 0`: restarting is the studio's decision (resume from the newest
complete checkpoint as the next attempt), not torchrun's.
"""

from __future__ import annotations

import argparse
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
from ftstudio.pause import EXIT_SUSPENDED, PAUSE_SIGNAL, catches_pause
from ftstudio.procs import TASK_ENV, boot_id, die_with_parent

HEARTBEAT_S = 2.0
PAUSE_RETRY_S = 0.1  # while a pause waits for the trainer's handler
EXIT_LOCKED = 75  # EX_TEMPFAIL: another runner owns this task dir
MODULE_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def log(msg: str) -> None:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    print(f"[{stamp}] [ftstudio runner] {msg}", flush=True)


def processes_of(task: TaskDir) -> int:
    spec = read_json(task.spec) or {}
    return int((spec.get("config") or {}).get("resources", {}).get("processes", 1) or 1)


def trainer_command(task: TaskDir, module: str, resume: str | None = None) -> list[str]:
    tail = [str(task.spec), *(["--resume", resume] if resume else [])]
    processes = processes_of(task)
    if processes > 1:
        return [
            sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
            "--max-restarts=0", "-m", module, *tail,
        ]  # fmt: skip
    return [sys.executable, "-m", module, *tail]


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


def last_event(task: TaskDir, since: int) -> dict[str, Any] | None:
    """The last event written after byte offset `since` (this attempt's), if any."""
    try:
        size = task.events.stat().st_size
    except OSError:
        return None
    chunk = events.read_from(task.events, max(since, size - (256 << 10)))
    return chunk.events[-1] if chunk.events else None


def paused_record(suspended: dict[str, Any] | None) -> dict[str, Any]:
    step = suspended.get("step") if suspended else None
    total = suspended.get("total_steps") if suspended else None
    checkpoint = suspended.get("checkpoint") if suspended else None
    of_total = f"/{total}" if isinstance(total, int) else ""
    if checkpoint and step:
        reason = f"paused at step {step}{of_total} after saving {checkpoint}"
    elif checkpoint:
        reason = f"paused before training continued; it will resume from {checkpoint}"
    else:
        reason = "paused before the first training step; nothing was saved, so it will start from the beginning"
    return {"outcome": Outcome.PAUSED, "reason": reason, "step": step, "checkpoint": checkpoint}


def outcome_of(
    returncode: int,
    stop_signal: int | None,
    task: TaskDir,
    *,
    suspended: dict[str, Any] | None = None,
    distributed: bool = False,
) -> dict[str, Any]:
    """What exit.json says. `suspended`: this attempt's `suspended` event, if it wrote one; under
    torchrun (`distributed`) the ranks exit 0 after a pause and that event is the only sign of it."""
    if stop_signal is None and (
        returncode == EXIT_SUSPENDED or (distributed and returncode == 0 and suspended is not None)
    ):
        return paused_record(suspended)
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


def run(task: TaskDir, module: str = "ftstudio.train", attempt: int = 1, resume: str | None = None) -> int:
    lock_fd = os.open(task.lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        log(f"another runner is already running task {task.path.name}; this one refuses to start")
        return EXIT_LOCKED

    task_id = task.path.name
    env = {**os.environ, TASK_ENV: task_id, "PYTHONUNBUFFERED": "1"}
    if resume is None and attempt > 1:
        # Every later attempt (resume, retry, extend) continues from the newest complete checkpoint;
        # with none, the trainer starts from the beginning.
        resume = "auto"
    argv = trainer_command(task, module, resume)
    distributed = processes_of(task) > 1
    try:
        events_start = task.events.stat().st_size  # this attempt's events come after it
    except OSError:
        events_start = 0
    log(f"starting training for task {task_id} (attempt {attempt}): {' '.join(argv[1:])}")
    limit = memlimit.start(read_json(task.spec) or {}, task_id, log)  # memory limit: memlimit.py
    trainer = subprocess.Popen(
        limit.command(argv),
        cwd=task.path,
        env=env,
        stdin=subprocess.DEVNULL,
        preexec_fn=lambda: (die_with_parent(), limit.in_child()),
        close_fds=True,
    )
    limit.started(trainer.pid)

    stop: list[int] = []

    def forward(signum: int, _frame: object) -> None:
        if not stop:
            log(f"received {signal.Signals(signum).name}; stopping the training process")
        stop.append(signum)
        try:
            trainer.send_signal(signum)
        except ProcessLookupError:
            pass

    pause = PauseForwarder(trainer, distributed, processes_of(task))

    def request_pause(_signum: int, _frame: object) -> None:
        if not pause.requested:
            log("received SIGUSR1; pausing at the next step boundary, after a checkpoint of that step")
        pause.requested = True
        pause.forward()

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(PAUSE_SIGNAL, request_pause)

    # Written once every handler is in place: the studio signals a runner only after launch.json exists
    # (SIGUSR1's default action would kill a runner still starting).
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

    returncode = _wait_beating(trainer, task, pause)
    over_limit = limit.finish()
    last = last_event(task, events_start)
    suspended = last if last and last.get("kind") == "suspended" else None
    record = {
        **outcome_of(returncode, stop[0] if stop else None, task, suspended=suspended, distributed=distributed),
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


class PauseForwarder:
    """Delivers a pause to the processes that train: the trainer, or torchrun's worker ranks."""

    def __init__(self, trainer: subprocess.Popen[bytes], distributed: bool, processes: int) -> None:
        self.trainer = trainer
        self.distributed = distributed
        self.processes = processes
        self.requested = False
        self.delivered: set[int] = set()

    def targets(self) -> list[int]:
        if not self.distributed:
            return [self.trainer.pid]
        try:
            return [p.pid for p in psutil.Process(self.trainer.pid).children()]  # the ranks, not the agent
        except psutil.Error:
            return []

    def pending(self) -> bool:
        """Requested but not yet delivered to every process that trains."""
        return self.requested and len(self.delivered) < (self.processes if self.distributed else 1)

    def forward(self) -> None:
        for pid in self.targets():
            # Not yet catching it means still starting Python: SIGUSR1 would kill it; try again shortly.
            if pid in self.delivered or catches_pause(pid) is False:
                continue
            try:
                os.kill(pid, PAUSE_SIGNAL)
                self.delivered.add(pid)
            except ProcessLookupError:
                pass


def _wait_beating(trainer: subprocess.Popen[bytes], task: TaskDir, pause: PauseForwarder) -> int:
    next_beat = 0.0
    while True:
        if time.monotonic() >= next_beat:
            _beat(task)
            next_beat = time.monotonic() + HEARTBEAT_S
        if pause.pending():
            pause.forward()
        timeout = PAUSE_RETRY_S if pause.pending() else max(0.0, next_beat - time.monotonic())
        try:
            return trainer.wait(timeout=timeout)
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
    parser.add_argument(
        "--resume",
        default=None,
        metavar="auto|PATH",
        help="passed to the trainer: auto = continue from the newest complete checkpoint (a fresh start if none)",
    )
    args = parser.parse_args(argv)
    if not MODULE_RE.fullmatch(args.module):
        parser.error(f"--module must be a dotted module name, got {args.module!r}")
    task = TaskDir(args.task_dir.resolve())
    if not task.spec.is_file():
        parser.error(f"{task.spec} does not exist")
    return run(task, args.module, args.attempt, args.resume)


if __name__ == "__main__":
    sys.exit(main())
