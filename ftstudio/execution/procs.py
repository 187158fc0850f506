"""Process identity: is the process we launched still the one alive under that pid?

A bare pid is not an identity (`os.kill(pid, 0)` is true for zombies and for a
pid the kernel handed to someone else). Ours is pid + process start time +
boot id, plus a look at the command line, so a reused pid is never adopted and
a zombie never counts as alive.
"""

from __future__ import annotations

import functools
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from ftstudio.execution.facts import Liveness
from ftstudio.fence import ATTEMPT_ENV

TASK_ENV = "FTSTUDIO_TASK_ID"


def boot_id() -> str:
    """This boot of the machine. FTSTUDIO_BOOT_ID overrides it: the reboot tests use it to
    simulate a machine that came back up, which no test could do for real."""
    return os.environ.get("FTSTUDIO_BOOT_ID") or _kernel_boot_id()


@functools.cache
def _kernel_boot_id() -> str:
    # Read once: it cannot change while this process lives, and the supervisor asks often.
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        # Not Linux: the boot time is the next best thing.
        return f"boot-{int(psutil.boot_time())}"


@dataclass(frozen=True)
class Identity:
    pid: int
    start_time: float
    boot_id: str

    @classmethod
    def of(cls, pid: int) -> Identity:
        return cls(pid, psutil.Process(pid).create_time(), boot_id())

    def to_json(self) -> dict[str, Any]:
        return {"pid": self.pid, "start_time": self.start_time, "boot_id": self.boot_id}


def check(ident: Identity, *, marker: str | None = None) -> Liveness:
    """How the launched process is doing. `marker` must appear in its command line if readable."""
    if ident.boot_id != boot_id():
        return Liveness.REBOOTED
    try:
        proc = psutil.Process(ident.pid)
        if abs(proc.create_time() - ident.start_time) > 0.05:
            return Liveness.REUSED
        if proc.status() == psutil.STATUS_ZOMBIE:
            return Liveness.DEAD
        if marker is not None:
            try:
                if not any(marker in part for part in proc.cmdline()):
                    return Liveness.REUSED
            except psutil.AccessDenied:
                pass  # the start time already matched; a hidden cmdline is no reason to doubt it
        return Liveness.ALIVE
    except psutil.NoSuchProcess:
        return Liveness.DEAD
    except (psutil.AccessDenied, OSError):
        return Liveness.UNKNOWN


def tagged(task_id: str, attempt: int | None = None) -> list[psutil.Process]:
    """Every live process of ours whose environment carries FTSTUDIO_TASK_ID=task_id (the runner tags all
    descendants); with `attempt`, only the training processes of that attempt (FTSTUDIO_ATTEMPT, set by its
    runner). Ours: run by this process's user. Anyone can set an environment variable, so another user's
    process that claims a task is never counted (it would hold DELETE at 409) nor signalled by a cancel or
    a freeze, which a studio run as root could otherwise do to it."""
    found = []
    me = os.getuid()
    # Asked of each process, not through process_iter's `info`: psutil shares its Process objects between
    # threads, and a process_iter with other attributes in another thread replaces their `info` (a KeyError).
    for proc in psutil.process_iter():
        try:
            if proc.uids().real != me or proc.status() == psutil.STATUS_ZOMBIE:
                continue
            env = proc.environ()
            if env.get(TASK_ENV) == task_id and (attempt is None or env.get(ATTEMPT_ENV) == str(attempt)):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, OSError):
            continue
    return found


def kill_tagged(task_id: str, sig: int = signal.SIGKILL) -> int:
    """Signal every process tagged with the task; returns how many were signalled."""
    procs = tagged(task_id)
    for proc in procs:
        try:
            proc.send_signal(sig)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return len(procs)


def wait_gone(task_id: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not tagged(task_id):
            return True
        time.sleep(0.1)
    return not tagged(task_id)
