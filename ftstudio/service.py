"""The service: the one API that the CLI and the HTTP routes both call.

Nothing above this module touches SQLite or processes. Every method either
returns a result or raises an `ftstudio.errors` exception whose message a
person can act on; the edges map those to HTTP codes and exit codes.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import IO, Any

from ftstudio import __version__, checkpoints, lifecycle, paths, procs, scheduler, taskfiles
from ftstudio.config import TrainingConfig
from ftstudio.errors import Conflict, LaunchError, NotFound, Problem, StorageError, TooBusy, ValidationError
from ftstudio.executor import Executor, LocalExecutor
from ftstudio.home import Home, TaskDir, read_json, write_json_atomic
from ftstudio.lifecycle import Action
from ftstudio.policy import MAX_SLOTS, Policy
from ftstudio.resources import Want, cuda_env, machine_gpus, want_of
from ftstudio.scheduler import Grant, Plan, Waiting
from ftstudio.storage import writing
from ftstudio.store import LostRace, Store, Task
from ftstudio.supervisor import Supervisor, heartbeat_age, launch_of
from ftstudio.task import TaskStatus
from ftstudio.text import plain, printable
from ftstudio.uploads import Incoming, is_dataset_name

log = logging.getLogger("ftstudio")

S = TaskStatus
CANCEL_GRACE_S = 10.0
DEFAULT_SLOTS = 1  # training slots for tasks without a GPU: one at a time, so two CPU runs never halve each other

# `python train.py` in a task dir reproduces the task by hand (`python train.py --resume auto`
# continues it from its newest complete checkpoint). Nothing from the user is in it: the entry
# point reads spec.json beside it.
TRAIN_PY = """\
import pathlib, sys, ftstudio.train
sys.exit(ftstudio.train.main([str(pathlib.Path(__file__).with_name("spec.json")), *sys.argv[1:]]))
"""


class OneLineFormatter(logging.Formatter):
    """Log lines name tasks, models and paths people chose: their control characters are escaped,
    so `tail studio.log` shows text, never runs an escape sequence (a traceback keeps its lines)."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return printable(super().formatMessage(record))


