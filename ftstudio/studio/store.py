"""The store: SQLite in WAL mode, the studio's source of truth.

Every status change is a `lifecycle.Move` applied here (`apply`) in one
transaction written as compare-and-set
(`UPDATE tasks SET status=? WHERE id=? AND status=?`): zero rows updated means
another writer got there first, and the caller is told (`LostRace`) instead of
overwriting. The store decides no status itself. The transition and its side records (the `transitions` history
row, progress fields, process identity) commit together or not at all.

Connections are per thread (sqlite3 objects must not cross threads); the CLI,
the API and the supervisor may all write at once, which WAL + a busy timeout
handle.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ftstudio.errors import DamagedFile, IllegalTransition, NotFound
from ftstudio.eventrows import INT64, UnstorableEvent, latest_progress, num, text
from ftstudio.home import TaskDir
from ftstudio.studio import journal
from ftstudio.studio.lifecycle import Move, submitted
from ftstudio.studio.scheduler import Grant, Lease
from ftstudio.studio.task import TaskStatus, check_transition

# Numbered migrations; the schema version is the number applied last. Append only.
MIGRATIONS: list[str] = [
    # 1: tasks, their event history, their transition history
    """
    CREATE TABLE tasks (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        status TEXT NOT NULL,
        model TEXT NOT NULL,
        dataset TEXT NOT NULL,
        config TEXT NOT NULL,
        task_dir TEXT NOT NULL,
        executor TEXT NOT NULL DEFAULT 'local',
        created_at REAL NOT NULL,
        started_at REAL,
        finished_at REAL,
        updated_at REAL NOT NULL,
        step INTEGER NOT NULL DEFAULT 0,
        total_steps INTEGER,
        epoch REAL,
        total_epochs REAL,
        loss REAL,
        eval_loss REAL,
        lr REAL,
        tokens_per_s REAL,
        eta_s REAL,
        phase TEXT,
        error TEXT,
        attempt INTEGER NOT NULL DEFAULT 1,
        pid INTEGER,
        pid_start_time REAL,
        boot_id TEXT,
        pgid INTEGER,
        events_offset INTEGER NOT NULL DEFAULT 0,
        events_seq INTEGER NOT NULL DEFAULT 0,
        reattached_at REAL,
        cancel_requested_at REAL
    );
    CREATE INDEX tasks_by_created ON tasks (created_at DESC, id DESC);
    CREATE INDEX tasks_by_status ON tasks (status);
    CREATE TABLE events (
        task_id TEXT NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
        seq INTEGER NOT NULL,
        kind TEXT NOT NULL,
        step INTEGER,
        ts REAL NOT NULL,
        data TEXT NOT NULL,
        PRIMARY KEY (task_id, seq)
    ) WITHOUT ROWID;
    CREATE TABLE transitions (
        id INTEGER PRIMARY KEY,
        task_id TEXT NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
        ts REAL NOT NULL,
        src TEXT,
        dst TEXT NOT NULL,
        reason TEXT
    );
    CREATE INDEX transitions_by_task ON transitions (task_id, id);
    """,
    # 2: the queue: priorities, leases on slots and GPUs, settings kept in the home, attempts
    """
    ALTER TABLE tasks ADD COLUMN priority INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE tasks ADD COLUMN pause_requested_at REAL;
    ALTER TABLE tasks ADD COLUMN frozen_at REAL;
    CREATE INDEX tasks_in_queue ON tasks (status, priority DESC, created_at, id);
    CREATE TABLE leases (
        resource TEXT NOT NULL,
        task_id TEXT NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
        shared INTEGER NOT NULL DEFAULT 0,
        since REAL NOT NULL,
        PRIMARY KEY (resource, task_id)
    );
    CREATE INDEX leases_by_task ON leases (task_id);
    CREATE TABLE settings (
        key TEXT PRIMARY KEY,
        value TEXT NOT NULL
    );
    CREATE TABLE attempts (
        task_id TEXT NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
        attempt INTEGER NOT NULL,
        started_at REAL,
        ended_at REAL,
        end_reason TEXT,
        resumed_from_step INTEGER,
        PRIMARY KEY (task_id, attempt)
    );
    """,
    # 3: recovery: automatic restarts so far, and the step each attempt ended at
    """
    ALTER TABLE tasks ADD COLUMN restarts INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE attempts ADD COLUMN end_step INTEGER;
    """,
    # 4: a cluster scheduler's job id for tasks it runs (Slurm)
    """
    ALTER TABLE tasks ADD COLUMN job_id TEXT;
    """,
    # 5: who ended an interrupted attempt, the machine or the run (lifecycle.recover counts only the run's)
    """
    ALTER TABLE attempts ADD COLUMN end_cause TEXT;
    """,
]
SCHEMA_VERSION = len(MIGRATIONS)

# Errors that come from what a batch holds, not from the database: they cost only that task.
# (OperationalError, a locked database or a full disk, is not among them: every task waits.)
DATA_ERRORS = (ValueError, TypeError, OverflowError, sqlite3.InterfaceError, sqlite3.IntegrityError)


class LostRace(IllegalTransition):
    """The task was not in the expected state any more: someone else changed it first."""


@dataclass(frozen=True)
class Refused:
    """A batch the store could not take: nothing of it was stored and the offset did not move."""

    index: int | None  # which event of the batch, when known
    what: str  # for a person: "step is out of range"


@dataclass
class Batch:
    """Events read from one task's events.jsonl, to be stored if the offset is still `expect_offset`."""

    task_id: str
    events: list[dict[str, Any]]
    new_offset: int
    expect_offset: int
    lines: list[str] | None = None  # the raw lines of `events`, stored as written


