"""The supervisor: gathers what the task directories and processes say, and applies the
lifecycle's verdict.

At start-up `reconcile_all` looks at every task that may have a process
*before* the API answers; then `run` watches: it tails each `events.jsonl` by
byte offset into the store and, when a runner ends or stops looking alive,
gathers the facts (exit record, process identity, time since launch, a cancel
request) for `lifecycle.decide`, which says what they mean (its docstring has
the table), and applies the move with `Store.apply`.

Every transition is compare-and-set, so the CLI (which runs the same `sync`
for fresh reads while the studio is down) and the server never fight.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ftstudio import checkpoints, events
from ftstudio.execution import facts
from ftstudio.execution.executor import Executor, Launch
from ftstudio.execution.facts import Cause, ExitRecord, Liveness
from ftstudio.home import Home, TaskDir, read_json
from ftstudio.studio import lifecycle
from ftstudio.studio.lifecycle import UNEXPECTED as UNEXPECTED  # where the tests and older callers look for it
from ftstudio.studio.lifecycle import Facts, Move
from ftstudio.studio.store import Batch, LostRace, Refused, Store, Task
from ftstudio.studio.task import TaskStatus

log = logging.getLogger("ftstudio")

TICK_S = 0.1  # events of tasks someone is streaming: their latency is what a person sees
# Exit records are looked for at once when a runner this studio started ends (`poke`, from the
# executor's waitpid), and every EXIT_S for the others (runners reattached after a restart). Waking
# every 0.1 s to look cost a quarter of the studio's CPU while supervising 20 tasks, most of it in
# the wake-ups themselves (bench/bench_supervisor.py).
EXIT_S = 0.5
# Event tailing of every other task (the store behind `GET /api/tasks`): per-pass work (a read and a
# row update per task) was half of the studio's CPU at twice a second (bench/bench_supervisor.py).
INGEST_S = 1.0
# Process identity (psutil reads of /proc, boot id): a dead runner without an exit record is rare
# and a heartbeat is 2 s anyway, while checking 20 live ones every 0.5 s was a third of the
# studio's CPU (bench/bench_supervisor.py). Exit records, the common way a task ends: see EXIT_S.
LIVENESS_S = 2.0
SCAN_S = 1.0  # which tasks to watch


@dataclass
class Verdict:
    task_id: str
    status: TaskStatus
    note: str


def launch_of(task: Task) -> Launch | None:
    if task.job_id:
        return Launch(0, 0.0, "", 0, job_id=task.job_id)
    if task.pid is None or task.pid_start_time is None:
        return None
    return Launch(task.pid, task.pid_start_time, task.boot_id or "", task.pgid or task.pid)


def stalled_attempts(attempts: list[dict[str, Any]]) -> int:
    """How many attempts in a row, newest first, the machine stopped before they made progress: the task's
    step where the one before left it (an attempt's step stays there until its own first step)."""
    n = 0
    for i in range(len(attempts) - 1, -1, -1):
        before = attempts[i - 1]["end_step"] if i else 0
        if attempts[i]["end_cause"] != Cause.MACHINE or (attempts[i]["end_step"] or 0) != (before or 0):
            break
        n += 1
    return n


def progress_text(task: Task) -> str:
    return lifecycle.progress_text(task.step or 0, task.total_steps)


def last_beat(tdir: TaskDir) -> float | None:
    """When the runner last beat (the heartbeat file's mtime; it beats every 2 s); None before its first beat."""
    try:
        return tdir.heartbeat.stat().st_mtime
    except OSError:
        return None


def heartbeat_age(tdir: TaskDir, now: float) -> float | None:
    """Seconds from the runner's last beat to `now`; None before its first beat."""
    beat = last_beat(tdir)
    return None if beat is None else round(max(0.0, now - beat), 1)


class Supervisor:
    def __init__(
        self,
        store: Store,
        home: Home,
        executor: Executor,
        *,
        notify: Callable[[set[str]], None] | None = None,
        streamed: Callable[[], set[str]] | None = None,
        launch_queued: Callable[[], object] | None = None,
        clock: Callable[[], float] = time.time,
        executors: Mapping[str, Executor] | None = None,
    ) -> None:
        self.store = store
        self.home = home
        self.executor = executor
        # A task is watched by the executor that launched it (its `executor` column), whichever one new
        # tasks go to now: a studio restarted with --executor slurm still watches its local tasks.
        self.executors = dict(executors or {executor.name: executor})
        self.notify = notify or (lambda ids: None)
        # Tasks someone is streaming right now: their events are tailed every tick, the rest every INGEST_S.
        self.streamed = streamed or set
        self.launch_queued = launch_queued
        # Wall-clock time, for ages against the store's timestamps and file mtimes; tests move it.
        self.clock = clock
        self._doubts: set[str] = set()
        # task id -> (its last beat, when a look first found that beat lost): see lifecycle.HEARTBEAT_RECHECK_S.
        self._lost: dict[str, tuple[float, float]] = {}
        self._wake = threading.Event()
        # Set once the studio is stopping (`run`'s stop): from then on no attempt is launched. In a machine's
        # shutdown the runners get the same SIGTERM as the studio, and an attempt started then is only lost.
        self.stopping = threading.Event()
        self._files: dict[str, tuple[str, str]] = {}  # task dir -> (events.jsonl, exit.json), built once

    def executor_for(self, task: Task) -> Executor:
        return self.executors.get(task.executor or "", self.executor)

    def poke(self) -> None:
        """Look now, not at the next tick (a runner ended, or the studio is stopping). Any thread."""
        self._wake.set()

    def files(self, task: Task) -> tuple[str, str]:
        """A task's events and exit record paths as strings: building Paths every pass showed in profiles."""
        files = self._files.get(task.task_dir)
        if files is None:
            tdir = task.dir
            files = self._files[task.task_dir] = (str(tdir.events), str(tdir.exit))
        return files

    # -- one task ------------------------------------------------------------

    def ingest(self, tasks: Iterable[Task], current: dict[str, Task] | None = None) -> set[str]:
        """Read new events of these tasks into the store; move preparing -> training on the first step.
        `current`: the caller's copies by id, replaced here with what the store now holds, so the watch
        loop needs no read per tick."""
        changed: set[str] = set()
        current = {} if current is None else current
        pending = []
        for task in tasks:
            path = self.files(task)[0]
            try:
                # A stat, not an open + read, for a file with nothing new (most ticks of a real trainer).
                if os.stat(path).st_size <= task.events_offset:
                    continue
            except OSError:
                continue  # not written yet (or unreadable: read_from would see nothing either)
            chunk = events.read_from(Path(path), task.events_offset)
            if chunk.offset != task.events_offset:
                pending.append((task, chunk))
        if not pending:
            return changed
        # One transaction for every task with news, not one each: per-task commits were most of
        # the studio's CPU while supervising 20 busy tasks (bench/bench_supervisor.py).
        results = self.store.ingest_many(
            [Batch(t.id, ch.events, ch.offset, t.events_offset, ch.lines) for t, ch in pending]
        )
        for task, chunk in pending:
            stored = results[task.id]
            if isinstance(stored, Refused):
                self._refuse(task, chunk, stored)
                current[task.id] = self.store.get(task.id)
                changed.add(task.id)
                continue
            if not stored and chunk.events:
                # Someone else (the CLI, another reader) took these bytes first: catch up from the store.
                current[task.id] = self.store.get(task.id)
                continue
            current[task.id] = task.read_to(chunk.offset, task.events_seq + len(stored))  # as stored: no read
            if not stored:
                continue
            changed.add(task.id)
            began = any(e["kind"] in ("train_begin", "progress") for e in stored)
            move = lifecycle.training_began(task.status) if began else None
            if move is not None:
                try:
                    current[task.id] = self.store.apply(task.id, move)
                except LostRace:
                    current[task.id] = self.store.get(task.id)
        return changed

    def _refuse(self, task: Task, chunk: events.Chunk, refused: Refused) -> None:
        """A batch the store cannot take fails its task alone: stopped, with a reason, and its
        offset left where it was so the same bytes are not tried again on every tick."""
        path = Path(self.files(task)[0])
        if refused.index is not None and refused.index < len(chunk.line_numbers):
            line = _lines_before(path, task.events_offset) + chunk.line_numbers[refused.index]
            where = f"line {line:,} of events.jsonl: {refused.what}"
        else:
            where = f"events.jsonl after byte {task.events_offset:,}: {refused.what}"
        for _ in range(3):  # a lost race is someone else's move: look again
            current = self.store.get(task.id)
            move = lifecycle.unstorable_events(current.status, where, current.step or 0, current.total_steps)
            if move is None:
                break
            try:
                self.store.apply(task.id, move)
            except LostRace:
                continue
            log.error("task %s failed: %s", task.id, move.reason)
            break
        # After the move (an exit record the runner writes as it dies must not decide the outcome), and
        # whoever moved it: a process whose records cannot be stored must not go on.
        self.executor_for(task).kill_all(task.id)

    def sync(self, task: Task, *, startup: bool = False) -> Verdict | None:
        """Bring one task's record up to date with its directory and process. Returns a verdict if the state moved."""
        status = task.status
        if not status.has_process:
            return None
        task = self.store.get(task.id)  # the caller's copy may predate the launch's pid, or a move
        if not task.status.has_process:
            return Verdict(task.id, task.status, task.error or "") if task.status != status else None
        tdir = task.dir
        launch = launch_of(task)
        # Liveness before the exit record, and both before the last events are read: a runner that
        # writes its events, then exit.json, then exits between these looks is neither called dead
        # nor ended without its last steps.
        executor = self.executor_for(task)
        liveness = executor.poll(tdir, launch) if (launch or tdir.launch.exists()) else None
        record = read_json(tdir.exit)
        self.ingest([task])
        task = self.store.get(task.id)
        if not task.status.has_process:  # its events failed it (or someone else moved it)
            return Verdict(task.id, task.status, task.error or "") if task.status != status else None
        word = executor.word(tdir, launch) if launch is not None and executor.cluster else None
        move = lifecycle.decide(self.facts(task, liveness, record, word))
        if move is not None:
            return self._apply(task, move)
        if liveness == Liveness.ALIVE:
            self._doubts.discard(task.id)
            if startup:
                self.store.update(task.id, expect=task.status, reattached_at=self.clock())
                log.info("reattached to task %s, pid %s, %s", task.id, task.pid, progress_text(task))
        elif liveness == Liveness.UNKNOWN and task.id not in self._doubts:
            log.warning(
                "cannot tell whether task %s (pid %s) is alive; leaving it as %s and looking again",
                task.id,
                task.pid,
                task.status,
            )
            self._doubts.add(task.id)
        return None

    def facts(
        self,
        task: Task,
        liveness: Liveness | None,
        record: dict[str, object] | None,
        word: facts.SchedulerWord | None = None,
    ) -> Facts:
        """What `lifecycle.decide` needs, from the store's row and what was just read from disk."""
        now = self.clock()
        beat = last_beat(task.dir)
        age = None if beat is None else max(0.0, now - beat)
        return Facts(
            status=task.status,
            liveness=liveness,
            exit=ExitRecord.from_json(record) if record is not None else None,
            since_launch_s=now - task.started_at if task.started_at else None,
            cancel_requested=bool(task.cancel_requested_at),
            step=task.step or 0,
            total_steps=task.total_steps,
            attempt=task.attempt,
            heartbeat_age_s=age,
            lost_seen_s=self._lost_seen(task.id, beat, age, now),
            scheduler=word,
        )

    def _lost_seen(self, task_id: str, beat: float | None, age: float | None, now: float) -> float | None:
        """How long ago a look first found this same beat lost; remembered until a new beat comes."""
        if beat is None or age is None or age <= lifecycle.HEARTBEAT_LOST_S:
            self._lost.pop(task_id, None)
            return None
        seen_beat, first = self._lost.get(task_id, (None, None))
        if seen_beat != beat or first is None:
            self._lost[task_id] = (beat, now)
            return 0.0
        return now - first

    def _apply(self, task: Task, move: Move) -> Verdict | None:
        try:
            self.store.apply(task.id, move)
        except LostRace:
            return None  # someone else moved it first; theirs stands
        finally:
            if move.stop_processes:
                self.executor_for(task).kill_all(task.id)  # orphans of a dead runner must not keep writing
        log.info("task %s %s: %s", task.id, move.dst, move.reason)
        self._doubts.discard(task.id)
        self._lost.pop(task.id, None)
        if move.dst == TaskStatus.INTERRUPTED:
            self.recover(self.store.get(task.id))  # back in the queue now, where its policy allows
        if move.releases and self.launch_queued and not self.stopping.is_set():
            # Its slot or GPUs are free now: the next queued task starts at once, not at the next scan.
            self.launch_queued()
        return Verdict(task.id, move.dst, move.reason)

    # -- all tasks -----------------------------------------------------------

    def _alive(self, task: Task) -> bool:
        """The watch loop's cheap look: only a task that is not plainly alive gets a full `sync`."""
        launch = launch_of(task)
        return launch is not None and self.executor_for(task).poll(task.dir, launch) == Liveness.ALIVE

    def watched(self) -> list[Task]:
        return self.store.with_status(TaskStatus.PREPARING, TaskStatus.TRAINING)

    def reconcile_all(self) -> list[Verdict]:
        """Start-up: decide every task that may have a process, before the API answers; then put every
        interrupted task whose policy allows it back in the queue."""
        verdicts = []
        for task in self.watched():
            v = self.sync(task, startup=True)
            if v:
                verdicts.append(v)
        self.recover_all()
        return verdicts

    def recover_all(self) -> int:
        """Every interrupted task: its next attempt, or failed, as `lifecycle.recover` says. Returns how many moved."""
        return sum(self.recover(task) is not None for task in self.store.with_status(TaskStatus.INTERRUPTED))

    def resumes_at(self, task: Task, attempts: list[dict[str, Any]]) -> dict[str, Any] | None:
        """When an interrupted task waits out a machine that keeps stopping it (lifecycle.MACHINE_WAIT_S): the time
        its next attempt starts and how many attempts in a row the machine stopped, for the page and `show`."""
        config = task.config_dict.get("resume") or {}
        if task.status != TaskStatus.INTERRUPTED or not config.get("auto", True) or not attempts:
            return None
        last = attempts[-1]
        if last.get("end_cause") == Cause.RUN or not last.get("ended_at"):
            return None
        stalled = stalled_attempts(attempts)
        wait = lifecycle.machine_wait_s(stalled)
        return {"at": last["ended_at"] + wait, "stalled": stalled} if wait else None

    def recover(self, task: Task) -> Move | None:
        config = (task.config_dict.get("resume") or {}) if task.status == TaskStatus.INTERRUPTED else {}
        if not config.get("auto", True) or task.status != TaskStatus.INTERRUPTED:
            return None
        newest = checkpoints.find_resume_checkpoint(task.dir.checkpoints)
        attempts = self.store.attempts(task.id)
        last = attempts[-1] if attempts else {}
        facts = lifecycle.Recovery(
            auto=True,
            max_restarts=int(config.get("max_restarts", 3)),
            restarts=task.restarts or 0,
            attempt=task.attempt,
            checkpoint_step=checkpoints.step_of(newest) if newest else None,
            # Attempts ended before causes were kept (end_cause NULL) count as neither.
            end_steps=tuple(
                a["end_step"] for a in attempts if a["end_cause"] == Cause.RUN and a["end_step"] is not None
            ),
            cause=Cause.RUN if last.get("end_cause") == Cause.RUN else Cause.MACHINE,
            stalled=stalled_attempts(attempts),
            since_end_s=self.clock() - last["ended_at"] if last.get("ended_at") else None,
        )
        move = lifecycle.recover(task.status, facts)
        if move is None:
            return None
        try:
            self.store.apply(task.id, move)
        except LostRace:
            return None  # a person retried or cancelled it first
        log.info("task %s %s: %s", task.id, move.dst, move.reason)
        return move

    def run(self, stop: threading.Event) -> None:
        """The watch loop; returns when `stop` is set."""
        self.stopping = stop
        watched: dict[str, Task] = {}  # by id: the store's copy, kept current by ingest
        last_scan = last_ingest = last_liveness = 0.0
        while not stop.is_set():
            self._wake.clear()
            now = time.monotonic()
            streamed: set[str] = set()
            try:
                if now - last_scan >= SCAN_S:
                    self.recover_all()
                    if self.launch_queued and not stop.is_set():
                        self.launch_queued()
                    last_scan = now
                    watched = {t.id: t for t in self.watched()}
                    self._files = {t.task_dir: self.files(t) for t in watched.values()}  # forget ended tasks
                # Every task's events reach the store every INGEST_S; a streamed task's every tick, since
                # its latency is what a person sees. Tailing all 20 busy tasks every tick, one small
                # batch each, was most of the studio's CPU (bench/bench_supervisor.py).
                streamed = self.streamed()
                if now - last_ingest >= INGEST_S:
                    last_ingest = now
                    changed = self.ingest(list(watched.values()), watched)
                else:
                    chosen = [t for t in watched.values() if t.id in streamed]
                    changed = self.ingest(chosen, watched) if streamed else set()
                full = now - last_liveness >= LIVENESS_S
                if full:
                    last_liveness = now
                moved = False
                for task in list(watched.values()):
                    # The exit record every pass: one stat a task.
                    if (os.path.exists(self.files(task)[1]) or (full and not self._alive(task))) and self.sync(task):
                        changed.add(task.id)
                        moved = True
                if moved:
                    watched = {t.id: t for t in self.watched()}
                if changed:
                    self.notify(changed)
            except Exception:  # the loop must outlive any one bad task or a locked database
                log.exception("supervisor tick failed; trying again")
            # Nothing running and nobody streaming: nothing can change before the next scan.
            if streamed:
                self._wake.wait(TICK_S)
            else:
                self._wake.wait(EXIT_S if watched else max(TICK_S, last_scan + SCAN_S - time.monotonic()))


def _lines_before(path: Path, offset: int) -> int:
    """Complete lines in the first `offset` bytes of a file (only when naming a bad line: it reads them)."""
    count = 0
    try:
        with open(path, "rb") as f:
            while offset > 0 and (block := f.read(min(offset, 1 << 20))):
                count += block.count(b"\n")
                offset -= len(block)
    except OSError:
        pass
    return count
