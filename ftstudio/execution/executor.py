"""Where a task's runner runs. `LocalExecutor` starts it on this machine; cluster
schedulers (Slurm, Ray Jobs) implement the same small protocol later.

The executor only starts and signals runners and says what it sees; deciding
what a sighting means for the task's state is the supervisor's job.

`poll` reports process identity alone; the heartbeat file is not its business.
The lifecycle combines the two (`lifecycle.decide`, fed by the supervisor),
because what a stale beat means depends on what identity says: nothing for a
live process (a laptop that slept, a full disk), the end for one that cannot
be checked. Every executor gets that rule, in one table-tested place, and an
executor whose pids mean nothing here (a cluster) just answers UNKNOWN.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

import psutil

from ftstudio.errors import LaunchError
from ftstudio.execution.facts import Liveness, SchedulerWord
from ftstudio.execution.procs import TASK_ENV, Identity, boot_id, check, kill_tagged, tagged, wait_gone
from ftstudio.home import TaskDir, read_json


@dataclass(frozen=True)
class Launch:
    """What the store records about a started runner."""

    pid: int
    start_time: float
    boot_id: str
    pgid: int
    job_id: str | None = None
    """A cluster scheduler's job id (Slurm); its pid fields are 0, and its state stands in for identity."""


class Executor(Protocol):
    name: str
    """Recorded with each task it launches (the store's `executor` column)."""
    cluster: str
    """The cluster scheduler it submits to ("slurm"); empty for this machine, where pids mean something."""
    on_exit: Callable[[], None] | None
    """Called (from any thread) when a runner this executor started has ended, if it can tell."""

    def submit(self, task: TaskDir, *, attempt: int, env: Mapping[str, str] | None = None) -> Launch:
        """Start the task dir's runner for `attempt`, detached from the studio, with `env` added to its
        environment (the GPUs it was granted); raise LaunchError if it cannot."""
        ...

    def poll(self, task: TaskDir, launch: Launch | None) -> Liveness:
        """Identity of the runner in `launch` (else launch.json), never the heartbeat; UNKNOWN when it cannot tell."""
        ...

    def signal(self, task: TaskDir, launch: Launch | None, sig: int) -> bool:
        """Send `sig` to the runner if it is still ours and alive; whether it was sent."""
        ...

    def kill_all(self, task_id: str) -> int:
        """SIGKILL every process of the task (the runner and whatever it left); how many."""
        ...

    def signal_all(self, task_id: str, sig: int, *, spare: int | None = None) -> int:
        """Send `sig` to every process of the task but the pid `spare` (freeze, thaw); how many."""
        ...

    def stop(self, task: TaskDir, launch: Launch | None, task_id: str, *, grace: float) -> int:
        """SIGTERM, up to `grace` seconds for the task to end, then `kill_all`; how many were killed. Blocks."""
        ...

    def word(self, task: TaskDir, launch: Launch) -> SchedulerWord | None:
        """A cluster scheduler's word on how the job ended (asked only when `cluster` is set); None here."""
        ...


