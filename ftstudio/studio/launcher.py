"""The queue's side of the service: slots, the plan, claiming a task with its leases, launching it.

One of the parts the service is composed of (service.py), with `Control` (control.py) and
`Catalog` (catalog.py). The decision of who starts is scheduler.py's; this module gathers its
inputs and acts on its answer.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ftstudio import checkpoints
from ftstudio.errors import LaunchError, ValidationError
from ftstudio.home import write_json_atomic
from ftstudio.resources import Want, cuda_env, want_of
from ftstudio.storage import writing
from ftstudio.studio import journal, lifecycle, scheduler
from ftstudio.studio.policy import MAX_SLOTS
from ftstudio.studio.scheduler import Grant, Plan, Waiting
from ftstudio.studio.store import LostRace, Task
from ftstudio.studio.task import TaskStatus

if TYPE_CHECKING:
    from ftstudio.execution.executor import Executor
    from ftstudio.execution.slurm import SlurmSettings
    from ftstudio.home import Home
    from ftstudio.studio.store import Store

log = logging.getLogger("ftstudio")

S = TaskStatus
DEFAULT_SLOTS = 1  # training slots for tasks without a GPU: one at a time, so two CPU runs never halve each other


class Launcher:
    def __init__(
        self,
        home: Home,
        store: Store,
        executor: Executor,
        gpus: tuple[int, ...],
        *,
        yield_chat: Callable[[str, tuple[str, ...]], None] = lambda task_id, resources: None,
    ) -> None:
        """`executor`: where new tasks go; `gpus`: this machine's, that the queue hands out;
        `yield_chat`: called as a task is about to start on its resources (the service stops a chat
        worker that uses them: training comes first)."""
        self.home = home
        self.store = store
        self.executor = executor
        self.gpus = gpus
        self.yield_chat = yield_chat
        self._scheduling = threading.Lock()  # one plan at a time in this process (the store guards the rest)

    def slots(self) -> int:
        """Training slots for tasks without a GPU, as `studio start --slots` last set them in this home."""
        value = self.store.setting("slots")
        return int(value) if value and value.isdigit() else DEFAULT_SLOTS

    def set_slots(self, slots: int) -> None:
        if not 1 <= slots <= MAX_SLOTS:
            raise ValidationError(f"--slots: must be between 1 and {MAX_SLOTS} (got {slots})")
        with writing(self.home.root):
            self.store.set_setting("slots", str(slots))

    def set_executor(self, kind: str, slurm: SlurmSettings | None = None, *, check: bool = True) -> str:
        """`studio start --executor`: where new tasks run, remembered in the home (tasks already launched stay
        with the executor that launched them). Slurm's settings are tried first: its commands answer, the
        partition exists, and a job on a compute node sees the home. Returns a line for the person."""
        import json

        if kind == "local":
            with writing(self.home.root):
                self.store.set_setting("executor", "local")
            return "new fine-tunes run on this machine"
        if kind != "slurm" or slurm is None:
            raise ValidationError(f"--executor: {kind!r} is not one of local, slurm")
        from ftstudio.execution.slurm import SlurmExecutor, check_cluster

        executor = SlurmExecutor(slurm)
        unworkable = slurm.unworkable()
        if unworkable:
            raise ValidationError("; ".join(unworkable))
        wanted = json.dumps(slurm.to_json(), sort_keys=True)
        checked = self.store.setting("slurm_checked")
        if check and checked is not None and json.loads(checked).get("settings") == wanted:
            # The same settings a check job already passed with: `studio start` again after a crash, while
            # the task's own job may fill the partition, must not wait for a check job to be scheduled.
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(json.loads(checked).get("at", 0)))
            said = f"Slurm partition {slurm.partition}: the settings checked on {when}, unchanged; not checked again"
        elif check:
            said = check_cluster(executor, self.home.root)
        else:
            said = f"Slurm partition {slurm.partition}, not checked"
        with writing(self.home.root):
            self.store.set_setting("slurm", json.dumps(slurm.to_json()))
            self.store.set_setting("executor", "slurm")
            if check:
                self.store.set_setting("slurm_checked", json.dumps({"settings": wanted, "at": time.time()}))
        return said

    def plan(self) -> Plan:
        """Who would start now, and why each other queued task waits."""
        waiting = [
            Waiting(t.id, self._want(t), t.priority or 0, t.created_at) for t in self.store.with_status(S.QUEUED)
        ]
        if self.executor.cluster:
            # The cluster's scheduler queues and places jobs: every queued task is submitted (up to the
            # studio's pending limit, checked at submit), and waits in its queue, not ours.
            return scheduler.plan(waiting, self.store.leases(), slots=MAX_SLOTS, gpus=())
        return scheduler.plan(waiting, self.store.leases(), slots=self.slots(), gpus=self.gpus)

    def _want(self, task: Task) -> Want:
        if self.executor.cluster:
            return Want()  # a slot lease only: GPUs are the cluster's to give (sbatch --gpus-per-node)
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
        # A new attempt starts without the last one's records, and with its number on disk first: a runner of
        # any other attempt (a stale one waking up) sees it is not the current one (fencing).
        # The number first: a runner starting now (a requeued Slurm job) reads it before the old records go.
        write_json_atomic(tdir.attempt, task.attempt)
        for stale in (tdir.exit, tdir.launch, tdir.heartbeat, tdir.cancel_request, tdir.pause_request):
            stale.unlink(missing_ok=True)
        # Where the studio manages GPUs the task sees exactly its own (none for a CPU task); where it found
        # none (no nvidia-smi), the environment is left alone rather than hiding GPUs it cannot count.
        env = cuda_env(grant.gpu_ids) if self.gpus and not self.executor.cluster else {}
        self.yield_chat(task.id, grant.resources)  # training first: a chat on its GPU or slot stops now
        try:
            launch = self.executor.submit(tdir, attempt=task.attempt, env=env)
        except LaunchError as e:
            self.store.apply(task.id, lifecycle.launch_failed(str(e)))
            raise
        self.store.update(
            task.id,
            pid=launch.pid or None,  # a cluster job has no pid here: its job id stands for it
            pid_start_time=launch.start_time,
            boot_id=launch.boot_id,
            pgid=launch.pgid,
            job_id=launch.job_id,
            executor=self.executor.name,
        )
        journal.append(
            tdir.path, {"kind": "launched", "ts": time.time(), "executor": self.executor.name, "job_id": launch.job_id}
        )
        held = ", ".join(grant.resources) or "no lease"
        where = f"Slurm job {launch.job_id}" if launch.job_id else f"runner pid {launch.pid}"
        log.info("task %s launched (%s, attempt %s, %s)", task.id, where, task.attempt, held)
        return True

    def queue(self) -> dict[str, Any]:
        """What runs, what waits and for what (`ftstudio queue`, `GET /api/queue`)."""
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
        from ftstudio.chat.process import running_chats

        # The chat workers beside the queue: they hold no lease and give way when training needs their place.
        chats = running_chats(self.home.chats)
        return {"slots": self.slots(), "gpus": list(self.gpus), "running": running, "waiting": waiting, "chats": chats}

    def queue_place(self, task: Task, waits: dict[str, scheduler.Wait] | None) -> dict[str, Any] | None:
        if task.status != S.QUEUED:
            return None
        wait = (waits if waits is not None else self.plan().waits).get(task.id)
        if wait is None:  # free to start: the next look of the scheduler starts it
            return {"position": 0, "reason": "starting", "blocked_by": []}
        return {"position": wait.position, "reason": wait.reason, "blocked_by": list(wait.blocked_by)}
