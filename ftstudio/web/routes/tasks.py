"""Tasks: submit, list, read, a person's requests on a task, its logs, metrics, held-out answers and
its live stream of events."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncGenerator
from typing import Any

import psutil
from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.concurrency import run_in_threadpool

from ftstudio import __version__
from ftstudio.studio.service import Service
from ftstudio.web.api_input import OFFSET_MAX, SEQ_MAX, TaskCreate, TaskExtend, last_event_id, short_numbers
from ftstudio.web.broker import Broker
from ftstudio.web.context import BrokerDep, ServiceDep, StartedAt
from ftstudio.web.eventstream import EventStream

router = APIRouter(prefix="/api", dependencies=[Depends(short_numbers)])

PING_S = 15.0
SSE_NAME = re.compile(r"[a-z_]{1,32}")
STREAM_BATCH = 1000


@router.post("/tasks", status_code=201)
def create_task(body: TaskCreate, service: ServiceDep) -> dict[str, Any]:
    return service.task_json(service.submit(body.config, body.name, strict=body.strict))


@router.post("/tasks/check")
def check_task(body: TaskCreate, service: ServiceDep) -> dict[str, Any]:
    """Every check a submit makes, and the run's memory estimate; records and starts nothing (a dry run)."""
    return service.dry_run(body.config)


@router.post("/tasks/estimate")
def estimate_task(body: TaskCreate, service: ServiceDep) -> dict[str, Any]:
    """The run's memory estimate against what this machine has, as the New fine-tune form's settings change;
    `memory` is null when the model is not on this machine to count from."""
    return service.estimate_memory(body.config)


@router.post("/tasks/timing")
def task_timing(body: TaskCreate, service: ServiceDep) -> dict[str, Any]:
    """The run's time per epoch on this machine, as measured for these settings (`state` done, with the range),
    or why not yet: `none` (not measured), `running`, `failed` (with `message`), `unsupported` (with `message`).
    Checked as a submit is."""
    return service.time_estimate(body.config)


@router.get("/tasks/timing/{key}")
def timing_of(key: str, service: ServiceDep) -> dict[str, Any]:
    """A measurement by the `key` that POST /api/tasks/timing/measure answered: what the page asks while it runs."""
    return service.time_estimate_of(key)


@router.post("/tasks/timing/measure")
def measure_timing(
    body: TaskCreate,
    service: ServiceDep,
    response: Response,
    again: bool = Query(False, description="measure anew even when these settings were measured already"),
) -> dict[str, Any]:
    """Time a few real training steps of the run here (training/calibration.py), unless they are timed already:
    202 while they run (ask GET /api/tasks/timing/{key} until `state` is done or failed), 200 when kept; 409
    while another measurement runs on this machine."""
    found = service.time_estimate(body.config, start=True, again=again)
    if found["state"] == "running":
        response.status_code = 202
    return found


@router.get("/tasks")
def list_tasks(
    service: ServiceDep,
    limit: int = Query(50, ge=1, le=1000),
    offset: int = Query(0, ge=0, le=OFFSET_MAX),
    status: str | None = Query(None, max_length=64),
) -> dict[str, Any]:
    return service.task_page(limit=limit, offset=offset, status=status)


@router.get("/tasks/{task_id}")
def get_task(task_id: str, service: ServiceDep) -> dict[str, Any]:
    return service.task_json(service.get(task_id))


@router.delete("/tasks/{task_id}", status_code=204)
def delete_task(task_id: str, service: ServiceDep) -> Response:
    service.delete(task_id)
    return Response(status_code=204)


@router.post("/tasks/{task_id}/cancel")
def cancel_task(task_id: str, service: ServiceDep) -> dict[str, Any]:
    return service.task_json(service.cancel(task_id))


@router.post("/tasks/{task_id}/pause")
def pause_task(
    task_id: str,
    service: ServiceDep,
    freeze: bool = Query(False, description="SIGSTOP instead of a checkpoint: instant, memory stays held"),
) -> dict[str, Any]:
    return service.task_json(service.pause(task_id, freeze=freeze))


@router.post("/tasks/{task_id}/freeze")
def freeze_task(task_id: str, service: ServiceDep) -> dict[str, Any]:
    """Pause with SIGSTOP (the `freeze` action): the same as pause?freeze=true."""
    return service.task_json(service.pause(task_id, freeze=True))


@router.post("/tasks/{task_id}/resume")
def resume_task(task_id: str, service: ServiceDep) -> dict[str, Any]:
    return service.task_json(service.resume(task_id))


