"""An executor without processes, for tests: a testing aid shipped with the package, as httpx ships
`MockTransport`, so logic above the executor (the store, lifecycle, queue, supervisor, service and the
HTTP routes) is tested in milliseconds, with no process, no sleep and no wait.

`InMemoryExecutor` implements the `Executor` protocol (executor.py). Each `submit` makes an
`InMemoryRunner` that writes into the task dir what the real runner writes (launch.json, heartbeat,
events.jsonl, training.log, exit.json), so the real store and supervisor read real files, while the test
says what the "process" does: report progress, finish, die without a record, hang, ignore SIGTERM, stop
beating, hide its identity. One in-memory runner stands for the runner and its trainer: SIGTERM stops it
as cancelled, SIGUSR1 pauses it (a paused exit record), SIGSTOP/SIGCONT to the task's processes but the
runner freeze and thaw its trainer.

`ManualClock` is the time the runners stamp and the supervisor reads; advancing it makes live runners
beat, so a stalled or lost heartbeat is a runner told to stop beating and the clock moved past it::

    clock = ManualClock()
    executor = InMemoryExecutor(clock, on_submit=lambda runner: runner.complete(steps=3))
    service = Service(home, executor=executor)
    service.supervisor.clock = clock

`on_submit`, like MockTransport's handler, is called with every new runner: a test that needs every task
to end the same way says so once. The product never imports this module (import-linter checks it); what
it stands in for, the real runner's processes, has its own tests with real processes.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ftstudio.errors import LaunchError
from ftstudio.execution.executor import Executor, Launch
from ftstudio.execution.facts import Cause, Liveness, Outcome, SchedulerWord
from ftstudio.home import TaskDir, read_json, write_json_atomic

BOOT = "in-memory-boot-1"
COMPLETED = "training finished and the adapter was saved"  # the real runner's reason for a clean end


class ManualClock:
    """Wall-clock seconds that move only when the test says (`Supervisor(clock=...)`)."""

    def __init__(self, start: float | None = None) -> None:
        # From the real time by default: the store stamps `started_at` with the real clock.
        self.now = time.time() if start is None else start
        self._listeners: list[Callable[[float], None]] = []

    def __call__(self) -> float:
        return self.now

    def listen(self, listener: Callable[[float], None]) -> None:
        """Call `listener(now)` after every advance (what runs "meanwhile": heartbeats)."""
        self._listeners.append(listener)

    def advance(self, seconds: float) -> None:
        self.now += seconds
        for listener in list(self._listeners):
            listener(self.now)


@dataclass
class InMemoryRunner:
    """One runner "process" and its trainer: alive until the test (or a signal) ends it."""

    executor: InMemoryExecutor
    task: TaskDir
    attempt: int
    pid: int
    start_time: float
    alive: bool = True
    beating: bool = True
    ignores_sigterm: bool = False
    env: Mapping[str, str] = field(default_factory=dict)
    """What submit added to its environment (the GPUs it was granted)."""
    frozen: bool = False
    """Its trainer is stopped (SIGSTOP to the task's processes but the runner)."""
    hidden: bool = False
    """`poll` cannot tell (a permission error, an executor whose pids mean nothing here); signals
    go only to a runner known to be ours, but `kill_all` still reaches it, as a cluster's cancel would."""
    signals: list[int] = field(default_factory=list)
    """Every signal delivered to it, in order."""

    @property
    def task_id(self) -> str:
        return self.task.path.name

    # -- what the test makes it do -------------------------------------------

    def emit(self, kind: str, **fields: Any) -> None:
        """Append an event to events.jsonl as the trainer would, stamped with the clock's time."""
        event = {"kind": kind, "ts": round(self.executor.clock(), 3), **fields}
        with open(self.task.events, "a", encoding="utf-8") as f:
            f.write(json.dumps(event, separators=(",", ":")) + "\n")

    def log(self, text: str) -> None:
        """Append a line to training.log, where the real runner sends its trainer's output."""
        with open(self.task.log, "a", encoding="utf-8") as f:
            f.write(text.rstrip("\n") + "\n")

    def progress(self, step: int, total_steps: int, **fields: Any) -> None:
        """A progress event (the first one makes the task training)."""
        self.emit("progress", step=step, total_steps=total_steps, **fields)

    def train(self, steps: int, *, total_steps: int | None = None, start: int = 1) -> None:
        """Steps `start`..`steps` as the trainer reports them: a progress event (epoch, loss, tokens) and a
        log line each; `total_steps` defaults to `steps`."""
        total = total_steps or steps
        for step in range(start, steps + 1):
            self.progress(step, total, epoch=step / total, total_epochs=1, loss=2.0 / step, lr=1e-3, tokens=1000 * step)
            self.log(f"step {step}/{total}")

    def complete(self, steps: int = 0) -> None:
        """Train `steps` steps (none: only the end), save the adapter and end completed, as a clean run does."""
        if steps:
            self.emit("train_begin", total_steps=steps, total_epochs=1)
            self.train(steps)
        self.task.adapter.mkdir(exist_ok=True)
        (self.task.adapter / "adapter_config.json").write_text("{}")
        if steps:
            self.emit("train_end", step=steps, total_steps=steps)
        self.finish(Outcome.COMPLETED, COMPLETED)

    def fail(self, reason: str, exit_code: int = 1) -> None:
        """End failed the way a trainer that exits non-zero does: an error event, then the runner's record."""
        self.emit("error", message=reason, error_type="InMemory")
        self.finish(Outcome.FAILED, reason, exit_code=exit_code)

    def finish(self, outcome: Outcome, reason: str = "", *, exit_code: int | None = 0) -> None:
        """End with an exit record, written atomically like the runner's, then exit."""
        record: dict[str, Any] = {
            "outcome": outcome.value,
            "reason": reason,
            "exit_code": exit_code,
            "signal": None,
            "attempt": self.attempt,
            "finished_at": self.executor.clock(),
        }
        write_json_atomic(self.task.exit, record)
        self._end()

    def die(self) -> None:
        """Vanish without an exit record (a SIGKILL from outside, a reboot): the machine's doing."""
        self._end()

    def trainer_killed(self, signum: int = signal.SIGKILL) -> None:
        """Its trainer was killed by a signal nobody here sent (the OOM killer's way), and the runner says so:
        interrupted by the run itself, as the real runner's record of a trainer's negative exit code."""
        name = signal.Signals(signum).name
        write_json_atomic(
            self.task.exit,
            {
                "outcome": Outcome.INTERRUPTED.value,
                "reason": f"the training process was killed by {name}; see training.log",
                "exit_code": -signum,
                "signal": None,
                "attempt": self.attempt,
                "finished_at": self.executor.clock(),
                "cause": Cause.RUN.value,
            },
        )
        self._end()

    def hang(self) -> None:
        """Alive but stuck: no more beats, and SIGTERM is not acted on."""
        self.beating = False
        self.ignores_sigterm = True

    def stop_beating(self) -> None:
        self.beating = False

    def ignore_sigterm(self) -> None:
        self.ignores_sigterm = True

    def hide(self) -> None:
        self.hidden = True

    def beat(self) -> None:
        """Touch the heartbeat at the clock's time (the supervisor reads its mtime)."""
        now = self.executor.clock()
        self.task.heartbeat.write_text(f"{now:.3f}\n")
        os.utime(self.task.heartbeat, (now, now))

    # -- what the executor does to it ----------------------------------------

    def deliver(self, sig: int) -> None:
        self.signals.append(sig)
        if sig == signal.SIGKILL:
            self._end()
        elif sig == signal.SIGTERM and not self.ignores_sigterm:
            # The runner forwards it, the trainer stops, and the runner records the stop.
            self.finish(Outcome.CANCELLED, "stopped on request (SIGTERM)", exit_code=None)
        elif sig == signal.SIGUSR1 and not self.ignores_sigterm:
            # Pause: the trainer saves a checkpoint at its next step and exits; the runner records it.
            self.finish(Outcome.PAUSED, "paused on request", exit_code=None)
        elif sig in (signal.SIGSTOP, signal.SIGCONT):
            self.frozen = sig == signal.SIGSTOP

    def _end(self) -> None:
        if not self.alive:
            return
        self.alive = False
        if self.executor.on_exit:
            self.executor.on_exit()


class InMemoryExecutor:
    """The `Executor` protocol in memory; `runner(task_id)` is the task's latest runner."""

    name = "in-memory"
    cluster = ""

    def __init__(
        self, clock: ManualClock | None = None, *, on_submit: Callable[[InMemoryRunner], None] | None = None
    ) -> None:
        self.clock = clock or ManualClock()
        self.on_submit = on_submit
        """Called with every runner `submit` makes, once its launch.json and first beat are written."""
        self.on_exit: Callable[[], None] | None = None
        self.boot_id = BOOT
        self.runners: dict[int, InMemoryRunner] = {}  # by pid
        self.refuse: str | None = None
        """When set, the next submit raises LaunchError with this message."""
        self.stops: list[tuple[str, float]] = []  # (task id, grace) of every `stop`
        self._pids = itertools.count(40_000)
        self.clock.listen(self._tick)

    def runner(self, task_id: str) -> InMemoryRunner:
        """The task's latest runner (KeyError: none was submitted)."""
        found = [r for r in self.runners.values() if r.task_id == task_id]
        if not found:
            raise KeyError(f"no runner was submitted for task {task_id}")
        return found[-1]

    def alive(self) -> list[InMemoryRunner]:
        """The runners not yet ended, in the order they were submitted."""
        return [r for r in self.runners.values() if r.alive]

    def reboot(self) -> None:
        """The machine restarted: every runner is gone without a record, and the boot id changed."""
        for r in self.runners.values():
            r.alive = False
        self.boot_id = f"{self.boot_id}+1"

    def _tick(self, now: float) -> None:
        for r in self.runners.values():
            if r.alive and r.beating:
                r.beat()

    # -- the protocol ----------------------------------------------------------

    def submit(self, task: TaskDir, *, attempt: int, env: Mapping[str, str] | None = None) -> Launch:
        if self.refuse is not None:
            message, self.refuse = self.refuse, None
            raise LaunchError(message)
        pid, now = next(self._pids), self.clock()
        runner = InMemoryRunner(self, task, attempt, pid, now, env=dict(env or {}))
        self.runners[pid] = runner
        write_json_atomic(
            task.launch,
            {
                "pid": pid,
                "start_time": now,
                "boot_id": self.boot_id,
                "pgid": pid,
                "attempt": attempt,
                "started_at": now,
            },
        )
        runner.beat()
        if self.on_submit is not None:
            self.on_submit(runner)
        return Launch(pid, now, self.boot_id, pid)

    def word(self, task: TaskDir, launch: Launch) -> SchedulerWord | None:
        return None

    def poll(self, task: TaskDir, launch: Launch | None) -> Liveness:
        if launch is None:
            recorded = read_json(task.launch)
            if not recorded:
                return Liveness.UNKNOWN
            launch = Launch(recorded["pid"], recorded["start_time"], recorded["boot_id"], recorded["pgid"])
        if launch.boot_id != self.boot_id:
            return Liveness.REBOOTED
        runner = self.runners.get(launch.pid)
        if runner is None:
            return Liveness.DEAD
        if runner.hidden:
            return Liveness.UNKNOWN
        return Liveness.ALIVE if runner.alive else Liveness.DEAD

    def signal(self, task: TaskDir, launch: Launch | None, sig: int) -> bool:
        if launch is None or self.poll(task, launch) != Liveness.ALIVE:
            return False
        self.runners[launch.pid].deliver(sig)
        return True

    def kill_all(self, task_id: str) -> int:
        alive = [r for r in self.runners.values() if r.task_id == task_id and r.alive]
        for r in alive:
            r.deliver(signal.SIGKILL)
        return len(alive)

    def signal_all(self, task_id: str, sig: int, *, spare: int | None = None) -> int:
        """Every process of the task but `spare`: a spared runner's trainer alone gets it (frozen, thawed)."""
        count = 0
        for r in self.runners.values():
            if r.task_id == task_id and r.alive:
                if r.pid == spare and sig in (signal.SIGSTOP, signal.SIGCONT):
                    r.frozen = sig == signal.SIGSTOP
                else:
                    r.deliver(sig)
                count += 1
        return count

    def stop(self, task: TaskDir, launch: Launch | None, task_id: str, *, grace: float) -> int:
        """LocalExecutor.stop's escalation, with the grace passed on the clock instead of slept."""
        self.stops.append((task_id, grace))
        self.signal(task, launch, signal.SIGTERM)
        if not any(r.task_id == task_id and r.alive for r in self.runners.values()):
            return 0
        self.clock.advance(grace)
        return self.kill_all(task_id)


def _keeps_to_the_protocol(executor: InMemoryExecutor) -> Executor:
    """Never called: mypy checks here that an InMemoryExecutor is an `Executor` (tests/test_inmemory.py checks
    the signatures at run time)."""
    return executor
