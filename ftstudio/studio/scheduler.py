"""The queue's one decision: which waiting tasks start now, with which slot or GPUs, and why the
others wait. Pure: the service hands it a snapshot (waiting tasks, leases held, the machine's slots
and GPUs) and claims what it grants in the store, where a lease is taken in the same transaction
as the task's move, so two launchers never hand out the same GPU.

Order: higher priority first, then submission order. A task may start ahead of an earlier one
only with resources no earlier waiting task is waiting for, so a big request at the head of the
queue (2 GPUs while one is free) is never starved by small ones behind it, while a task wanting a
GPU nobody ahead of it wants still starts (backfill, the way Slurm does it).

Resources are named `slot:N` (a training slot, for tasks that use no GPU; `studio start --slots`)
and `gpu:N` (a GPU by its nvidia-smi number). A GPU is held by one task unless every task on it
asked to share it (`--share-gpu`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from ftstudio.resources import Want


@dataclass(frozen=True)
class Lease:
    resource: str
    task_id: str
    shared: bool = False


@dataclass(frozen=True)
class Waiting:
    """A queued task as the scheduler sees it."""

    task_id: str
    want: Want
    priority: int = 0
    created_at: float = 0.0


@dataclass(frozen=True)
class Grant:
    """Start this task with these resources."""

    task_id: str
    resources: tuple[str, ...]
    shared: bool = False

    @property
    def gpu_ids(self) -> tuple[int, ...]:
        return tuple(int(r.partition(":")[2]) for r in self.resources if r.startswith("gpu:"))


@dataclass(frozen=True)
class Wait:
    """Why a queued task has not started, for a person: its place and what it waits for."""

    position: int
    """1 for the next task to start."""
    reason: str
    blocked_by: tuple[str, ...] = ()
    """The tasks holding (or first in line for) what it waits for."""


@dataclass
class Plan:
    starts: list[Grant] = field(default_factory=list)
    waits: dict[str, Wait] = field(default_factory=dict)


def order(waiting: Iterable[Waiting]) -> list[Waiting]:
    return sorted(waiting, key=lambda w: (-w.priority, w.created_at, w.task_id))


def slot(n: int) -> str:
    return f"slot:{n}"


def gpu(n: int) -> str:
    return f"gpu:{n}"


def plan(waiting: Iterable[Waiting], held: Sequence[Lease], *, slots: int, gpus: Sequence[int]) -> Plan:
    """Who starts now and why the rest wait."""
    holders: dict[str, list[Lease]] = {}
    for lease in held:
        holders.setdefault(lease.resource, []).append(lease)
    taken: dict[str, str] = {}  # granted in this plan -> to whom
    reserved: dict[str, str] = {}  # free, but an earlier waiting task waits for it -> that task
    slot_line: str | None = None  # the first task waiting for a slot: every later one waits behind it
    out = Plan()
    machine_gpus = set(gpus)

    def free(resource: str, share: bool) -> bool:
        if resource in taken:
            return False
        on_it = holders.get(resource, [])
        return not on_it or (share and all(lease.shared for lease in on_it))

    def held_by(resources: Iterable[str]) -> tuple[str, ...]:
        resources = list(resources)
        ids = [lease.task_id for r in resources for lease in holders.get(r, [])] + [
            taken[r] for r in resources if r in taken
        ]
        return tuple(dict.fromkeys(ids))

    position = 0
    for task in order(waiting):
        want = task.want

        def wait(reason: str, blocked_by: tuple[str, ...] = (), task: Waiting = task) -> None:
            nonlocal position
            position += 1
            out.waits[task.task_id] = Wait(position, reason, blocked_by)

        if not want.needs_gpu:
            all_slots = [slot(n) for n in range(slots)]
            if slot_line is None:
                open_slots = [s for s in all_slots if free(s, False) and s not in reserved]
                if open_slots:
                    taken[open_slots[0]] = task.task_id
                    out.starts.append(Grant(task.task_id, (open_slots[0],)))
                    continue
                slot_line = task.task_id
                by = held_by(r for r in [*holders, *taken] if r.startswith("slot:"))
                wait(f"waiting for a training slot ({_count(slots, 'slot')}, held by {_tasks(by)})", by)
            else:
                wait(f"waiting behind task {slot_line} for a training slot", (slot_line,))
            continue

        if want.gpu_ids:
            missing = [n for n in want.gpu_ids if n not in machine_gpus]
            if missing:
                wait(f"waiting for {_gpu_list(missing)}, which this machine does not have ({_machine(gpus)})")
                continue
            wanted = [gpu(n) for n in want.gpu_ids]
            if all(free(r, want.share) and r not in reserved for r in wanted):
                for r in wanted:
                    taken[r] = task.task_id
                out.starts.append(Grant(task.task_id, tuple(wanted), want.share))
                continue
            busy = [r for r in wanted if not free(r, want.share)]
            ahead = [r for r in wanted if r in reserved and r not in busy]
            for r in wanted:
                reserved.setdefault(r, task.task_id)
            if busy:
                by = held_by(busy)
                wait(f"waiting for {_gpu_list(_numbers(busy))}, held by {_tasks(by)}", by)
            else:
                by = tuple(dict.fromkeys(reserved_by for r in ahead if (reserved_by := reserved[r]) != task.task_id))
                wait(f"waiting behind {_tasks(by)} for {_gpu_list(_numbers(ahead))}", by)
            continue

        if want.gpus > len(gpus):
            wait(f"waiting for {_count(want.gpus, 'GPU')}; this machine has {_machine(gpus)}")
            continue
        usable = [gpu(n) for n in sorted(gpus) if free(gpu(n), want.share) and gpu(n) not in reserved]
        if len(usable) >= want.gpus:
            chosen = tuple(usable[: want.gpus])
            for r in chosen:
                taken[r] = task.task_id
            out.starts.append(Grant(task.task_id, chosen, want.share))
            continue
        # Keep what is free for this task, so smaller requests behind it cannot starve it.
        for r in usable:
            reserved.setdefault(r, task.task_id)
        busy = [gpu(n) for n in sorted(gpus) if not free(gpu(n), want.share)]
        by = held_by(busy)
        have = f"{len(usable)} free" if usable else "none free"
        wait(f"waiting for {_count(want.gpus, 'GPU')} ({have}; {_gpu_list(_numbers(busy))} held by {_tasks(by)})", by)
    return out


def _numbers(resources: Iterable[str]) -> list[int]:
    return [int(r.partition(":")[2]) for r in resources]


def _count(n: int, what: str) -> str:
    return f"{n} {what}" + ("" if n == 1 else "s")


def _gpu_list(ids: Sequence[int]) -> str:
    if len(ids) == 1:
        return f"GPU {ids[0]}"
    return "GPUs " + ", ".join(map(str, ids))


def _machine(gpus: Sequence[int]) -> str:
    return f"{_gpu_list(sorted(gpus))}" if gpus else "no GPU"


def _tasks(ids: Sequence[str]) -> str:
    if not ids:
        return "nobody (about to be free)"
    shown = ", ".join(ids[:3]) + (f" and {len(ids) - 3} more" if len(ids) > 3 else "")
    return f"task {shown}" if len(ids) == 1 else f"tasks {shown}"
