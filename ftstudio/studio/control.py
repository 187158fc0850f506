"""A person's requests on a task: cancel, pause (suspend or freeze), resume, retry, extend, delete.

What each request does to a task in its status is lifecycle.answer's decision; this module
gathers what it needs (`Ask`), sends the signals the answer calls for through the executor, and
applies the move in the store. One of the parts the service is composed of (service.py).
"""

from __future__ import annotations

import json
import logging
import shutil
import signal
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ftstudio import checkpoints
from ftstudio.config import TrainingConfig
from ftstudio.errors import Conflict, StorageError, ValidationError
from ftstudio.execution import facts, procs
from ftstudio.home import read_json, write_json_atomic
from ftstudio.storage import writing
from ftstudio.studio import lifecycle
from ftstudio.studio.lifecycle import Action
from ftstudio.studio.store import LostRace, Task
from ftstudio.studio.supervisor import launch_of
from ftstudio.studio.task import TaskStatus

if TYPE_CHECKING:
    from ftstudio.home import Home
    from ftstudio.studio.store import Store
    from ftstudio.studio.supervisor import Supervisor

log = logging.getLogger("ftstudio")

S = TaskStatus
CANCEL_GRACE_S = 10.0


class Control:
    def __init__(
        self,
        home: Home,
        store: Store,
        supervisor: Supervisor,
        *,
        in_server: bool,
        get: Callable[[str], Task],
        schedule: Callable[[], list[str]],
    ) -> None:
        """`get`: a task as the service reads it (brought up to date where no studio watches);
        `schedule`: the queue's start of whatever can start now (launcher.py)."""
        self.home = home
        self.store = store
        self.supervisor = supervisor
        self.in_server = in_server
        self.get = get
        self.schedule = schedule
        self._stopping: set[str] = set()  # tasks whose cancel is under way
        self._stopping_lock = threading.Lock()

    def cancel(self, task_id: str, *, grace: float = CANCEL_GRACE_S, wait: bool | None = None) -> Task:
        """Stop a task: SIGTERM to its runner, SIGKILL to everything tagged with it after `grace` seconds.

        In the studio (`wait` unset) it returns at once with the task in its "cancelling" phase and the
        escalation runs in a thread: an HTTP worker must not block for the grace period. The CLI waits,
        since nobody else would finish the job once it exits."""
        for _ in range(5):
            task = self.get(task_id)
            answer = lifecycle.answer(task.status, Action.CANCEL, self.ask(task))
            if answer.refused:
                raise Conflict(f"task {task.id} {answer.refused}")
            if answer.move is None:
                break  # a process to stop: below
            # No process to stop, or a frozen one: killed outright, then cancelled.
            if answer.move.stop_processes:
                self.supervisor.executor_for(task).kill_all(task.id)
                procs.wait_gone(task.id, 5.0)
            try:
                with writing(self.home.root):
                    task = self.store.apply(task.id, answer.move)
            except LostRace:
                # It moved meanwhile: a queued task the launcher claimed for a slot just freed (by the cancel of
                # the task before it, say). Ask again with its status now, which has a process to stop.
                continue
            if answer.move.releases:
                self.schedule()
            return task
        else:
            raise Conflict(f"task {task_id} kept changing state while it was being cancelled; cancel it again")
        # Recorded before the signal is sent, or the exit would read as an interruption: if the store
        # cannot be written, the task is left running and the person is told why. The file tells the runner
        # the SIGTERM is a person's cancel (stop now), not a shutdown (checkpoint first, resume later).
        with writing(self.home.root):
            self.store.update(task.id, cancel_requested_at=time.time(), phase="cancelling")
            write_json_atomic(task.dir.cancel_request, {"requested_at": time.time()})
        with self._stopping_lock:
            if task.id in self._stopping:
                return self.store.get(task.id)  # asked twice: the first stop is under way
            self._stopping.add(task.id)
        stopper = threading.Thread(target=self._stop, args=(task, grace), name=f"cancel-{task.id}", daemon=True)
        stopper.start()
        if wait if wait is not None else not self.in_server:
            stopper.join()
        return self.store.get(task.id)

    def _launched(self, task: Task) -> Task:
        """The task once its runner is recorded. A cancel can come between the launcher's claim (the task is
        preparing) and its record of the runner's pid: there is nothing to signal yet, and the launcher has
        just cleared the task's request files for the new attempt. Wait for the pid, then ask again in the
        file, so the runner it started is stopped as a cancel, not left to train to the end."""
        deadline = time.monotonic() + lifecycle.LAUNCH_GRACE_S
        while launch_of(task) is None and task.status == TaskStatus.PREPARING and time.monotonic() < deadline:
            time.sleep(0.1)
            task = self.store.get(task.id)
        if launch_of(task) is not None and not task.dir.cancel_request.exists():
            write_json_atomic(task.dir.cancel_request, {"requested_at": task.cancel_requested_at or time.time()})
        return task

    def _stop(self, task: Task, grace: float) -> None:
        try:
            task = self._launched(task)
            killed = self.supervisor.executor_for(task).stop(task.dir, launch_of(task), task.id, grace=grace)
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
        answer = lifecycle.answer(task.status, Action.FREEZE if freeze else Action.PAUSE, self.ask(task))
        if answer.refused:
            raise Conflict(f"task {task.id} {answer.refused}")
        launch = launch_of(task)
        if answer.suspend:
            # The runner answers SIGUSR1 only once it is up (it writes launch.json after its handlers are in place).
            if launch is None or not task.dir.launch.exists():
                raise Conflict(f"task {task.id} is still starting its training process; pause it again in a moment")
            with writing(self.home.root):
                self.store.update(task.id, expect=task.status, pause_requested_at=time.time(), phase="pausing")
                write_json_atomic(task.dir.pause_request, {"requested_at": time.time()})
            if not self.supervisor.executor_for(task).signal(task.dir, launch, signal.SIGUSR1):
                self.store.update(task.id, pause_requested_at=None, phase=task.phase)
                raise Conflict(f"task {task.id} is ending by itself; there is nothing to pause")
            log.info("task %s pausing on request: the trainer checkpoints at its next step", task.id)
            return self.store.get(task.id)
        if answer.freeze and answer.move is not None:
            spare = launch.pid if launch else None
            self.supervisor.executor_for(task).signal_all(task.id, signal.SIGSTOP, spare=spare)
            try:
                with writing(self.home.root):
                    task = self.store.apply(task.id, answer.move, frozen_at=time.time())
            except (LostRace, StorageError):
                self.supervisor.executor_for(task).signal_all(
                    task.id, signal.SIGCONT, spare=spare
                )  # it ended meanwhile: leave it be
                raise
            log.info("task %s frozen on request (its memory and %s stay held)", task.id, self._held(task.id))
            return task
        assert answer.move is not None
        with writing(self.home.root):
            return self.store.apply(task.id, answer.move)

    def resume(self, task_id: str) -> Task:
        """Continue a paused task: back into the queue from its checkpoint, or a frozen one thawed in place."""
        task = self.get(task_id)
        answer = lifecycle.answer(task.status, Action.RESUME, self.ask(task, look=True))
        if answer.refused:
            raise Conflict(f"task {task.id} {answer.refused}")
        assert answer.move is not None
        move = answer.move
        if answer.thaw:
            launch = launch_of(task)
            if launch is not None and self.supervisor.executor_for(task).poll(task.dir, launch) == facts.Liveness.ALIVE:
                self.supervisor.executor_for(task).signal_all(task.id, signal.SIGCONT, spare=launch.pid)
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
        answer = lifecycle.answer(task.status, action, self.ask(task, look=True))
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

    def ask(self, task: Task, *, look: bool = False) -> lifecycle.Ask:
        """What the lifecycle needs beside the status; `look`: find the newest complete checkpoint (reads files)."""
        resources = task.config_dict.get("resources") or {}
        step = None
        if look:
            newest = checkpoints.find_resume_checkpoint(task.dir.checkpoints)
            step = checkpoints.step_of(newest) if newest else None
        return lifecycle.Ask(
            frozen=bool(task.frozen_at),
            processes=int(resources.get("processes") or 1),
            cluster=self.supervisor.executor_for(task).cluster,
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
        refused = lifecycle.answer(task.status, Action.DELETE, self.ask(task)).refused
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
