"""The queue's side of the service: slots, the plan, claiming a task with its leases, launching it.

One of the parts the service is composed of (service.py), with `Control` (control.py) and
`Catalog` (catalog.py). The decision of who starts is scheduler.py's; this module gathers its
inputs and acts on its answer.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ftstudio import checkpoints
from ftstudio.errors import LaunchError, UserError, ValidationError
from ftstudio.home import write_json_atomic
from ftstudio.resources import Want, cuda_env, want_of
from ftstudio.storage import writing
from ftstudio.studio import journal, lifecycle, scheduler
from ftstudio.studio.policy import MAX_SLOTS
from ftstudio.studio.scheduler import Grant, Plan, Wait, Waiting
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

    def scheduling(self) -> threading.Lock:
        """Held while a plan is made and carried out: the executor is swapped only between plans."""
        return self._scheduling

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
        with the executor that launched them). Returns a line for the person.

        Slurm's settings are tried first. Its commands must answer and the partition exist (seconds: refused at
        once). Settings a check job already passed with take effect at once: `studio start` again after a crash,
        while the task's own job may fill the partition, must not wait for a check job to be scheduled. Changed
        settings are remembered as *pending*: the studio runs their check job while it serves (`finish_check`),
        and the executor in use stays as it was until that job has seen the home from a compute node."""
        if kind == "local":
            with writing(self.home.root):
                self.store.set_setting("executor", "local")
                self.store.set_setting("executor_pending", "")
            return "new fine-tunes run on this machine"
        if kind != "slurm" or slurm is None:
            raise ValidationError(f"--executor: {kind!r} is not one of local, slurm")
        from ftstudio.execution.slurm import SlurmExecutor, check_commands

        executor = SlurmExecutor(slurm)
        unworkable = slurm.unworkable()
        if unworkable:
            raise ValidationError("; ".join(unworkable))
        wanted = json.dumps(slurm.to_json(), sort_keys=True)
        checked = self.store.setting("slurm_checked")
        if not check:
            said = f"Slurm partition {slurm.partition}, not checked"
        elif checked is not None and json.loads(checked).get("settings") == wanted:
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(json.loads(checked).get("at", 0)))
            said = f"Slurm partition {slurm.partition}: the settings checked on {when}, unchanged; not checked again"
        else:
            check_commands(executor)
            with writing(self.home.root):
                pending = {"settings": slurm.to_json(), "since": time.time()}
                self.store.set_setting("executor_pending", json.dumps(pending))
            before = self._in_use()
            return (
                f"Slurm partition {slurm.partition} answers; the studio now runs a check job to confirm that its "
                f"nodes see the home {self.home.root}. Until it passes, {before}; `ftstudio studio status` says how "
                "it went"
            )
        self._use_slurm(slurm, checked=check)
        return said

    def _use_slurm(self, slurm: SlurmSettings, *, checked: bool) -> None:
        with writing(self.home.root):
            self.store.set_setting("slurm", json.dumps(slurm.to_json()))
            if checked:
                wanted = json.dumps(slurm.to_json(), sort_keys=True)
                self.store.set_setting("slurm_checked", json.dumps({"settings": wanted, "at": time.time()}))
            self.store.set_setting("executor", "slurm")
            self.store.set_setting("executor_pending", "")

    def _in_use(self) -> str:
        """What new fine-tunes do while a check is pending, in the person's words."""
        if (self.store.setting("executor") or "local") != "slurm":
            return "new fine-tunes wait in the queue (they would run on this machine otherwise)"
        return "new fine-tunes go to Slurm with the settings checked before"

    def _object_setting(self, key: str) -> dict[str, Any] | None:
        """A setting kept as a JSON object; None when unset, emptied or not an object."""
        raw = self.store.setting(key)
        try:
            value = json.loads(raw) if raw else None
        except ValueError:
            return None
        return value if isinstance(value, dict) else None

    def pending(self) -> dict[str, Any] | None:
        """Slurm settings waiting for their check job: {"settings", "since"}; None when there are none."""
        value = self._object_setting("executor_pending")
        return value if value is not None and isinstance(value.get("settings"), dict) else None

    def finish_check(self, stop: threading.Event | None = None) -> tuple[bool, str] | None:
        """Run the check job of the pending settings (the serving studio does, in a thread of its own): on a pass
        they are the executor's from now on. Returns (passed, line), or None when nothing was pending. A studio
        that stops first leaves them pending, to be checked at its next start."""
        from ftstudio.execution.slurm import BACKGROUND_CHECK_S, SlurmError, SlurmExecutor, SlurmSettings, check_job

        pending = self.pending()
        if pending is None:
            return None
        try:
            settings = SlurmSettings.from_json(pending["settings"])
            line = check_job(SlurmExecutor(settings), self.home.root, wait_s=BACKGROUND_CHECK_S, stop=stop)
            passed = True
        except (SlurmError, ValueError, TypeError, UserError, OSError) as e:
            if stop is not None and stop.is_set():
                return None
            passed, line = False, str(e)
        with writing(self.home.root):
            if self.pending() != pending:
                return None  # newer settings came while this one ran: theirs is the check that counts
            if passed:
                self._use_slurm(settings, checked=True)
            else:
                self.store.set_setting("executor_pending", "")
            result = {
                "passed": passed,
                "line": line,
                "at": time.time(),
                "partition": pending["settings"].get("partition"),
            }
            self.store.set_setting("executor_check", json.dumps(result))
        return passed, line

    def last_check(self) -> dict[str, Any] | None:
        """How the last check of changed Slurm settings went: {"passed", "line", "at", "partition"}."""
        return self._object_setting("executor_check")

    def held(self) -> str | None:
        """Why no new task starts now: a pending check that would move new fine-tunes from this machine to Slurm
        (a person who asked for Slurm does not want them on a login node meanwhile)."""
        pending = self.pending()
        if pending is None or self.executor.cluster:
            return None
        since = time.strftime("%H:%M", time.localtime(pending.get("since") or 0))
        partition = str(pending["settings"].get("partition") or "")[:64]
        return f"waits for the check of Slurm partition {partition} (started {since}; `ftstudio studio status`)"

    def plan(self) -> Plan:
        """Who would start now, and why each other queued task waits."""
        waiting = [
            Waiting(t.id, self._want(t), t.priority or 0, t.created_at) for t in self.store.with_status(S.QUEUED)
        ]
        held = self.held()
        if held is not None:
            return Plan(waits={w.task_id: Wait(n, held) for n, w in enumerate(scheduler.order(waiting), 1)})
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
        from ftstudio.studio.exports import active

        # Export jobs likewise: they hold no lease, take turns among themselves and run at a lower priority.
        exports = active(self.home.root)
        return {
            "slots": self.slots(),
            "gpus": list(self.gpus),
            "running": running,
            "waiting": waiting,
            "chats": chats,
            "exports": exports,
        }

    def queue_place(self, task: Task, waits: dict[str, scheduler.Wait] | None) -> dict[str, Any] | None:
        if task.status != S.QUEUED:
            return None
        wait = (waits if waits is not None else self.plan().waits).get(task.id)
        if wait is None:  # free to start: the next look of the scheduler starts it
            return {"position": 0, "reason": "starting", "blocked_by": []}
        return {"position": wait.position, "reason": wait.reason, "blocked_by": list(wait.blocked_by)}
