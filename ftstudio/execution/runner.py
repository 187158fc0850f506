"""The runner: `python -m ftstudio.runner TASK_DIR`, the real parent of the trainer.

Started by an executor in a new session with stdin from /dev/null and
stdout/stderr appended to `training.log`, so nothing ties it to the studio: the
studio can die, restart or be upgraded while the runner keeps going.

It holds an exclusive lock on the task dir (a second runner refuses), writes
`launch.json`, tags every descendant with FTSTUDIO_TASK_ID, beats `heartbeat`,
and when the trainer ends writes `exit.json` atomically. The exit record is the only way the studio learns the
outcome; it never reads the log for that. The record says what happened to the
trainer; what that means for the task is `lifecycle.decide`'s to say.

SIGUSR1 pauses (see `ftstudio.pause`). It goes to the trainer, or under torchrun
to every worker rank and never to the torchrun agent (SIGUSR1's default action
would kill it). A process still starting Python has no handler yet and would be
killed by it, so the pause is held and forwarded once the process catches it.
SIGTERM, SIGINT and SIGHUP are a cancel when the task dir holds `cancel.request`
(the studio writes it before it signals): forwarded to the trainer at once,
recorded `cancelled`. Any other is a shutdown, `docker stop` or a scheduler's
preemption: the trainer is asked, as for a pause, to checkpoint at its next step
and exit; after SHUTDOWN_GRACE_S every process of this attempt is SIGKILLed. Either
way the record says `interrupted`, for the studio to resume from the newest
complete checkpoint. A real shutdown signals every process at once: the trainer
(and torchrun's agent, which passes it on to the ranks) treats its own SIGTERM the
same way (see `ftstudio.pause`).

Fencing: the studio writes the task dir's `attempt` before it starts a runner
with `--attempt N`. A runner whose N is not the file's refuses to start
(EXIT_STALE), and one that finds the file changed while it runs (the studio has
given up on it and launched a newer attempt) SIGKILLs its own processes, found by
the pid tree (the task tag is the newer attempt's too), writes nothing and exits
EXIT_STALE. The trainer makes the same check before each of its own writes
(`ftstudio.fence`). The check and the write are not one step: a record can still
land in the instant the file changes, and the studio's fencing by attempt number
covers that.

A `resources.processes` > 1 task runs under `torchrun --standalone` with
`--max-restarts 0`: restarting is the studio's decision (resume from the newest
complete checkpoint as the next attempt), not torchrun's.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from ftstudio import batchsplit, checkpoints, events
from ftstudio.execution import memlimit
from ftstudio.execution.facts import Cause, Outcome
from ftstudio.execution.procs import TASK_ENV, boot_id
from ftstudio.fence import ATTEMPT_ENV, EXIT_STALE, named_attempt
from ftstudio.home import TaskDir, keep_private, read_json, write_json_atomic
from ftstudio.parent import die_with_parent
from ftstudio.pause import EXIT_SUSPENDED, PAUSE_SIGNAL, catches_pause
from ftstudio.resources import gib

HEARTBEAT_S = 2.0
WAIT_S = 0.1  # the longest the runner waits for the trainer before it looks at its signals' requests again
EXIT_LOCKED = 75  # EX_TEMPFAIL: another runner owns this task dir
SHUTDOWN_GRACE_S = 8.0
"""How long a shutdown waits for the trainer to checkpoint and exit before SIGKILLing every process of the
attempt. `docker stop` sends SIGKILL 10 s after its SIGTERM (systemd waits 90 s): 8 s leaves the runner
time to kill and write exit.json before that. A checkpoint that takes longer is not made; the newest one
before it is resumed from. GRACE_ENV overrides it (for `docker stop -t 60`, and for tests)."""
GRACE_ENV = "FTSTUDIO_SHUTDOWN_GRACE_S"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
FROM_OUTSIDE = "from outside the studio (a shutdown, docker stop or a scheduler)"
SLURM_WARNING = "from outside the studio (Slurm's warning before the job's time limit or a preemption)"
MODULE_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def log(msg: str) -> None:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    print(f"[{stamp}] [ftstudio runner] {msg}", flush=True)


def from_outside(signum: int) -> str:
    """Who sends a stop the studio did not: in a Slurm job SIGUSR1 is Slurm's warning (sbatch --signal=B:USR1),
    which a shutdown or `docker stop` never sends."""
    return SLURM_WARNING if signum == PAUSE_SIGNAL and os.environ.get("SLURM_JOB_ID") else FROM_OUTSIDE


def processes_of(task: TaskDir) -> int:
    """Training processes per node."""
    spec = read_json(task.spec) or {}
    return int((spec.get("config") or {}).get("resources", {}).get("processes", 1) or 1)


def nodes_of(task: TaskDir) -> int:
    spec = read_json(task.spec) or {}
    return int((spec.get("config") or {}).get("resources", {}).get("nodes", 1) or 1)


def world_of(task: TaskDir) -> int:
    """Training processes in all: the ranks."""
    return processes_of(task) * nodes_of(task)


def ready_file(task: TaskDir, node: int) -> Path:
    """Written by node `node`'s launcher (ftstudio.node) once a SIGUSR1 can no longer kill it."""
    return task.ranks / f"node-{node}.ready"