class LocalExecutor:
    """Runs `python -m ftstudio.runner DIR` as a detached process on this machine."""

    name = "local"
    cluster = ""

    def __init__(self, trainer_module: str | None = None) -> None:
        # FTSTUDIO_TRAINER_MODULE is set by whoever starts the studio (the tests, to substitute
        # a scripted trainer); the runner accepts only a dotted module name.
        self.trainer_module = trainer_module or os.environ.get("FTSTUDIO_TRAINER_MODULE") or "ftstudio.train"
        # Each runner this process starts has a thread blocked in waitpid: it collects the exit
        # status at once, so no zombie lingers while we live, and tells `on_exit`, so the supervisor
        # reads the exit record now instead of at its next look. (Plain pids, not Popen objects:
        # those complain when dropped while running, and outliving us is the point.)
        self.on_exit: Callable[[], None] | None = None

    def submit(self, task: TaskDir, *, attempt: int, env: Mapping[str, str] | None = None) -> Launch:
        """Start the runner; `env` is added to its environment (the GPUs it was granted)."""
        argv = [sys.executable, "-m", "ftstudio.runner", str(task.path), "--attempt", str(attempt)]
        if self.trainer_module != "ftstudio.train":
            argv += ["--module", self.trainer_module]
        env = {**os.environ, **(env or {}), TASK_ENV: task.path.name}  # the runner is tagged too
        try:
            log_fd = os.open(task.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                pid = os.posix_spawn(
                    sys.executable,
                    argv,
                    env,
                    file_actions=[
                        (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
                        (os.POSIX_SPAWN_DUP2, log_fd, 1),
                        (os.POSIX_SPAWN_DUP2, log_fd, 2),
                    ],
                    setsid=True,  # its own session: no SIGHUP/SIGINT from the studio's terminal or group
                )
            finally:
                os.close(log_fd)
        except OSError as e:
            raise LaunchError(f"could not start the training process: {e}") from e
        try:
            # Before the waiter can collect it: until then its pid cannot be anyone else's.
            start = psutil.Process(pid).create_time()
        except psutil.NoSuchProcess:
            # It died at once; the exit record (or its absence) will tell the supervisor why.
            start = time.time()
        threading.Thread(target=self._wait, args=(pid,), name=f"runner-{pid}", daemon=True).start()
        return Launch(pid=pid, start_time=start, boot_id=boot_id(), pgid=pid)

    def _wait(self, pid: int) -> None:
        with contextlib.suppress(ChildProcessError):  # already collected: the same news
            os.waitpid(pid, 0)
        if self.on_exit:
            self.on_exit()

    def poll(self, task: TaskDir, launch: Launch | None) -> Liveness:
        if launch is None:
            recorded = read_json(task.launch)
            if not recorded:
                return Liveness.UNKNOWN
            launch = Launch(recorded["pid"], recorded["start_time"], recorded["boot_id"], recorded["pgid"])
        # No command-line check here: between fork and exec a fresh runner still shows its
        # launcher's command line. pid + start time + boot id is the identity.
        return check(Identity(launch.pid, launch.start_time, launch.boot_id))

    def signal(self, task: TaskDir, launch: Launch | None, sig: int) -> bool:
        """Signal the runner (it forwards to the trainer), but only if it is still ours."""
        if launch is None or self.poll(task, launch) != Liveness.ALIVE:
            return False
        try:
            os.kill(launch.pid, sig)
            return True
        except ProcessLookupError:
            return False

    def kill_all(self, task_id: str) -> int:
        return kill_tagged(task_id, signal.SIGKILL)

    def signal_all(self, task_id: str, sig: int, *, spare: int | None = None) -> int:
        """Send `sig` to every process tagged with the task but `spare` (freeze and thaw spare the runner, so it
        keeps beating and can still record the trainer's end). Returns how many were signalled."""
        count = 0
        for proc in tagged(task_id):
            if proc.pid == spare:
                continue
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                proc.send_signal(sig)
                count += 1
        return count

    def word(self, task: TaskDir, launch: Launch) -> SchedulerWord | None:
        return None  # no scheduler: process identity and the exit record say it all

    def stop(self, task: TaskDir, launch: Launch | None, task_id: str, *, grace: float) -> int:
        """Cancel's escalation: SIGTERM to the runner (it forwards it), up to `grace` seconds for the task to
        end, then SIGKILL to every process still tagged with it (a trainer ignoring SIGTERM, a grandchild in
        its own session). Returns how many were killed. Blocks: callers that must not wait run it in a thread."""
        self.signal(task, launch, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and not task.exit.exists() and tagged(task_id):
            time.sleep(0.1)
        if not tagged(task_id):
            return 0
        killed = self.kill_all(task_id)
        wait_gone(task_id, 5.0)
        return killed