@dataclass(frozen=True)
class Task:
    """One row of `tasks`, as the service hands it out: a snapshot, read again (`Store.get`) to see a change."""

    id: str
    name: str
    status: TaskStatus
    model: str
    dataset: str
    config: str
    """The TrainingConfig as JSON text (`config_dict` parses it)."""
    task_dir: str
    executor: str
    """The executor that launched it ("local", "slurm"): it is watched by that one."""
    created_at: float
    updated_at: float
    started_at: float | None = None
    finished_at: float | None = None
    step: int = 0
    total_steps: int | None = None
    epoch: float | None = None
    total_epochs: float | None = None
    loss: float | None = None
    eval_loss: float | None = None
    lr: float | None = None
    tokens_per_s: float | None = None
    eta_s: float | None = None
    phase: str | None = None
    error: str | None = None
    attempt: int = 1
    pid: int | None = None
    pid_start_time: float | None = None
    boot_id: str | None = None
    pgid: int | None = None
    events_offset: int = 0
    """How far into events.jsonl the store has read, in bytes."""
    events_seq: int = 0
    reattached_at: float | None = None
    cancel_requested_at: float | None = None
    priority: int = 0
    pause_requested_at: float | None = None
    frozen_at: float | None = None
    restarts: int = 0
    """Automatic restarts after failures of the run itself (resume.max_restarts counts these)."""
    job_id: str | None = None
    """The cluster scheduler's job id, for a task it runs."""

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Task:
        """A row of `tasks` (sqlite3.Row or a dict); columns a newer schema adds are left out."""
        values = {name: row[name] for name in _TASK_FIELDS if name in row.keys()}  # noqa: SIM118  (sqlite3.Row)
        values["status"] = TaskStatus(values["status"])
        return cls(**values)

    def as_dict(self) -> dict[str, Any]:
        """The row's columns as a dict, for JSON."""
        return {name: getattr(self, name) for name in _TASK_FIELDS}

    def read_to(self, offset: int, seq: int) -> Task:
        """This task with its events read up to byte `offset` (event number `seq`), as an ingest left the store."""
        return Task(**{**self.as_dict(), "events_offset": offset, "events_seq": seq})

    @property
    def dir(self) -> TaskDir:
        return TaskDir(Path(self.task_dir))

    @property
    def config_dict(self) -> dict[str, Any]:
        config: dict[str, Any] = json.loads(self.config)
        return config

    @property
    def percent(self) -> float | None:
        if self.status == TaskStatus.COMPLETED:
            return 100.0
        if not self.total_steps:
            return None
        return round(100.0 * min(self.step or 0, self.total_steps) / self.total_steps, 1)