def node_ready(task: TaskDir, node: int) -> bool:
    return ready_file(task, node).exists()


class NotHere(Exception):
    """The task asks for what this runner cannot start where it runs (more than one node outside Slurm)."""


def trainer_command(task: TaskDir, module: str, resume: str | None = None, attempt: int = 1) -> list[str]:
    tail = [str(task.spec), *(["--resume", resume] if resume else [])]
    processes, nodes = processes_of(task), nodes_of(task)
    if nodes > 1:
        return multinode_command(task, module, tail, processes, nodes, attempt)
    if processes > 1:
        return [
            sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
            "--max-restarts=0", "-m", module, *tail,
        ]  # fmt: skip
    return [sys.executable, "-m", module, *tail]


def multinode_command(
    task: TaskDir, module: str, tail: list[str], processes: int, nodes: int, attempt: int
) -> list[str]:
    """srun starts ftstudio.node on every node of the job; their torchruns meet on this node (the job's
    first: where the batch step, this runner, runs), at this node's name, which every node resolves."""
    if not os.environ.get("SLURM_JOB_ID"):
        raise NotHere(
            f"the task asks for {nodes} nodes, which only a Slurm job has; resubmit it with --nodes 1, or from "
            "a studio started with --executor slurm"
        )
    with socket.socket() as s:  # a free port for the rendezvous; torchrun's store binds it moments later
        s.bind(("", 0))
        port = s.getsockname()[1]
    torchrun = [
        sys.executable, "-m", "torch.distributed.run", f"--nnodes={nodes}", f"--nproc_per_node={processes}",
        "--rdzv_backend=c10d", f"--rdzv_endpoint={socket.gethostname()}:{port}",
        f"--rdzv_id={task.path.name}-{attempt}", "--max-restarts=0", "-m", module, *tail,
    ]  # fmt: skip
    # --mem=0: each node's share of the job's memory; --kill-on-bad-exit: one node failing ends the others.
    srun = [
        "srun", f"--nodes={nodes}", "--ntasks-per-node=1", f"--cpus-per-task={processes}", "--mem=0",
        "--kill-on-bad-exit=1",
    ]  # fmt: skip
    return [*srun, sys.executable, "-m", "ftstudio.node", str(task.path), "--", *torchrun]


def shutdown_grace() -> float:
    value = os.environ.get(GRACE_ENV)
    if value is None:
        return SHUTDOWN_GRACE_S
    try:
        grace = float(value)
        if 0 <= grace <= 3600:
            return grace
    except ValueError:
        pass
    log(f"{GRACE_ENV}={value!r} is not a number of seconds from 0 to 3600; using {SHUTDOWN_GRACE_S:g}")
    return SHUTDOWN_GRACE_S


def other_attempt(task: TaskDir, attempt: int) -> int | None:
    """The attempt the task dir's `attempt` names when it is not `attempt`; None when it names this one, is
    missing (started by hand, or by a studio that predates the file) or cannot be read (never stop on doubt)."""
    try:
        named = named_attempt(task.path)
    except (OSError, ValueError) as e:
        log(f"could not read {task.attempt} ({e}); carrying on as attempt {attempt}")
        return None
    return None if named is None or named == attempt else named