def setup_logging(home: Home, *, to_stderr: bool = False) -> None:
    """studio.log: one line a person understands for every launch, recovery and exit."""
    logger = logging.getLogger("ftstudio")
    if any(getattr(h, "_ftstudio", False) for h in logger.handlers):
        return
    handler: logging.Handler = logging.FileHandler(home.log, encoding="utf-8")
    handler.setFormatter(OneLineFormatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    handler._ftstudio = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    if to_stderr:
        console = logging.StreamHandler()
        console.setFormatter(OneLineFormatter("%(asctime)s %(message)s", "%H:%M:%S"))
        console._ftstudio = True  # type: ignore[attr-defined]
        logger.addHandler(console)
    logger.setLevel(logging.INFO)


class Service:
    def __init__(
        self,
        home: Home | None = None,
        *,
        executor: Executor | None = None,
        in_server: bool = False,
        policy: Policy | None = None,
    ) -> None:
        self.home = (home or Home.default()).ensure()
        self.policy = policy or Policy()
        self._admit = threading.Lock()
        self._scheduling = threading.Lock()  # one plan at a time in this process (the store guards the rest)
        self.gpus: tuple[int, ...] = machine_gpus()
        self._stopping: set[str] = set()  # tasks whose cancel is under way
        self._stopping_lock = threading.Lock()
        setup_logging(self.home)
        self.store = Store(self.home.db)
        self.executor: Executor = executor or LocalExecutor()
        self.in_server = in_server
        self.supervisor = Supervisor(self.store, self.home, self.executor, launch_queued=self.launch_queued)

    # -- submit and launch ---------------------------------------------------

    def submit(self, config: dict[str, Any], name: str | None = None, *, trusted: bool = False) -> Task:
        """Check, record and launch a task. `trusted`: the person at the terminal asked (the CLI), not a
        request over HTTP, whose reach is limited by the studio's `policy`."""
        cfg = TrainingConfig.from_dict(config)
        if cfg.model.trust_remote_code and not trusted and not self.policy.allow_remote_code:
            raise ValidationError(
                Problem(
                    "model.trust_remote_code",
                    "running a model repository's code is off for requests to this studio; "
                    "its owner can allow it with `ftstudio studio start --allow-remote-code`, "
                    "or submit from the terminal with `ftstudio submit --set model.trust_remote_code=true`",
                )
            )
        # Which files this request may read is decided before anything is read, on the paths the trainer will use.
        paths.anchor(cfg, self.home.root)
        refused = paths.config_problems(cfg, home=self.home.root, policy=self.policy, trusted=trusted)
        if refused:
            raise ValidationError(refused)
        from ftstudio import preflight  # the trainer's cheap checks: files exist, data parses

        preflight.check(cfg, self.home.root, max_row_bytes=None if trusted else self.policy.max_row_bytes)
        self._check_gpus(cfg)
        # A name is text: control characters (terminal commands, bidi overrides) are dropped.
        name = " ".join(plain(name or "").split())[:200] or plain(f"{cfg.model.name} on {Path(cfg.data.path).name}")
        # Counted and recorded under one lock, so concurrent requests cannot all slip under the limit.
        with self._admit, writing(self.home.root):
            if not trusted:
                self._check_room()
            task = self.store.create_task(
                name=name,
                model=cfg.model.name,
                dataset=cfg.data.path,
                config=cfg.to_dict(),
                tasks_root=self.home.tasks,
                priority=cfg.resources.priority,
            )
        tdir = task.dir
        try:
            with writing(self.home.root):
                tdir.path.mkdir(parents=True)
                tdir.checkpoints.mkdir()
                write_json_atomic(
                    tdir.spec,
                    {
                        "format": 1,
                        "task_id": task.id,
                        "name": name,
                        "config": cfg.to_dict(),
                        "home": str(self.home.root),
                    },
                )
                tdir.train_py.write_text(TRAIN_PY)
        except (OSError, StorageError):
            # Leave nothing half-made behind: no record, no directory.
            shutil.rmtree(tdir.path, ignore_errors=True)
            self.store.delete(task.id, only_if={S.QUEUED})
            raise
        log.info("task %s submitted: %s", task.id, name)
        self.schedule()
        return self.store.get(task.id)

    def _check_gpus(self, cfg: TrainingConfig) -> None:
        """A request this machine can never meet is refused now, not left waiting forever."""
        want = want_of(cfg.to_dict()["resources"], len(self.gpus))
        have = (
            f"GPUs {', '.join(map(str, self.gpus))}"
            if self.gpus
            else "no GPU that ftstudio can see (nvidia-smi lists none)"
        )
        missing = [n for n in want.gpu_ids if n not in self.gpus]
        if missing:
            raise ValidationError(
                Problem("resources.gpu_ids (--gpu-ids)", f"GPU {missing[0]} is not on this machine; it has {have}")
            )
        if want.gpus > len(self.gpus):
            fix = (
                "leave --gpus unset or 0 to train on the CPU" if not self.gpus else f"ask for at most {len(self.gpus)}"
            )
            raise ValidationError(
                Problem("resources.gpus (--gpus)", f"asks for {want.gpus} GPU(s) but this machine has {have}; {fix}")
            )

    def _check_room(self) -> None:
        pending = len(self.store.with_status(S.QUEUED, S.PREPARING, S.TRAINING))
        limit = self.policy.max_pending
        if pending >= limit:
            raise TooBusy(
                f"{pending} fine-tunes are already queued or running, the most this studio takes from requests; "
                f"wait for one to finish or cancel one (its owner can raise the limit with "
                f"`ftstudio studio start --max-pending N`)"
            )

    # -- the queue -----------------------------------------------------------

    def slots(self) -> int:
        """Training slots for tasks without a GPU, as `studio start --slots` last set them in this home."""
        value = self.store.setting("slots")
        return int(value) if value and value.isdigit() else DEFAULT_SLOTS

    def set_slots(self, slots: int) -> None:
        if not 1 <= slots <= MAX_SLOTS:
            raise ValidationError(f"--slots: must be between 1 and {MAX_SLOTS} (got {slots})")
        with writing(self.home.root):
            self.store.set_setting("slots", str(slots))

    def plan(self) -> Plan:
        """Who would start now, and why each other queued task waits."""
        waiting = [
            Waiting(t.id, self._want(t), t.priority or 0, t.created_at) for t in self.store.with_status(S.QUEUED)
        ]
        return scheduler.plan(waiting, self.store.leases(), slots=self.slots(), gpus=self.gpus)

    def _want(self, task: Task) -> Want:
        try:
            return want_of(task.config_dict.get("resources") or {}, len(self.gpus))
        except (ValueError, TypeError):  # a record from elsewhere: treat it as a plain CPU task
            return Want()

    def schedule(self) -> list[str]:
        """Start every queued task whose resources are free, in queue order. Any thread, any process:
        each start claims its task and its leases in one transaction, so nothing is started twice."""
        started = []
        with self._scheduling:
            for grant in self.plan().starts:
                try:
                    if self.launch(grant):
                        started.append(grant.task_id)
                except LaunchError:
                    log.exception("could not launch task %s", grant.task_id)
        return started

    launch_queued = schedule  # what the supervisor calls when a task ends and frees its resources

    def launch(self, grant: Grant) -> bool:
        """Start a queued task's runner with the resources granted to it. Claims the task and its leases first
        (compare-and-set), so two launchers never both start it nor hand out the same GPU. False: lost a race."""
        queued = self.store.get(grant.task_id)
        resumed = None
        if queued.attempt > 1:  # a later attempt continues from the newest complete checkpoint (the runner says so)
            newest = checkpoints.find_resume_checkpoint(queued.dir.checkpoints)
            resumed = checkpoints.step_of(newest) if newest else 0
        try:
            task = self.store.claim(grant.task_id, lifecycle.claim(), grant, resumed_from_step=resumed)
        except LostRace:
            return False
        tdir = task.dir
        # A new attempt starts without the last one's records.
        for stale in (tdir.exit, tdir.launch, tdir.heartbeat):
            stale.unlink(missing_ok=True)
        # Where the studio manages GPUs the task sees exactly its own (none for a CPU task); where it found
        # none (no nvidia-smi), the environment is left alone rather than hiding GPUs it cannot count.
        env = cuda_env(grant.gpu_ids) if self.gpus else {}
        try:
            launch = self.executor.submit(tdir, attempt=task.attempt, env=env)
        except LaunchError as e:
            self.store.apply(task.id, lifecycle.launch_failed(str(e)))
            raise
        self.store.update(
            task.id,
            pid=launch.pid,
            pid_start_time=launch.start_time,
            boot_id=launch.boot_id,
            pgid=launch.pgid,
            executor=self.executor.name,
        )
        held = ", ".join(grant.resources) or "no lease"
        log.info("task %s launched (runner pid %s, attempt %s, %s)", task.id, launch.pid, task.attempt, held)
        return True

    def queue(self) -> dict[str, Any]:
        """What runs, what waits and for what (`ftstudio queue`, `GET /api/queue`)."""
        if not self.in_server:
            self._catch_up()
        plan = self.plan()
        running = []
        for task in self.store.with_status(S.PREPARING, S.TRAINING):
            running.append(
                {"id": task.id, "name": task.name, "status": task.status, "resources": self.store.leases_of(task.id)}
            )
        waiting = []
        queued = {t.id: t for t in self.store.with_status(S.QUEUED)}
        for task_id, wait in sorted(plan.waits.items(), key=lambda kv: kv[1].position):
            t = queued[task_id]
            waiting.append(
                {
                    "id": t.id,
                    "name": t.name,
                    "priority": t.priority or 0,
                    "position": wait.position,
                    "reason": wait.reason,
                    "blocked_by": list(wait.blocked_by),
                }
            )
        return {"slots": self.slots(), "gpus": list(self.gpus), "running": running, "waiting": waiting}

    def _catch_up(self) -> None:
        """With no studio watching (the CLI alone), end what has ended and start what can start."""
        for task in self.store.with_status(S.PREPARING, S.TRAINING):
            self.supervisor.sync(task)
        self.schedule()

    # -- reading -------------------------------------------------------------

    def get(self, task_id: str) -> Task:
        self.home.task(task_id)  # rejects ids that could never be ours (path characters) with a clear error
        task = self.store.get(task_id)
        if not self.in_server and task.status_enum.has_process:
            # No studio may be watching: bring the record up to date ourselves (compare-and-set makes this safe).
            self.supervisor.sync(task)
            task = self.store.get(task_id)
        elif not self.in_server and task.status_enum == S.QUEUED:
            # It waits for others to end: with no studio watching, nobody else would notice they did.
            self._catch_up()
            task = self.store.get(task_id)
        return task

    def list(self, *, limit: int = 50, offset: int = 0, status: str | None = None) -> tuple[list[Task], int]:
        if status is not None and status not in {s.value for s in S}:
            raise ValidationError(f"status: unknown status {status!r}; use one of {', '.join(s.value for s in S)}")
        if not 1 <= limit <= 1000:
            raise ValidationError("limit: must be between 1 and 1000")
        if offset < 0:
            raise ValidationError("offset: must not be negative")
        if not self.in_server:
            self._catch_up()
        return self.store.list(limit=limit, offset=offset, status=status)

    def logs(self, task_id: str, offset: int = 0, limit: int = 64 << 10) -> dict[str, Any]:
        """Bytes of training.log from `offset` (negative: the last -offset bytes)."""
        task = self.get(task_id)
        path = task.dir.log
        limit = max(1, min(limit, 1 << 20))
        # Opened without following a link: a training.log planted as a link to another file is not served.
        opened = taskfiles.open_inside(path.parent, Path(path.name))
        if opened is None:
            size, start, data = 0, 0, b""
        else:
            with opened[0] as f:
                size = f.seek(0, 2)
                start = max(0, size + offset) if offset < 0 else min(offset, size)
                f.seek(start)
                data = f.read(limit)
        return {
            "offset": start,
            "next_offset": start + len(data),
            "size": size,
            "text": data.decode("utf-8", "replace"),
        }

    def metrics(self, task_id: str, after: int = 0) -> list[dict[str, Any]]:
        task = self.get(task_id)
        return self.store.events(task.id, after_seq=after)

    # -- control -------------------------------------------------------------

    def cancel(self, task_id: str, *, grace: float = CANCEL_GRACE_S, wait: bool | None = None) -> Task:
        """Stop a task: SIGTERM to its runner, SIGKILL to everything tagged with it after `grace` seconds.

        In the studio (`wait` unset) it returns at once with the task in its "cancelling" phase and the
        escalation runs in a thread: an HTTP worker must not block for the grace period. The CLI waits,
        since nobody else would finish the job once it exits."""
        task = self.get(task_id)
        answer = lifecycle.answer(task.status_enum, Action.CANCEL, self._ask(task))
        if answer.refused:
            raise Conflict(f"task {task.id} {answer.refused}")
        if answer.move is not None:  # no process to stop, or a frozen one: killed outright, then cancelled
            if answer.move.stop_processes:
                self.executor.kill_all(task.id)
                procs.wait_gone(task.id, 5.0)
            with writing(self.home.root):
                task = self.store.apply(task.id, answer.move)
            if answer.move.releases:
                self.schedule()
            return task
        # Recorded before the signal is sent, or the exit would read as an interruption: if the store
        # cannot be written, the task is left running and the person is told why.
        with writing(self.home.root):
            self.store.update(task.id, cancel_requested_at=time.time(), phase="cancelling")
        with self._stopping_lock:
            if task.id in self._stopping:
                return self.store.get(task.id)  # asked twice: the first stop is under way
            self._stopping.add(task.id)
        stopper = threading.Thread(target=self._stop, args=(task, grace), name=f"cancel-{task.id}", daemon=True)
        stopper.start()
        if wait if wait is not None else not self.in_server:
            stopper.join()
        return self.store.get(task.id)

    def _stop(self, task: Task, grace: float) -> None:
        try:
            killed = self.executor.stop(task.dir, launch_of(task), task.id, grace=grace)
            if killed:
                log.warning(
                    "task %s did not stop within %.0fs of SIGTERM; killed %d process(es)", task.id, grace, killed
                )
            # Gone now: the exit record, or its absence with cancel requested, decides `cancelled`.
            self.supervisor.sync(self.store.get(task.id))
            log.info("task %s cancelled on request", task.id)
        except Exception:  # a thread's error would otherwise vanish; the watch loop still ends the task
            log.exception("cancelling task %s failed; the studio will look at it again", task.id)
        finally:
            with self._stopping_lock:
                self._stopping.discard(task.id)
            self.supervisor.poke()

    def pause(self, task_id: str, *, freeze: bool = False) -> Task:
        """Pause a task. Suspend (the default): the trainer saves a checkpoint at its next step and exits,
        freeing its slot or GPUs; a queued task is held. Freeze: SIGSTOP, instant, memory still held."""
        task = self.get(task_id)
        answer = lifecycle.answer(task.status_enum, Action.FREEZE if freeze else Action.PAUSE, self._ask(task))
        if answer.refused:
            raise Conflict(f"task {task.id} {answer.refused}")
        launch = launch_of(task)
        if answer.suspend:
            # The runner answers SIGUSR1 only once it is up (it writes launch.json after its handlers are in place).
            if launch is None or not task.dir.launch.exists():
                raise Conflict(f"task {task.id} is still starting its training process; pause it again in a moment")
            with writing(self.home.root):
                self.store.update(task.id, expect=task.status_enum, pause_requested_at=time.time(), phase="pausing")
            if not self.executor.signal(task.dir, launch, signal.SIGUSR1):
                self.store.update(task.id, pause_requested_at=None, phase=task.phase)
                raise Conflict(f"task {task.id} is ending by itself; there is nothing to pause")
            log.info("task %s pausing on request: the trainer checkpoints at its next step", task.id)
            return self.store.get(task.id)
        if answer.freeze and answer.move is not None:
            spare = launch.pid if launch else None
            self.executor.signal_all(task.id, signal.SIGSTOP, spare=spare)
            try:
                with writing(self.home.root):
                    task = self.store.apply(task.id, answer.move, frozen_at=time.time())
            except (LostRace, StorageError):
                self.executor.signal_all(task.id, signal.SIGCONT, spare=spare)  # it ended meanwhile: leave it be
                raise
            log.info("task %s frozen on request (its memory and %s stay held)", task.id, self._held(task.id))
            return task
        assert answer.move is not None
        with writing(self.home.root):
            return self.store.apply(task.id, answer.move)

    def resume(self, task_id: str) -> Task:
        """Continue a paused task: back into the queue from its checkpoint, or a frozen one thawed in place."""
        task = self.get(task_id)
        answer = lifecycle.answer(task.status_enum, Action.RESUME, self._ask(task, look=True))
        if answer.refused:
            raise Conflict(f"task {task.id} {answer.refused}")
        assert answer.move is not None
        move = answer.move
        if answer.thaw:
            launch = launch_of(task)
            if launch is not None and self.executor.poll(task.dir, launch) == lifecycle.Liveness.ALIVE:
                self.executor.signal_all(task.id, signal.SIGCONT, spare=launch.pid)
            else:
                assert answer.requeue is not None
                move = answer.requeue  # gone while frozen (a reboot): continue from its checkpoint instead
        with writing(self.home.root):
            task = self.store.apply(task.id, move)
        log.info("task %s: %s", task.id, move.reason)
        if move.dst == S.QUEUED:
            self.schedule()
        return self.store.get(task.id)

    def retry(self, task_id: str) -> Task:
        """Run a failed, cancelled or interrupted task again as its next attempt, from its newest complete checkpoint."""
        return self._requeue(task_id, Action.RETRY)

    def extend(self, task_id: str, *, epochs: float | None = None, steps: int | None = None) -> Task:
        """Train a completed task further, from its final state, as its next attempt of the same task."""
        task = self.get(task_id)
        config = task.config_dict
        optim = config.setdefault("optim", {})
        bounded_by_steps = (optim.get("max_steps") or -1) > 0
        if (epochs is None) == (steps is None):
            raise ValidationError("extend: give either --epochs N or --steps N (how much more to train)")
        if epochs is not None:
            if not 0 < epochs <= 10_000:
                raise ValidationError(f"--epochs: must be above 0 and at most 10,000 (got {epochs:g})")
            if bounded_by_steps:
                raise ValidationError(
                    f"task {task.id} stops at optim.max_steps={optim['max_steps']}; extend it with --steps N instead"
                )
            optim["epochs"] = float(optim.get("epochs") or 0) + epochs
        if steps is not None:
            if not 0 < steps <= 1_000_000_000:
                raise ValidationError(f"--steps: must be between 1 and 1,000,000,000 (got {steps})")
            if not bounded_by_steps:
                raise ValidationError(
                    f"task {task.id} trains for optim.epochs={optim.get('epochs')}; extend it with --epochs N instead"
                )
            optim["max_steps"] = int(optim["max_steps"]) + steps
        cfg = TrainingConfig.from_dict(config)  # the same checks as a submit
        return self._requeue(task_id, Action.EXTEND, config=cfg.to_dict())

    def _requeue(self, task_id: str, action: Action, config: dict[str, Any] | None = None) -> Task:
        task = self.get(task_id)
        answer = lifecycle.answer(task.status_enum, action, self._ask(task, look=True))
        if answer.refused:
            raise Conflict(f"task {task.id} {answer.refused}")
        assert answer.move is not None
        fields: dict[str, Any] = {}
        with writing(self.home.root):
            if config is not None:
                spec = read_json(task.dir.spec) or {}
                write_json_atomic(task.dir.spec, {**spec, "config": config})
                fields["config"] = json.dumps(config)
            try:
                task = self.store.apply(task.id, answer.move, **fields)
            except LostRace:
                if config is not None:
                    write_json_atomic(task.dir.spec, spec)
                raise
        log.info("task %s: %s", task.id, answer.move.reason)
        self.schedule()
        return self.store.get(task.id)

    def _ask(self, task: Task, *, look: bool = False) -> lifecycle.Ask:
        """What the lifecycle needs beside the status; `look`: find the newest complete checkpoint (reads files)."""
        resources = task.config_dict.get("resources") or {}
        step = None
        if look:
            newest = checkpoints.find_resume_checkpoint(task.dir.checkpoints)
            step = checkpoints.step_of(newest) if newest else None
        return lifecycle.Ask(
            frozen=bool(task.frozen_at),
            processes=int(resources.get("processes") or 1),
            attempt=task.attempt,
            checkpoint_step=step,
            ran=task.pid is not None or bool(self.store.attempts(task.id)),
        )

    def _held(self, task_id: str) -> str:
        return ", ".join(self.store.leases_of(task_id)) or "no lease"

    def history(self, task_id: str) -> dict[str, Any]:
        """A task's attempts and every status it went through, with why."""
        task = self.get(task_id)
        return {"attempts": self.store.attempts(task.id), "transitions": self.store.history(task.id)}

    def delete(self, task_id: str) -> None:
        task = self.get(task_id)
        refused = lifecycle.answer(task.status_enum, Action.DELETE, self._ask(task)).refused
        if refused:
            raise Conflict(f"task {task.id} {refused}")
        # A runner writes its exit record as its last act; give it a moment to be gone.
        if procs.tagged(task.id) and not procs.wait_gone(task.id, 5.0):
            raise Conflict(
                f"task {task.id} is {task.status} but its processes are still exiting; try again in a moment"
            )
        with writing(self.home.root):
            deleted = self.store.delete(task.id, only_if=lifecycle.deletable())
        if not deleted:
            raise Conflict(f"task {task.id} changed state while deleting; try again")
        shutil.rmtree(task.task_dir, ignore_errors=True)
        log.info("task %s deleted", task.id)

    # -- datasets and models -------------------------------------------------

    def receive_dataset(self) -> Incoming:
        """Start an upload: a side directory under datasets/ that the file streams into (see uploads.py)."""
        return Incoming(self.home.datasets, self.home.root, self.policy.max_upload_bytes)

    def add_dataset(self, incoming: Incoming) -> dict[str, Any]:
        """Check a received upload row by row and move it in among the datasets under a free name.
        Checked under its final name (so errors name the file the user sent), in its side directory:
        a bad upload never appears among the datasets."""
        from ftstudio.data import inspect_dataset

        assert incoming.path is not None
        try:
            info = inspect_dataset(incoming.path, max_row_bytes=self.policy.max_row_bytes)
        except ValidationError as e:  # the upload is the `file` field, not a data.path
            raise ValidationError([Problem("file", p.message) for p in e.problems]) from None
        with writing(self.home.root):
            target = self._free_name(incoming.path.name)
            os.rename(incoming.path, target)
        log.info("dataset %s uploaded (%d rows, %s, %d bytes)", target.name, info.rows, info.format, incoming.size)
        return {
            "name": target.name,
            "path": str(target),
            "format": info.format,
            "rows": info.rows,
            "preview": info.preview,
        }

    def upload_dataset(self, filename: str, stream: IO[bytes]) -> dict[str, Any]:
        """Upload from a file object (what the HTTP route does as the body streams in)."""
        incoming = self.receive_dataset()
        try:
            incoming.open(filename)
            while chunk := stream.read(1 << 20):
                incoming.write(chunk)
            incoming.close()
            return self.add_dataset(incoming)
        finally:
            incoming.discard()

    def _free_name(self, name: str) -> Path:
        """datasets/<name>, or <stem>-2<suffix>, -3, ... when taken (in any letter case)."""
        taken = {p.name.lower() for p in self.home.datasets.iterdir()}
        stem, dot, suffix = name.rpartition(".")
        candidate, n = name, 2
        while candidate.lower() in taken:
            candidate, n = f"{stem}-{n}{dot}{suffix}", n + 1
        return self.home.datasets / candidate

    def dataset(self, name: str) -> dict[str, Any]:
        """Format, row count and the first rows of a bundled or uploaded dataset."""
        from ftstudio.builtin import BUILTIN_DATASETS, resolve_dataset
        from ftstudio.data import inspect_dataset

        known = {d["name"] for d in self.datasets()}
        if name not in known:
            shown = name[:80] + ("…" if len(name) > 80 else "")
            raise NotFound(f"no dataset {shown!r}; upload it first (known: {', '.join(sorted(known)[:20])})")
        info = inspect_dataset(resolve_dataset(name, self.home.root), max_row_bytes=self.policy.max_row_bytes)
        return {
            "name": name,
            "builtin": name in BUILTIN_DATASETS,
            "format": info.format,
            "rows": info.rows,
            "preview": info.preview,
        }

    def datasets(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = [{"name": "builtin:sample", "builtin": True}]
        for path in sorted(self.home.datasets.iterdir()):
            # Links are not listed: an upload is always a plain file, and a planted link must not be served.
            if (
                path.is_file()
                and not path.is_symlink()
                and not path.name.startswith(".")
                and is_dataset_name(path.name)
            ):
                out.append({"name": path.name, "builtin": False, "size": path.stat().st_size})
        return out

    def models(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = [{"name": "builtin:tiny", "builtin": True}]
        rows = self.store._conn().execute(
            "SELECT model, max(created_at) AS last FROM tasks GROUP BY model ORDER BY last DESC LIMIT 20"
        )
        out += [{"name": r["model"], "builtin": False} for r in rows if not r["model"].startswith("builtin:")]
        return out

    # -- presentation --------------------------------------------------------

    def task_json(self, task: Task, waits: dict[str, scheduler.Wait] | None = None) -> dict[str, Any]:
        """The task as the API and `--json` show it. `waits`: the queue's plan, when the caller made one for many."""
        row = dict(task.row)
        status = task.status_enum
        now = self.supervisor.clock()
        started, finished = row.get("started_at"), row.get("finished_at")
        beat_age = heartbeat_age(task.dir, now) if status.has_process else None
        row.update(
            config=task.config_dict,
            percent=task.percent,
            elapsed_s=round((finished or now) - started, 1) if started else None,
            reattached=bool(row.get("reattached_at")) and status.has_process,
            heartbeat_age_s=beat_age,
            # A fact to show (a live runner that stopped beating), never a status: see lifecycle.stalled.
            stalled=lifecycle.stalled(status, beat_age),
            actions=list(lifecycle.actions(status, self._ask(task))),
            resources=self.store.leases_of(task.id) if status.has_process or row.get("frozen_at") else [],
            frozen=bool(row.get("frozen_at")),
            memory_limit=self._memory_limit(task),
            attempts=self.store.attempts(task.id),
            queue=self._queue_place(task, waits),
        )
        if status.has_process and row.get("pause_requested_at"):
            row["phase"] = "pausing"  # the trainer's own status events must not hide that a pause is under way
        for internal in ("events_offset", "pid_start_time", "boot_id", "cancel_requested_at", "frozen_at"):
            row.pop(internal, None)
        return row

    @staticmethod
    def _memory_limit(task: Task) -> dict[str, Any] | None:
        """The limit and the mechanism that enforces it, as the runner recorded them (launch.json, exit.json)."""
        if not (task.config_dict.get("resources") or {}).get("memory"):
            return None
        tdir = task.dir
        for path in (tdir.exit, tdir.launch):
            record = read_json(path) or {}
            if isinstance(record.get("memory_limit"), dict):
                return record["memory_limit"]
        return None

    def _queue_place(self, task: Task, waits: dict[str, scheduler.Wait] | None) -> dict[str, Any] | None:
        if task.status_enum != S.QUEUED:
            return None
        wait = (waits if waits is not None else self.plan().waits).get(task.id)
        if wait is None:  # free to start: the next look of the scheduler starts it
            return {"position": 0, "reason": "starting", "blocked_by": []}
        return {"position": wait.position, "reason": wait.reason, "blocked_by": list(wait.blocked_by)}

    def health(self) -> dict[str, Any]:
        return {"status": "ok", "version": __version__, "home": str(self.home.root)}


def require_task_dir(service: Service, task_id: str) -> TaskDir:
    task = service.get(task_id)
    tdir = task.dir
    if not tdir.path.is_dir():
        raise NotFound(f"the files of task {task_id} are gone from {tdir.path}")
    return tdir