@router.post("/tasks/{task_id}/retry")
def retry_task(task_id: str, service: ServiceDep) -> dict[str, Any]:
    return service.task_json(service.retry(task_id))


@router.post("/tasks/{task_id}/extend")
def extend_task(task_id: str, body: TaskExtend, service: ServiceDep) -> dict[str, Any]:
    return service.task_json(service.extend(task_id, epochs=body.epochs, steps=body.steps))


@router.get("/tasks/{task_id}/history")
def task_history(task_id: str, service: ServiceDep) -> dict[str, Any]:
    return service.history(task_id)


@router.get("/tasks/{task_id}/logs")
def task_logs(
    task_id: str,
    service: ServiceDep,
    offset: int = Query(0, ge=-SEQ_MAX, le=SEQ_MAX, description="negative: the last -offset bytes"),
    limit: int = Query(64 << 10, ge=1, le=SEQ_MAX, description="bytes; at most 1 MiB is sent"),
) -> dict[str, Any]:
    return service.logs(task_id, offset, limit)


@router.get("/tasks/{task_id}/metrics")
def task_metrics(task_id: str, service: ServiceDep, after: int = Query(0, ge=0, le=SEQ_MAX)) -> dict[str, Any]:
    return {"events": service.metrics(task_id, after)}


@router.get("/tasks/{task_id}/samples")
def task_samples(task_id: str, service: ServiceDep) -> dict[str, Any]:
    """The held-out prompts (`evaluation.prompts`) as the fine-tune and the base model answered them:
    one stage per checkpoint that answered them and one `final`, oldest first."""
    return {"stages": service.samples(task_id)}


@router.get("/tasks/{task_id}/stream")
async def task_stream(
    task_id: str,
    request: Request,
    service: ServiceDep,
    broker: BrokerDep,
    started_at: StartedAt,
    after: int = Query(0, ge=0, le=SEQ_MAX),
) -> EventStream:
    await run_in_threadpool(service.get, task_id)  # 404 before the stream starts
    # A header that is not one of our ids is ignored, as if the page had sent none.
    header = last_event_id(request.headers.get("last-event-id", ""))
    last = header if header is not None else after
    return EventStream(_stream(service, broker, task_id, last, request, started_at))


async def _stream(
    service: Service, broker: Broker, task_id: str, last: int, request: Request, started_at: float
) -> AsyncGenerator[str, None]:
    """Server-sent events: the task on connect and on change, every stored event after `last`
    with its seq as the event id, until the task is final and everything is sent. A page that goes
    away ends the response, which closes this generator (EventStream), and its wake-ups with it."""
    wake = broker.subscribe(task_id)
    studio = {"started_at": started_at, "pid": psutil.Process().pid, "version": __version__}
    try:
        yield f"retry: 1000\nevent: studio\ndata: {json.dumps(studio)}\n\n"
        sent_task: dict[str, Any] | None = None
        last_ping = time.monotonic()
        while True:
            wake.clear()
            batch = await run_in_threadpool(service.events_after, task_id, last, STREAM_BATCH)
            for ev in batch:
                last = ev["seq"]
                # The kind comes from the trainer's file: a newline in it would forge lines of the stream.
                kind = ev["kind"] if SSE_NAME.fullmatch(ev["kind"]) else "message"
                yield f"id: {last}\nevent: {kind}\ndata: {json.dumps(ev)}\n\n"
            task = await run_in_threadpool(service.current, task_id)
            view = service.task_json(task)
            if sent_task is None or _changed(sent_task, view):
                sent_task = view
                yield f"event: task\ndata: {json.dumps(view)}\n\n"
            if task.status.is_final and len(batch) < STREAM_BATCH:
                return
            if await request.is_disconnected():
                return
            if len(batch) == STREAM_BATCH:
                continue
            try:
                await asyncio.wait_for(wake.wait(), timeout=1.0)
            except TimeoutError:
                if time.monotonic() - last_ping > PING_S:
                    last_ping = time.monotonic()
                    yield ": ping\n\n"
    finally:
        broker.unsubscribe(task_id, wake)


def _changed(old: dict[str, Any], new: dict[str, Any]) -> bool:
    keys = (
        "status", "step", "phase", "error", "reattached", "stalled", "loss", "eval_loss", "pid", "total_steps",
        "queue", "attempt", "attempts", "actions", "frozen", "resources", "slurm", "resumes",
    )  # fmt: skip
    return any(old.get(k) != new.get(k) for k in keys)