def kill_tree(pid: int) -> int:
    """SIGKILL `pid` and all its descendants; how many were signalled. By the pid tree, not the task tag:
    a newer attempt's processes carry the same tag, and a stale runner must end only its own."""
    try:
        root = psutil.Process(pid)
        procs = [*root.children(recursive=True), root]
    except psutil.Error:
        return 0
    for proc in procs:
        try:
            proc.kill()
        except psutil.Error:
            pass
    return len(procs)


def attempt_events(task: TaskDir, since: int) -> list[dict[str, Any]]:
    """This attempt's events (after byte offset `since`), at most the file's last 256 KB: the tail is
    where an attempt's last words are."""
    try:
        size = task.events.stat().st_size
    except OSError:
        return []
    return events.read_from(task.events, max(since, size - (256 << 10))).events


def last_of(task: TaskDir, since: int, kind: str | None = None) -> dict[str, Any] | None:
    """This attempt's last event, or its last event of `kind`, if any."""
    return next((e for e in reversed(attempt_events(task, since)) if kind is None or e.get("kind") == kind), None)


def last_error(task: TaskDir, since: int = 0) -> str | None:
    """The trainer's own one-line account of what went wrong in this attempt, if it wrote one."""
    for ev in reversed(attempt_events(task, since)):
        message = ev.get("message")
        if ev.get("kind") == "error" and isinstance(message, str):
            return message
    return None


def rank_reports(task: TaskDir, since: int) -> dict[int, dict[str, Any]]:
    """Each rank's own account of its failure in this attempt: rank 0's error event, the others' files."""
    reports: dict[int, dict[str, Any]] = {}
    first = last_of(task, since, "error")
    if first is not None:
        reports[0] = first
    for path in task.ranks.glob("rank-*.json"):
        record = read_json(path)
        number = path.stem.removeprefix("rank-")
        if isinstance(record, dict) and isinstance(record.get("message"), str) and number.isdigit():
            reports[int(number)] = record
    return reports


def distributed_outcome(task: TaskDir, since: int, processes: int) -> dict[str, Any]:
    """torchrun ended non-zero on its own. A rank that failed on its own (bad data, out of memory, a bug)
    fails the task with its account. Otherwise a rank vanished without a word, killed by a signal (the
    OOM killer's way), and the others only lost it mid-collective: that is an interruption, resumed from
    the newest checkpoint like a killed single-process trainer."""
    reports = rank_reports(task, since)
    own = sorted(r for r, report in reports.items() if not report.get("peer_lost"))
    if own:
        message = reports[own[0]]["message"]
        return {"outcome": Outcome.FAILED, "reason": message if own[0] == 0 else f"rank {own[0]}: {message}"}
    silent = [r for r in range(processes) if r not in reports]
    if len(silent) == 1:
        who = f"training process rank {silent[0]} of {processes} was killed"
    elif silent:
        who = f"training processes ranks {', '.join(map(str, silent))} of {processes} were killed"
    else:
        who = f"the {processes} training processes lost contact with each other"
    progress = last_of(task, since, "progress") or {}
    at = f" at step {progress['step']}" if isinstance(progress.get("step"), int) else ""
    newest = checkpoints.find_resume_checkpoint(task.checkpoints)
    then = f"it resumes from {newest.name}" if newest else "nothing was saved yet, so it starts from the beginning"
    cause = " by a signal nobody here sent (often the system running out of memory)" if silent else ""
    return {
        "outcome": Outcome.INTERRUPTED,
        "reason": f"{who}{cause}{at} and the others stopped with it; {then}; see training.log",
        "checkpoint": newest.name if newest else None,
        # A rank killed is the run's (the OOM killer's way); ranks that only lost each other, the machine's.
        "cause": Cause.RUN if silent else Cause.MACHINE,
    }


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