_TASK_FIELDS = tuple(f.name for f in dataclasses.fields(Task))
JOURNALED = ("error", "restarts", "cancel_requested_at", "pause_requested_at", "frozen_at", "phase")
"""A move's own fields that the task folder's journal keeps with it (for `studio.repair`)."""
SWEEP_S = 5.0
"""How often a use of the store closes the connections of threads that have ended."""


class Store:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._local = threading.local()
        # Every thread's connection, to close those of threads that have ended: a thread-local alone leaves
        # them to the garbage collector, and the API's short-lived worker threads piled up open files.
        self._conns: dict[threading.Thread, sqlite3.Connection] = {}
        self._conns_lock = threading.Lock()
        self._next_sweep = 0.0
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._migrate()
        except sqlite3.DatabaseError as e:  # not a database, or a damaged one ("malformed", "not a database")
            self.close()
            raise DamagedFile(
                f"{path} is damaged ({e}); restore a copy made with `ftstudio studio backup DIR` over it, or move it "
                f"aside to start with an empty task list (the task folders in {path.parent / 'tasks'} are kept)"
            ) from None

    # -- connections ---------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if self._conns and time.monotonic() >= self._next_sweep:
            self._close_ended()
        if conn is None:
            # Used only by the thread that opened it; closed by another once that thread has ended.
            conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=False)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA foreign_keys=ON")
            conn.execute("PRAGMA busy_timeout=30000")
            self._local.conn = conn
            with self._conns_lock:
                self._conns[threading.current_thread()] = conn
        return conn

    def _close_ended(self) -> None:
        self._next_sweep = time.monotonic() + SWEEP_S
        with self._conns_lock:
            ended = [t for t in self._conns if not t.is_alive()]
            for thread in ended:
                self._conns.pop(thread).close()

    def open_connections(self) -> int:
        """Connections open now (ended threads' are closed first): for the tests and the benchmarks."""
        self._close_ended()
        return len(self._conns)

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; BEGIN IMMEDIATE so two writers queue instead of deadlocking."""
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        else:
            conn.execute("COMMIT")

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None
            with self._conns_lock:
                self._conns.pop(threading.current_thread(), None)

    def _migrate(self) -> None:
        with self.tx() as c:
            version = c.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise DamagedFile(
                    f"{self.path} has schema version {version}, newer than this ftstudio knows ({SCHEMA_VERSION}); "
                    "upgrade ftstudio"
                )
            for number in range(version, SCHEMA_VERSION):
                for stmt in MIGRATIONS[number].split(";"):
                    if stmt.strip():
                        c.execute(stmt)
                c.execute(f"PRAGMA user_version = {number + 1}")

    def checkpoint(self) -> None:
        """Write the write-ahead log into studio.db and empty it: after a stop, studio.db alone is complete (a
        backup that copies only that file keeps everything)."""
        self._conn().execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()

    def backup(self, dest: Path) -> int:
        """A consistent copy of the store at `dest` through SQLite's online backup API, while others read and
        write; returns how many tasks it holds. `dest` must not exist: a backup never overwrites."""
        target = sqlite3.connect(f"file:{dest}?mode=rwc", uri=True)
        try:
            self._conn().backup(target)
            target.execute("PRAGMA journal_mode=DELETE")  # first: one self-contained file, no -wal beside it
            (tasks,) = target.execute("SELECT count(*) FROM tasks").fetchone()
        finally:
            target.close()
        return int(tasks)

    def schema_version(self) -> int:
        version: int = self._conn().execute("PRAGMA user_version").fetchone()[0]
        return version

    # -- tasks ---------------------------------------------------------------

    def create_task(
        self, *, name: str, model: str, dataset: str, config: dict[str, Any], tasks_root: Path, priority: int = 0
    ) -> Task:
        now = time.time()
        first = submitted()
        for _ in range(10):
            task_id = new_task_id(now)
            try:
                with self.tx() as c:
                    c.execute(
                        "INSERT INTO tasks (id, name, status, model, dataset, config, task_dir, created_at, updated_at,"
                        " priority) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (
                            task_id,
                            name,
                            first.dst,
                            model,
                            dataset,
                            json.dumps(config),
                            str(tasks_root / task_id),
                            now,
                            now,
                            priority,
                        ),
                    )
                    c.execute(
                        "INSERT INTO transitions (task_id, ts, src, dst, reason) VALUES (?, ?, NULL, ?, ?)",
                        (task_id, now, first.dst, first.reason),
                    )
                return self.get(task_id)
            except sqlite3.IntegrityError:
                continue  # id collision: draw again
        raise RuntimeError("could not draw a free task id in 10 tries")

    def restore(
        self,
        row: Mapping[str, Any],
        transitions: list[tuple[float, str | None, str, str]],
        attempts: list[dict[str, Any]],
    ) -> bool:
        """Put back a task the index lost, from what its folder holds (`studio.repair`): its row, its status
        history (ts, src, dst, reason) and its attempts, in one transaction. False: the id is known already
        (nothing changed). Its events are read back with `ingest`, as the supervisor reads them."""
        cols = [k for k in row if k in _TASK_FIELDS]
        try:
            with self.tx() as c:
                c.execute(
                    f"INSERT INTO tasks ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                    [row[k] for k in cols],
                )
                c.executemany(
                    "INSERT INTO transitions (task_id, ts, src, dst, reason) VALUES (?, ?, ?, ?, ?)",
                    [(row["id"], *t) for t in transitions],
                )
                c.executemany(
                    "INSERT OR REPLACE INTO attempts (task_id, attempt, started_at, ended_at, end_reason, end_cause,"
                    " resumed_from_step, end_step) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    [
                        (row["id"], a["attempt"], a.get("started_at"), a.get("ended_at"), a.get("end_reason"),
                         a.get("end_cause"), a.get("resumed_from_step"), a.get("end_step"))
                        for a in attempts
                    ],
                )  # fmt: skip
        except sqlite3.IntegrityError:
            return False
        return True

    def ids(self) -> set[str]:
        return {r[0] for r in self._conn().execute("SELECT id FROM tasks")}

    def get(self, task_id: str) -> Task:
        row = self._conn().execute("SELECT * FROM tasks WHERE id = ?", (task_id,)).fetchone()
        if row is None:
            raise NotFound(f"no task {task_id!r} (see `ftstudio tasks`)")
        return Task.from_row(row)

    def page_of_tasks(self, *, limit: int = 50, offset: int = 0, status: str | None = None) -> tuple[list[Task], int]:
        where, args = ("WHERE status = ?", [status]) if status else ("", [])
        conn = self._conn()
        total = conn.execute(f"SELECT count(*) FROM tasks {where}", args).fetchone()[0]
        rows = conn.execute(
            f"SELECT * FROM tasks {where} ORDER BY created_at DESC, id DESC LIMIT ? OFFSET ?", [*args, limit, offset]
        ).fetchall()
        return [Task.from_row(r) for r in rows], total

    def with_status(self, *statuses: TaskStatus) -> list[Task]:
        marks = ",".join("?" * len(statuses))
        rows = self._conn().execute(f"SELECT * FROM tasks WHERE status IN ({marks}) ORDER BY created_at", statuses)
        return [Task.from_row(r) for r in rows]

    def apply(self, task_id: str, move: Move, **fields: Any) -> Task:
        """Make a move the lifecycle decided, with its fields and any of the caller's (a launch's pid)."""
        if not isinstance(move, Move) or move.src is None:
            raise TypeError(f"apply takes a lifecycle Move from a status, not {move!r}")
        return self.transition(
            task_id,
            move.src,
            move.dst,
            reason=move.reason,
            _release=move.releases,
            _cause=move.cause,
            **{**move.fields, **fields},
        )

    def transition(
        self,
        task_id: str,
        src: TaskStatus,
        dst: TaskStatus,
        *,
        reason: str = "",
        _release: bool | None = None,
        _cause: str | None = None,
        **fields: Any,
    ) -> Task:
        """Move src -> dst (compare-and-set), writing `fields` and the history row in the same transaction.

        The studio's modules call `apply` with a lifecycle Move (tests/test_lifecycle.py checks that no
        module decides a status itself); this stays for tests and benchmarks that set a task's state up."""
        if "status" in fields:
            raise ValueError("the status is the move's")
        check_transition(src, dst)
        now = time.time()
        fields.setdefault("updated_at", now)
        if dst == TaskStatus.PREPARING:
            fields.setdefault("started_at", now)
        if dst.is_final:
            fields.setdefault("finished_at", now)
        cols = ", ".join(f"{k} = ?" for k in fields)
        with self.tx() as c:
            cur = c.execute(
                f"UPDATE tasks SET status = ?, {cols} WHERE id = ? AND status = ?",
                [dst, *fields.values(), task_id, src],
            )
            if cur.rowcount == 0:
                row = c.execute("SELECT status FROM tasks WHERE id = ?", (task_id,)).fetchone()
                if row is None:
                    raise NotFound(f"no task {task_id!r}")
                raise LostRace(f"task {task_id} is {row[0]} now, not {src}; nothing changed")
            c.execute(
                "INSERT INTO transitions (task_id, ts, src, dst, reason) VALUES (?, ?, ?, ?, ?)",
                (task_id, now, src, dst, reason),
            )
            released = _release if _release is not None else not dst.has_process
            if released:
                # The task's processes are gone: its slot or GPUs are free, and its attempt has ended,
                # in the same transaction as the move, so no lease outlives the task that held it.
                c.execute("DELETE FROM leases WHERE task_id = ?", (task_id,))
                c.execute(
                    "UPDATE attempts SET ended_at = ?, end_reason = ?, end_cause = ?,"
                    " end_step = (SELECT step FROM tasks WHERE id = ?) WHERE task_id = ? AND ended_at IS NULL",
                    (now, reason, None if _cause is None else str(_cause), task_id, task_id),
                )
        task = self.get(task_id)
        kept = {k: getattr(task, k) for k in JOURNALED if k in fields}
        journal.append(
            task.task_dir,
            {"kind": "move", "ts": now, "src": src, "dst": dst, "reason": reason, "cause": _cause,
             "released": released, "attempt": task.attempt, "step": task.step, **kept},
        )  # fmt: skip
        return task

    # -- the queue -----------------------------------------------------------

    def claim(self, task_id: str, move: Move, grant: Grant, *, resumed_from_step: int | None = None) -> Task:
        """Take a queued task for launch with the resources the scheduler granted it, in one transaction:
        the resources must still be free (another studio process or the CLI may have taken them since the
        plan was made), then the move (compare-and-set), the leases and the new attempt's record."""
        if move.src is None or move.dst != TaskStatus.PREPARING:
            raise TypeError(f"claim takes the lifecycle's claim move, not {move!r}")
        now = time.time()
        with self.tx() as c:
            for resource in grant.resources:
                holders = c.execute("SELECT task_id, shared FROM leases WHERE resource = ?", (resource,)).fetchall()
                if holders and (not grant.shared or not all(h["shared"] for h in holders)):
                    raise LostRace(f"{resource} was taken by task {holders[0]['task_id']} first; nothing changed")
            fields = {**move.fields, "updated_at": now, "started_at": now}
            cols = ", ".join(f"{k} = ?" for k in fields)
            row = c.execute(
                f"UPDATE tasks SET status = ?, {cols} WHERE id = ? AND status = ? RETURNING attempt",
                [move.dst, *fields.values(), task_id, move.src],
            ).fetchone()
            if row is None:
                raise LostRace(f"task {task_id} is not {move.src} any more; nothing changed")
            c.execute(
                "INSERT INTO transitions (task_id, ts, src, dst, reason) VALUES (?, ?, ?, ?, ?)",
                (task_id, now, move.src, move.dst, move.reason),
            )
            c.executemany(
                "INSERT INTO leases (resource, task_id, shared, since) VALUES (?, ?, ?, ?)",
                [(r, task_id, int(grant.shared), now) for r in grant.resources],
            )
            c.execute(
                "INSERT OR REPLACE INTO attempts (task_id, attempt, started_at, resumed_from_step) VALUES (?, ?, ?, ?)",
                (task_id, row["attempt"], now, resumed_from_step),
            )
            if resumed_from_step is not None:
                # The history stays true across attempts: steps past the checkpoint it resumes from, recorded by
                # the attempt that died, are done again by this one and replaced, not doubled.
                c.execute("DELETE FROM events WHERE task_id = ? AND step > ?", (task_id, resumed_from_step))
                # The dead attempt's speed and ETA say nothing about this one's (it has a model to load first):
                # unknown until its first steps. (The step stays until then: where the last attempt ended is
                # what `lifecycle.recover` compares when this one dies before a step.)
                c.execute("UPDATE tasks SET eta_s = NULL, tokens_per_s = NULL WHERE id = ?", (task_id,))
        task = self.get(task_id)
        journal.append(
            task.task_dir,
            {"kind": "claim", "ts": now, "src": move.src, "dst": move.dst, "reason": move.reason,
             "attempt": task.attempt, "resumed_from_step": resumed_from_step},
        )  # fmt: skip
        return task

    def leases(self) -> list[Lease]:
        rows = self._conn().execute("SELECT resource, task_id, shared FROM leases ORDER BY resource, since")
        return [Lease(r["resource"], r["task_id"], bool(r["shared"])) for r in rows]

    def leases_of(self, task_id: str) -> list[str]:
        rows = self._conn().execute("SELECT resource FROM leases WHERE task_id = ? ORDER BY resource", (task_id,))
        return [r[0] for r in rows]

    def release_orphans(self) -> int:
        """Drop leases whose task holds no process any more (a studio killed between a move and its
        cleanup, a database copied from elsewhere). A frozen task keeps its lease: its memory is held."""
        holding = [s.value for s in TaskStatus if s.has_process]
        marks = ",".join("?" * len(holding))
        with self.tx() as c:
            return c.execute(
                f"DELETE FROM leases WHERE task_id NOT IN (SELECT id FROM tasks WHERE status IN ({marks})"
                " OR frozen_at IS NOT NULL)",
                holding,
            ).rowcount

    def setting(self, key: str) -> str | None:
        row = self._conn().execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def set_setting(self, key: str, value: str) -> None:
        with self.tx() as c:
            c.execute(
                "INSERT INTO settings (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = ?",
                (key, value, value),
            )

    def attempts(self, task_id: str) -> list[dict[str, Any]]:
        rows = self._conn().execute(
            "SELECT attempt, started_at, ended_at, end_reason, end_cause, resumed_from_step, end_step FROM attempts"
            " WHERE task_id = ? ORDER BY attempt",
            (task_id,),
        )
        return [dict(r) for r in rows]

    def update(self, task_id: str, expect: TaskStatus | None = None, **fields: Any) -> bool:
        """Write non-status fields; with `expect`, only while the task is still in that state."""
        if "status" in fields:
            raise ValueError("status changes are lifecycle moves: use apply()")
        fields.setdefault("updated_at", time.time())
        cols = ", ".join(f"{k} = ?" for k in fields)
        sql = f"UPDATE tasks SET {cols} WHERE id = ?"
        args = [*fields.values(), task_id]
        if expect is not None:
            sql += " AND status = ?"
            args.append(expect)
        with self.tx() as c:
            return c.execute(sql, args).rowcount == 1

    def delete(self, task_id: str, *, only_if: frozenset[TaskStatus] | set[TaskStatus]) -> bool:
        marks = ",".join("?" * len(only_if))
        with self.tx() as c:
            return (
                c.execute(f"DELETE FROM tasks WHERE id = ? AND status IN ({marks})", [task_id, *only_if]).rowcount == 1
            )

    def history(self, task_id: str) -> list[dict[str, Any]]:
        rows = self._conn().execute(
            "SELECT ts, src, dst, reason FROM transitions WHERE task_id = ? ORDER BY id", (task_id,)
        )
        return [dict(r) for r in rows]

    # -- events --------------------------------------------------------------

    def ingest(
        self, task_id: str, events: list[dict[str, Any]], new_offset: int, expect_offset: int
    ) -> list[dict[str, Any]]:
        """Store a batch read from events.jsonl and advance the read offset, atomically.

        The offset is compare-and-set too: if another reader (a second studio
        process, the CLI) already ingested these bytes, nothing is stored twice.
        Returns the events with their `seq` as stored (empty if the race was lost).
        """
        result = self.ingest_many([Batch(task_id, events, new_offset, expect_offset)])[task_id]
        if isinstance(result, Refused):
            raise UnstorableEvent(result.index or 0, result.what)
        return result

    def ingest_many(self, batches: list[Batch]) -> dict[str, list[dict[str, Any]] | Refused]:
        """`ingest` for several tasks in one transaction; a batch the store cannot take is `Refused`.

        The watch loop ingests every busy task each tick; one commit per task was most of the
        studio's CPU while supervising 20 busy tasks (bench/bench_supervisor.py). Each task's
        offset is still compare-and-set on its own: a lost race stores nothing for that task only.
        One task's bad batch must not hold back the others either: when the shared transaction
        fails on data, every batch is tried again in a transaction of its own.
        """
        now = time.time()
        out: dict[str, list[dict[str, Any]] | Refused] = {}
        try:
            with self.tx() as c:
                for batch in batches:
                    out[batch.task_id] = self._ingest(c, batch, now)
            return out
        except DATA_ERRORS:
            out.clear()
        for batch in batches:
            try:
                with self.tx() as c:
                    out[batch.task_id] = self._ingest(c, batch, now)
            except UnstorableEvent as e:
                out[batch.task_id] = Refused(e.index, e.what)
            except DATA_ERRORS as e:  # not foreseen by the checks in _ingest: still this task's alone
                out[batch.task_id] = Refused(None, f"{type(e).__name__}: {e}"[:200])
        return out

    def _ingest(self, c: sqlite3.Connection, batch: Batch, now: float) -> list[dict[str, Any]]:
        latest = latest_progress(batch.events)  # raises UnstorableEvent
        latest.update(events_offset=batch.new_offset, updated_at=now)
        cols = ", ".join(f"{k} = ?" for k in latest)
        # Compare-and-set on the offset and the seq bump in one statement (no read first).
        row = c.execute(
            f"UPDATE tasks SET {cols}, events_seq = events_seq + ? WHERE id = ? AND events_offset = ? RETURNING events_seq",
            [*latest.values(), len(batch.events), batch.task_id, batch.expect_offset],
        ).fetchone()
        if row is None:
            return []
        first = row[0] - len(batch.events) + 1
        stored = [{**ev, "seq": first + i} for i, ev in enumerate(batch.events)]
        # The line as the trainer wrote it is stored as is (seq lives in its own column):
        # re-encoding every event was a tenth of the studio's CPU while supervising.
        lines = batch.lines or [json.dumps(ev) for ev in batch.events]
        rows = []
        for i, (ev, line) in enumerate(zip(stored, lines, strict=True)):
            step = ev.get("step")
            if type(step) is not int:
                step = None
            elif step not in INT64:
                raise UnstorableEvent(i, "step is out of range")
            rows.append((batch.task_id, ev["seq"], text(ev["kind"])[:64], step, num(ev.get("ts"), now), line))
        c.executemany("INSERT INTO events (task_id, seq, kind, step, ts, data) VALUES (?, ?, ?, ?, ?, ?)", rows)
        return stored

    def events(
        self, task_id: str, *, after_seq: int = 0, kinds: tuple[str, ...] = (), limit: int = 100_000
    ) -> list[dict[str, Any]]:
        sql, args = "SELECT seq, data FROM events WHERE task_id = ? AND seq > ?", [task_id, after_seq]
        if kinds:
            sql += f" AND kind IN ({','.join('?' * len(kinds))})"
            args += kinds
        sql += " ORDER BY seq LIMIT ?"
        args.append(limit)
        return [{**json.loads(data), "seq": seq} for seq, data in self._conn().execute(sql, args)]


def new_task_id(now: float | None = None) -> str:
    """Sortable by time, unguessable in the tail, and safe in any path: `20261122-0915-a1b2c3d4`.
    A collision (1 in 4 billion within the same minute) is caught by the primary key and drawn again."""
    stamp = time.strftime("%Y%m%d-%H%M", time.gmtime(now if now is not None else time.time()))
    return f"{stamp}-{secrets.token_hex(4)}"
