"""A task's results: the checkpoints and adapter that can answer a chat, the chat itself, the adapter's
files and archive, the ways to load it elsewhere, and the task's downloadable files."""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator
from typing import Annotated, Any

from fastapi import APIRouter, Body, Query
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse

from ftstudio import taskfiles
from ftstudio.chat.process import ChatReply
from ftstudio.errors import ValidationError
from ftstudio.web.api_input import SEQ_MAX
from ftstudio.web.context import ServiceDep
from ftstudio.web.eventstream import EventStream

router = APIRouter(prefix="/api")

CHAT_EXAMPLE = {
    "messages": [{"role": "user", "content": "Reverse the word: stone"}],
    "system": "",
    "temperature": 0.7,
    "top_p": 0.9,
    "max_new_tokens": 256,
    "compare": False,
    "beside_training": False,
}


@router.get("/tasks/{task_id}/checkpoints")
def task_checkpoints(task_id: str, service: ServiceDep) -> dict[str, Any]:
    """What can answer a chat: the final adapter (a completed task) and each complete checkpoint."""
    return service.checkpoints(task_id)


@router.post("/tasks/{task_id}/chat")
def task_chat(
    task_id: str, service: ServiceDep, body: Annotated[dict[str, Any], Body(examples=[CHAT_EXAMPLE])]
) -> EventStream:
    """Chat with the task's adapter (or a checkpoint): the reply streamed as server-sent events
    (`worker` {device, reply}, `loading`, `ready`, `token` {who, text}, `done` {who}, then `end` or
    `error`); `reply` is the number that `chat/stop` takes. Refused with
    409 and code `chat_waits_for_training` while training holds every GPU and slot, unless the request
    says `beside_training`."""
    # Refused here, before any stream: no weights (404), a busy worker or training's place (409).
    reply = service.chat_message(task_id, body)
    return EventStream(_chat_stream(reply), on_close=reply.cancel)


async def _chat_stream(reply: ChatReply) -> AsyncGenerator[str, None]:
    """Server-sent events, one per worker event (those that came together in one write). A page that
    goes away ends the response, and the reply with it (the route's EventStream cancels it): the worker
    stops and takes the next message."""

    def sse(event: dict[str, Any]) -> str:
        name = event.pop("event", "message")
        return f"event: {name}\ndata: {json.dumps(event)}\n\n"

    while (batch := await run_in_threadpool(reply.next_batch)) is not None:
        yield "".join(sse(event) for event in batch)


@router.post("/tasks/{task_id}/chat/stop")
def task_chat_stop(
    task_id: str, service: ServiceDep, reply: Annotated[int, Query(ge=1, le=SEQ_MAX)]
) -> dict[str, bool]:
    """Stop a reply of the task's chat: `reply` is the number its `worker` event gave. `stopped` is
    false when it had already ended. The page says this on *Stop* before it sends anything else, so
    that its next message waits for the stopped reply to wind down and is never refused for it."""
    return {"stopped": service.stop_chat(task_id, reply)}


@router.get("/tasks/{task_id}/artifacts")
def task_artifacts(task_id: str, service: ServiceDep) -> dict[str, Any]:
    return {"files": service.artifacts(task_id)}


@router.get("/tasks/{task_id}/adapter.tar.gz")
def task_adapter(task_id: str, service: ServiceDep) -> StreamingResponse:
    return StreamingResponse(
        service.adapter_archive(task_id),
        media_type="application/gzip",
        headers={"Content-Disposition": f'attachment; filename="{task_id}-adapter.tar.gz"'},
    )


@router.get("/tasks/{task_id}/handover")
def task_handover(task_id: str, service: ServiceDep) -> dict[str, str]:
    """Ready-to-copy ways to load a completed task's result: peft, vLLM, Ollama, `ftstudio export`."""
    return service.handover(task_id)


@router.get("/tasks/{task_id}/files/{name}")
def task_file(task_id: str, name: str, service: ServiceDep) -> StreamingResponse:
    f, size = service.open_file(task_id, name)
    return StreamingResponse(
        taskfiles.chunks(f),
        media_type="text/plain; charset=utf-8" if name.endswith(".log") else "application/json",
        headers={"Content-Disposition": f'attachment; filename="{name}"', "Content-Length": str(size)},
    )


EXPORT_EXAMPLE = {"format": "gguf", "quant": "q4_k_m"}


@router.get("/tasks/{task_id}/exports")
def task_exports(task_id: str, service: ServiceDep) -> dict[str, Any]:
    """What was exported from the task (GGUF jobs): status, progress line, and the files with size and sha256."""
    return {"exports": service.exports(task_id)}


@router.post("/tasks/{task_id}/exports", status_code=202)
def task_export_start(
    task_id: str, service: ServiceDep, body: Annotated[dict[str, Any], Body(examples=[EXPORT_EXAMPLE])]
) -> dict[str, Any]:
    """Start a GGUF export of a completed task as a job of its own (one per quantization)."""
    fmt, quant = body.get("format", "gguf"), body.get("quant", "q4_k_m")
    unknown = sorted(set(body) - {"format", "quant"})
    if unknown:
        raise ValidationError(f"unknown field {unknown[0][:40]!r}; an export takes format and quant")
    if fmt != "gguf" or not isinstance(quant, str):
        raise ValidationError(
            "format must be gguf (adapter and merged folders come from `ftstudio export`), and quant a string"
        )
    return service.start_export(task_id, quant)


@router.post("/tasks/{task_id}/exports/{job}/cancel")
def task_export_cancel(task_id: str, job: str, service: ServiceDep) -> dict[str, Any]:
    return service.cancel_export(task_id, job)


@router.delete("/tasks/{task_id}/exports/{job}", status_code=204)
def task_export_delete(task_id: str, job: str, service: ServiceDep) -> None:
    service.delete_export(task_id, job)


@router.get("/tasks/{task_id}/exports/{job}/files/{name}")
def task_export_file(task_id: str, job: str, name: str, service: ServiceDep) -> StreamingResponse:
    f, size = service.open_export_file(task_id, job, name)
    return StreamingResponse(
        taskfiles.chunks(f),
        media_type="text/plain; charset=utf-8" if name in ("Modelfile", "README.md") else "application/octet-stream",
        headers={"Content-Disposition": f'attachment; filename="{name}"', "Content-Length": str(size)},
    )