def interrupted_record(
    signum: int, task: TaskDir, suspended: dict[str, Any] | None, progress: dict[str, Any] | None
) -> dict[str, Any]:
    """Stopped by a SIGTERM (SIGINT, SIGHUP) that was not a person's cancel. `suspended`: the trainer's
    `suspended` event, written once its checkpoint was complete; None when it was killed (or died) first."""
    who = f"stopped by {signal.Signals(signum).name} {from_outside(signum)}"
    source = suspended or progress or {}
    step, total = source.get("step"), source.get("total_steps")
    of_total = f"/{total}" if isinstance(total, int) else ""
    if suspended is not None:
        checkpoint = suspended.get("checkpoint")
        # The trainer reports the checkpoint it saved at `step`, or, stopped before training ran, the
        # checkpoint it would have resumed from.
        saved = bool(checkpoint) and checkpoint == f"checkpoint-{step}"
        if saved:
            reason = f"{who} at step {step}{of_total} after saving {checkpoint}; it resumes from there"
        elif checkpoint:
            reason = f"{who} before training continued; it resumes from {checkpoint}"
        else:
            reason = f"{who} before the first training step; nothing was saved, so it starts from the beginning"
    else:
        newest = checkpoints.find_resume_checkpoint(task.checkpoints)
        checkpoint, saved = (newest.name if newest else None), False
        after = f" after step {step}{of_total}" if isinstance(step, int) else ""
        then = (
            f"it resumes from {checkpoint}" if checkpoint else "nothing was saved yet, so it starts from the beginning"
        )
        reason = f"{who}{after} before it could save a checkpoint; {then}"
    return {
        "outcome": Outcome.INTERRUPTED,
        "reason": reason,
        "step": step,
        "checkpoint": checkpoint,
        "saved": saved,
        "cause": Cause.MACHINE,
    }


def outcome_of(
    returncode: int,
    stop_signal: int | None,
    task: TaskDir,
    *,
    suspended: dict[str, Any] | None = None,
    distributed: bool = False,
    shutdown: int | None = None,
    paused: bool = False,
    killed: bool = False,
    since: int = 0,
    processes: int = 1,
) -> dict[str, Any]:
    """What exit.json says. `stop_signal`: a person's cancel; `shutdown`: any other SIGTERM (SIGINT, SIGHUP)
    the runner got; `paused`: a person's pause reached it; `killed`: the shutdown's grace ran out and the
    runner SIGKILLed the attempt; `since`: where this attempt's events begin; `processes`: torchrun's ranks. `suspended`: this attempt's
    `suspended` event, if it wrote one; under torchrun (`distributed`) the ranks exit 0 after a pause, and
    torchrun's agent non-zero after a SIGTERM of its own, so that event is the only sign of it."""
    clean = suspended is not None and (returncode == EXIT_SUSPENDED or distributed)
    if returncode == 0 and not clean:
        return {"outcome": Outcome.COMPLETED, "reason": "training finished and the adapter was saved"}
    if stop_signal is not None:
        name = signal.Signals(stop_signal).name
        return {"outcome": Outcome.CANCELLED, "reason": f"stopped on request ({name})"}
    # A trainer that stopped cleanly after a person's pause stays paused even if a shutdown followed.
    if shutdown is not None and not (paused and clean and not (suspended or {}).get("shutdown")):
        message = None if killed or returncode < 0 or clean else last_error(task, since)
        if message:  # it failed on its own way out, e.g. the disk filled during the shutdown's checkpoint
            return {"outcome": Outcome.FAILED, "reason": message}
        # The event is written once the checkpoint is complete: true even if the kill came after it.
        return interrupted_record(shutdown, task, suspended, last_of(task, since, "progress"))
    if clean and suspended is not None and suspended.get("shutdown"):
        # The trainer got SIGTERM itself and the runner did not: the same shutdown, seen from below.
        return interrupted_record(signal.SIGTERM, task, suspended, None)
    if clean:
        return paused_record(suspended)
    if distributed and returncode > 0:
        return distributed_outcome(task, since, processes)
    message = last_error(task, since)
    if message:
        return {"outcome": Outcome.FAILED, "reason": message}
    if returncode < 0:
        # Killed by a signal nobody here sent (the kernel's OOM killer, a person's `kill -9`, a crash): the
        # trainer vanished, as in a crash, so the task is resumed from its newest checkpoint; one that dies
        # the same way at the same step again is failed by the lifecycle ("twice in a row at step N").
        name = signal.Signals(-returncode).name
        hint = " (often the system running out of memory)" if name == "SIGKILL" else ""
        progress = last_of(task, since, "progress") or {}
        at = f" at step {progress['step']}" if isinstance(progress.get("step"), int) else ""
        newest = checkpoints.find_resume_checkpoint(task.checkpoints)
        then = f"it resumes from {newest.name}" if newest else "nothing was saved yet, so it starts from the beginning"
        return {
            "outcome": Outcome.INTERRUPTED,
            "reason": f"the training process was killed by {name}{hint}{at}; {then}; see training.log",
            "checkpoint": newest.name if newest else None,
            "cause": Cause.RUN,
        }
    return {
        "outcome": Outcome.FAILED,
        "reason": f"the training process exited with code {returncode}; see training.log",
    }


def split_after_kill(task: TaskDir, size: int, since: int) -> dict[str, Any]:
    """With optim.auto_batch, a run killed at its memory limit is not failed: its batches are split in twice as
    many parts (batchsplit.py) and it resumes from its newest checkpoint. Nothing to change (an empty dict) when
    auto_batch is off, or a batch is already down to one row a part."""
    config = (read_json(task.spec) or {}).get("config") or {}
    optim = config.get("optim") or {}
    batch = int(optim.get("batch_size") or 1)
    parts = batchsplit.read_parts(task.path)
    if not optim.get("auto_batch") or world_of(task) > 1 or batchsplit.rows_per_part(batch, parts) <= 1:
        return {}
    progress = last_of(task, since, "progress") or {}
    step = progress.get("step") if isinstance(progress.get("step"), int) else None
    batchsplit.write_parts(task.path, parts * 2, batch, step)
    newest = checkpoints.find_resume_checkpoint(task.checkpoints)
    then = f"it resumes from {newest.name}" if newest else "nothing was saved yet, so it starts from the beginning"
    at = f" at step {step}" if step is not None else ""
    return {
        "outcome": Outcome.INTERRUPTED,
        "reason": f"memory limit of {gib(size)} reached{at}; optim.auto_batch: from now on "
        f"{batchsplit.split_line(batch, parts * 2)}; {then}",
        "checkpoint": newest.name if newest else None,
        # Not counted against resume.max_restarts: each split halves what a step holds, and they run out.
        "cause": Cause.MACHINE,
    }


class Stop:
    """What the runner has been asked while the trainer runs."""

    def __init__(self) -> None:
        self.cancel: int | None = None
        """The signal of a person's cancel."""
        self.shutdown: int | None = None
        """The first SIGTERM (SIGINT, SIGHUP) that was not a cancel."""
        self.deadline: float | None = None
        """When the shutdown's grace runs out (time.monotonic)."""
        self.killed = False
        """The grace ran out and every process of the attempt was SIGKILLed."""
        self.paused = False
        """A person's pause (SIGUSR1) reached the runner."""


def run(task: TaskDir, module: str = "ftstudio.train", attempt: int = 1, resume: str | None = None) -> int:
    newer = other_attempt(task, attempt)
    if newer is not None:
        log(
            f"task {task.path.name} is at attempt {newer} but this runner was started as attempt {attempt}; "
            "it refuses to start"
        )
        return EXIT_STALE
    lock_fd = os.open(task.lock, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        log(f"another runner is already running task {task.path.name}; this one refuses to start")
        return EXIT_LOCKED

    task_id = task.path.name
    env = {**os.environ, TASK_ENV: task_id, ATTEMPT_ENV: str(attempt), "PYTHONUNBUFFERED": "1"}
    if resume is None and attempt > 1:
        # Every later attempt (resume, retry, extend) continues from the newest complete checkpoint;
        # with none, the trainer starts from the beginning.
        resume = "auto"
    try:
        argv = trainer_command(task, module, resume, attempt)
    except NotHere as e:
        log(f"training cannot start: {e}")
        write_json_atomic(
            task.exit,
            {"outcome": Outcome.FAILED, "reason": str(e), "exit_code": None, "signal": None, "attempt": attempt,
             "finished_at": time.time()},
        )  # fmt: skip
        return 0
    distributed, nodes = world_of(task) > 1, nodes_of(task)
    try:
        events_start = task.events.stat().st_size  # this attempt's events come after it
    except OSError:
        events_start = 0
    shutil.rmtree(task.ranks, ignore_errors=True)  # the ranks' accounts of an earlier attempt
    log(f"starting training for task {task_id} (attempt {attempt}): {' '.join(argv[1:])}")
    limit = memlimit.start(read_json(task.spec) or {}, task_id, log, attempt)  # memory limit: memlimit.py

    def in_child() -> None:  # between fork and exec: gone with the runner, then inside the limit
        die_with_parent()
        limit.in_child()

    trainer = subprocess.Popen(
        limit.command(argv),
        cwd=task.path,
        env=env,
        stdin=subprocess.DEVNULL,
        preexec_fn=in_child,
        close_fds=True,
    )
    limit.started(trainer.pid)

    stop = Stop()
    if nodes > 1:
        # The trainer is srun: it hands a SIGUSR1 to every process of its step, once each node's launcher
        # can take it (ftstudio.node), and they see to their own ranks.
        pause = PauseForwarder(trainer, False, 1, ready=lambda: all(node_ready(task, n) for n in range(nodes)))
    else:
        pause = PauseForwarder(trainer, distributed, processes_of(task))
    grace = shutdown_grace()

    def on_stop(signum: int, _frame: object) -> None:
        name = signal.Signals(signum).name
        if task.cancel_request.exists():
            if stop.cancel is None:
                log(f"received {name} with a cancel request; stopping the training process now")
            stop.cancel = stop.cancel or signum
            try:
                # SIGTERM whatever came: it is the signal the trainer (and torchrun's agent) ends on at once.
                trainer.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
            return
        if stop.shutdown is not None:
            return
        stop.shutdown = signum
        stop.deadline = time.monotonic() + grace
        log(
            f"received {name} {from_outside(signum)}; saving a checkpoint at the next step boundary, "
            f"or stopping without one after {grace:g}s"
        )
        pause.requested = True  # the pause's way out: a checkpoint of the next step, every rank at the same one
        pause.forward()

    def request_pause(signum: int, frame: object) -> None:
        if os.environ.get("SLURM_JOB_ID") and not task.pause_request.exists():
            # Not the studio's pause: Slurm's warning before the job's time limit or a preemption
            # (sbatch --signal). Checkpoint and stop as for a shutdown; the studio resumes the task.
            on_stop(signum, frame)
            return
        if not pause.requested:
            log("received SIGUSR1; pausing at the next step boundary, after a checkpoint of that step")
        stop.paused = pause.requested = True
        pause.forward()

    for signum in STOP_SIGNALS:
        signal.signal(signum, on_stop)
    signal.signal(PAUSE_SIGNAL, request_pause)

    # Written once every handler is in place: the studio signals a runner only after launch.json exists
    # (SIGUSR1's default action would kill a runner still starting).
    me = psutil.Process()
    if other_attempt(task, attempt) is not None:
        return _stand_down(task, attempt, trainer)
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

    returncode = _wait_beating(trainer, task, pause, stop, attempt)
    if returncode is None:
        # Not limit.finish(): the cgroup is named for the task, and the newer attempt's may have it by now.
        return _stand_down(task, attempt, trainer)
    over_limit = limit.finish()
    last = last_of(task, events_start)
    suspended = last if last and last.get("kind") == "suspended" else None
    outcome = outcome_of(
        returncode,
        stop.cancel,
        task,
        suspended=suspended,
        distributed=distributed,
        shutdown=stop.shutdown,
        paused=stop.paused,
        killed=stop.killed,
        since=events_start,
        processes=world_of(task),
    )
    record = {
        **outcome,
        "exit_code": returncode if returncode >= 0 else None,
        "signal": signal.Signals(-returncode).name if returncode < 0 else None,
        "attempt": attempt,
        "finished_at": time.time(),
        "memory_limit": limit.record(),
    }
    if over_limit:  # the kill was the limit's, whatever the trainer managed to say before it
        record.update(outcome=Outcome.FAILED, reason=memlimit.exceeded_reason(limit.size or 0))
        record.update(split_after_kill(task, limit.size or 0, events_start))
    if other_attempt(task, attempt) is not None:
        return _stand_down(task, attempt, trainer)
    write_json_atomic(task.exit, record)
    log(f"training {record['outcome']}: {record['reason']}")
    return 0


class PauseForwarder:
    """Delivers a pause to the processes that train: the trainer, or torchrun's worker ranks."""

    def __init__(
        self,
        trainer: subprocess.Popen[bytes],
        distributed: bool,
        processes: int,
        ready: Callable[[], bool] | None = None,
    ) -> None:
        self.trainer = trainer
        self.distributed = distributed
        self.processes = processes
        self.ready = ready
        """Whether the pause may be sent at all yet (several nodes: every node's launcher is listening)."""
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
        if self.ready is not None:
            # srun: it takes SIGUSR1 in a signal thread of its own (so it shows no handler to look for) and
            # hands it to its step; `ready` says when every process it would reach can take it.
            if self.ready() and not self.delivered:
                try:
                    os.kill(self.trainer.pid, PAUSE_SIGNAL)
                    self.delivered.add(self.trainer.pid)
                except ProcessLookupError:
                    pass
            return
        for pid in self.targets():
            # Not yet catching it means still starting Python: SIGUSR1 would kill it; try again shortly.
            if pid in self.delivered or catches_pause(pid) is False:
                continue
            try:
                os.kill(pid, PAUSE_SIGNAL)
                self.delivered.add(pid)
            except ProcessLookupError:
                pass


def _stand_down(task: TaskDir, attempt: int, trainer: subprocess.Popen[bytes]) -> int:
    """A newer attempt owns the task: end this attempt's processes and write nothing more."""
    newer = other_attempt(task, attempt)
    log(
        f"task {task.path.name} is at attempt {newer} now; this runner (attempt {attempt}) is stale: "
        "it stops its own training processes and writes nothing more"
    )
    kill_tree(trainer.pid)
    try:
        trainer.wait(timeout=30)
    except subprocess.TimeoutExpired:
        log(f"the training process {trainer.pid} did not die of SIGKILL within 30s")
    return EXIT_STALE


def _wait_beating(
    trainer: subprocess.Popen[bytes], task: TaskDir, pause: PauseForwarder, stop: Stop, attempt: int
) -> int | None:
    """The trainer's return code, or None when this runner turned out to be stale (its trainer still runs)."""
    next_beat = 0.0
    while True:
        now = time.monotonic()
        if stop.deadline is not None and now >= stop.deadline and not stop.killed:
            count = kill_tree(trainer.pid)
            stop.killed = True
            log(f"the training process did not stop within the shutdown's grace; SIGKILLed {count} process(es)")
        if now >= next_beat:
            if other_attempt(task, attempt) is not None:
                return None
            _beat(task)
            next_beat = now + HEARTBEAT_S
        if pause.pending():
            pause.forward()
        # Short waits: a signal's handler runs inside this wait but cannot cut it short, and a shutdown's
        # grace must be kept to the tenth of a second (Popen.wait polls this finely anyway).
        timeout = max(0.0, min(next_beat - time.monotonic(), WAIT_S))
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
    keep_private()
    parser = argparse.ArgumentParser(prog="python -m ftstudio.runner", description=__doc__.splitlines()[0])
    parser.add_argument("task_dir", type=Path)
    parser.add_argument("--module", default="ftstudio.train", help="trainer module (tests substitute a scripted one)")
    parser.add_argument(
        "--attempt",
        default="1",
        help="the attempt this runner runs; from-file: the one the task dir's `attempt` names (a Slurm job, "
        "which Slurm may requeue and start again for the task's next attempt)",
    )
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
    if args.attempt == "from-file":
        try:
            attempt = named_attempt(task.path) or 1
        except (OSError, ValueError) as e:
            log(f"cannot read {task.attempt} ({e}); this run refuses to start")
            return EXIT_STALE
        ended = read_json(task.exit) or {}
        if ended.get("attempt") == attempt:
            # A requeued Slurm job started again before the studio gave the task its next attempt.
            log(
                f"attempt {attempt} of task {task.path.name} has ended ({ended.get('outcome')}); this run refuses "
                "to start, and the studio resumes the task as its next attempt"
            )
            return EXIT_STALE
    elif args.attempt.isdigit() and int(args.attempt) >= 1:
        attempt = int(args.attempt)
    else:
        parser.error(f"--attempt must be a number from 1, or from-file (got {args.attempt!r})")
    return run(task, args.module, attempt, args.resume)


if __name__ == "__main__":
    sys.exit(main())
