"""The HTTP API and the page. Routes are thin: each calls one service method and
maps `ftstudio.errors` to status codes here, at the edge."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import sqlite3
import subprocess
import time
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Annotated, Any

import psutil
from fastapi import Body, FastAPI, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles

from ftstudio import __version__, taskfiles
from ftstudio.chat.process import ChatReply, parse_request
from ftstudio.config import PRESETS, describe_fields
from ftstudio.errors import FtstudioError, NotFound, ValidationError
from ftstudio.storage import storage_error
from ftstudio.studio import lifecycle
from ftstudio.studio.incoming import too_large
from ftstudio.studio.service import Service, require_task_dir
from ftstudio.web import apidoc
from ftstudio.web.api_input import OFFSET_MAX, SEQ_MAX, TaskCreate, TaskExtend, last_event_id, request_problems
from ftstudio.web.auth import Guard, load_or_create_token, token_path
from ftstudio.web.broker import Broker
from ftstudio.web.eventstream import EventStream
from ftstudio.web.gate import Gate
from ftstudio.web.uploads import MULTIPART_OVERHEAD, MultipartFile

STATIC = Path(__file__).with_name("static")
PING_S = 15.0
SSE_NAME = re.compile(r"[a-z_]{1,32}")
# Files of a finished task that may be downloaded one by one (nothing else in the task dir is served).
DOWNLOADABLE = {
    "training_config.json": "adapter",
    "summary.json": "adapter",
    "adapter_config.json": "adapter",
    "spec.json": ".",
    "training.log": ".",
}

UPLOAD_WRITE_BYTES = 1 << 20
# The upload route parses its body itself (to bound it as it streams), so FastAPI cannot infer
# its schema; this keeps /openapi.json describing it as a form with one file field.
UPLOAD_SCHEMA: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {
                            "type": "string",
                            "format": "binary",
                            "description": "The dataset: .jsonl, .json, .csv or .parquet",
                        }
                    },
                }
            }
        },
    },
    "responses": {
        "413": {"description": "Larger than the studio's upload limit (`studio start --max-upload-mb`)"},
        "422": {"description": "Not a dataset file, or a row that cannot be trained on (named by line)"},
        "507": {"description": "The data home is full or read-only"},
    },
}


def create_app(
    service: Service,
    broker: Broker | None = None,
    *,
    started_at: float | None = None,
    guard: Guard | None = None,
) -> FastAPI:
    """The app behind its gate. Without a `guard` it takes the home's token and the default port (tests)."""
    broker = broker or Broker()
    started_at = started_at or time.time()
    guard = guard or Guard(token=load_or_create_token(service.home), port=8765)
    # No /docs or /redoc: FastAPI's pages load Swagger UI from a CDN, and that script would run in the
    # studio's origin with the person's login. /openapi.json (behind the token) loads into any viewer.
    app = FastAPI(
        title="ftstudio",
        version=__version__,
        description="Fine-tunes that survive restarts.",
        docs_url=None,
        redoc_url=None,
    )
    apidoc.install(app)

    @app.exception_handler(FtstudioError)
    async def _ftstudio_error(_req: Request, exc: FtstudioError) -> JSONResponse:
        body: dict[str, Any] = {"detail": str(exc)}
        if exc.code:
            body["code"] = exc.code
        if isinstance(exc, ValidationError):
            body["problems"] = [{"field": p.field, "message": p.message} for p in exc.problems]
        return JSONResponse(body, status_code=exc.http_status)

    @app.exception_handler(sqlite3.Error)
    async def _store_error(_req: Request, exc: sqlite3.Error) -> JSONResponse:
        # A full or read-only disk under the store is the owner's to fix (507), not a bug (500).
        mapped = storage_error(exc, service.home.root)
        if mapped is None:
            raise exc
        return JSONResponse({"detail": str(mapped)}, status_code=mapped.http_status)

    @app.exception_handler(RequestValidationError)
    async def _bad_request(_req: Request, exc: RequestValidationError) -> JSONResponse:
        problems = request_problems(list(exc.errors()))
        detail = "; ".join(f"{p['field']}: {p['message']}" if p["field"] else p["message"] for p in problems)
        return JSONResponse({"detail": detail or "malformed request", "problems": problems}, status_code=422)

    # -- studio --------------------------------------------------------------

    @app.get("/api/health")
    def health(request: Request) -> dict[str, Any]:
        public = {"status": "ok", "version": __version__}
        if getattr(request.state, "credential", None) is None:
            return public  # the one open route: says it is up, and nothing about the machine
        return {**service.health(), **public, "pid": psutil.Process().pid, "started_at": started_at}

    @app.get("/api/system")
    def system() -> dict[str, Any]:
        mem = psutil.virtual_memory()
        return {
            "version": __version__,
            "home": str(service.home.root),
            "cpu_count": psutil.cpu_count(),
            "cpu_percent": psutil.cpu_percent(interval=None, percpu=True),
            "memory": {"total": mem.total, "used": mem.total - mem.available},
            "gpus": _gpus(),
        }

    @app.get("/api/config/fields")
    def config_fields() -> list[dict[str, Any]]:
        return [
            {
                "path": f.path,
                "type": f.type,
                "default": f.default,
                "help": f.help,
                "choices": list(f.choices),
                "flag": f.flag,
                "min": f.min,
                "max": f.max,
                "range": f.range,
                "max_length": f.max_length,
            }
            for f in describe_fields()
        ]

    @app.get("/api/config/presets")
    def config_presets() -> dict[str, Any]:
        return PRESETS

    @app.get("/api/statuses")
    def statuses() -> dict[str, Any]:
        """Every task status (its words, whether it is final, whether a process may run in it, the
        actions it allows) and every action's words: the lifecycle's own table, so clients keep no copy."""
        return lifecycle.describe()

    # -- tasks ---------------------------------------------------------------

    @app.post("/api/tasks", status_code=201)
    def create_task(body: TaskCreate) -> dict[str, Any]:
        return service.task_json(service.submit(body.config, body.name))

    @app.get("/api/tasks")
    def list_tasks(
        limit: int = Query(50, ge=1, le=1000),
        offset: int = Query(0, ge=0, le=OFFSET_MAX),
        status: str | None = Query(None, max_length=64),
    ) -> dict[str, Any]:
        tasks, total = service.list(limit=limit, offset=offset, status=status)
        waits = service.plan().waits if any(t.status == "queued" for t in tasks) else {}
        return {
            "tasks": [service.task_json(t, waits) for t in tasks],
            "total": total,
            "limit": limit,
            "offset": offset,
        }

    @app.get("/api/queue")
    def queue() -> dict[str, Any]:
        return service.queue()

    @app.get("/api/tasks/{task_id}")
    def get_task(task_id: str) -> dict[str, Any]:
        return service.task_json(service.get(task_id))

    @app.delete("/api/tasks/{task_id}", status_code=204)
    def delete_task(task_id: str) -> Response:
        service.delete(task_id)
        return Response(status_code=204)

    @app.post("/api/tasks/{task_id}/cancel")
    def cancel_task(task_id: str) -> dict[str, Any]:
        return service.task_json(service.cancel(task_id))

    @app.post("/api/tasks/{task_id}/pause")
    def pause_task(
        task_id: str,
        freeze: bool = Query(False, description="SIGSTOP instead of a checkpoint: instant, memory stays held"),
    ) -> dict[str, Any]:
        return service.task_json(service.pause(task_id, freeze=freeze))

    @app.post("/api/tasks/{task_id}/freeze")
    def freeze_task(task_id: str) -> dict[str, Any]:
        """Pause with SIGSTOP (the `freeze` action): the same as pause?freeze=true."""
        return service.task_json(service.pause(task_id, freeze=True))

    @app.post("/api/tasks/{task_id}/resume")
    def resume_task(task_id: str) -> dict[str, Any]:
        return service.task_json(service.resume(task_id))

    @app.post("/api/tasks/{task_id}/retry")
    def retry_task(task_id: str) -> dict[str, Any]:
        return service.task_json(service.retry(task_id))

    @app.post("/api/tasks/{task_id}/extend")
    def extend_task(task_id: str, body: TaskExtend) -> dict[str, Any]:
        return service.task_json(service.extend(task_id, epochs=body.epochs, steps=body.steps))

    @app.get("/api/tasks/{task_id}/history")
    def task_history(task_id: str) -> dict[str, Any]:
        return service.history(task_id)

    @app.get("/api/tasks/{task_id}/logs")
    def task_logs(
        task_id: str,
        offset: int = Query(0, ge=-SEQ_MAX, le=SEQ_MAX, description="negative: the last -offset bytes"),
        limit: int = Query(64 << 10, ge=1, le=SEQ_MAX, description="bytes; at most 1 MiB is sent"),
    ) -> dict[str, Any]:
        return service.logs(task_id, offset, limit)

    @app.get("/api/tasks/{task_id}/metrics")
    def task_metrics(task_id: str, after: int = Query(0, ge=0, le=SEQ_MAX)) -> dict[str, Any]:
        return {"events": service.metrics(task_id, after)}

    @app.get("/api/tasks/{task_id}/samples")
    def task_samples(task_id: str) -> dict[str, Any]:
        """The held-out prompts (`evaluation.prompts`) as the fine-tune and the base model answered them:
        one stage per checkpoint that answered them and one `final`, oldest first."""
        return {"stages": service.samples(task_id)}

    @app.get("/api/tasks/{task_id}/stream")
    async def task_stream(task_id: str, request: Request, after: int = Query(0, ge=0, le=SEQ_MAX)) -> StreamingResponse:
        await run_in_threadpool(service.get, task_id)  # 404 before the stream starts
        # A header that is not one of our ids is ignored, as if the page had sent none.
        header = last_event_id(request.headers.get("last-event-id", ""))
        last = header if header is not None else after
        return EventStream(_stream(service, broker, task_id, last, request, started_at))

    @app.get("/api/tasks/{task_id}/checkpoints")
    def task_checkpoints(task_id: str) -> dict[str, Any]:
        """What can answer a chat: the final adapter (a completed task) and each complete checkpoint."""
        from ftstudio.checkpoints import is_complete, list_checkpoints, step_of

        task = service.get(task_id)
        tdir = require_task_dir(service, task_id)
        found = [p for p in list_checkpoints(tdir.checkpoints) if not p.is_symlink() and is_complete(p)]
        return {
            "adapter": task.status == "completed" and (tdir.adapter / "adapter_config.json").is_file(),
            "checkpoints": [{"name": p.name, "step": step_of(p)} for p in reversed(found)],  # newest first
        }

    @app.post("/api/tasks/{task_id}/chat")
    def task_chat(task_id: str, body: Annotated[dict[str, Any], Body(examples=[CHAT_EXAMPLE])]) -> StreamingResponse:
        """Chat with the task's adapter (or a checkpoint): the reply streamed as server-sent events
        (`worker` {device, reply}, `loading`, `ready`, `token` {who, text}, `done` {who}, then `end` or
        `error`); `reply` is the number that `chat/stop` takes. Refused with
        409 and code `chat_waits_for_training` while training holds every GPU and slot, unless the request
        says `beside_training`."""
        # Refused here, before any stream: no weights (404), a busy worker or training's place (409).
        reply = service.chat(task_id, parse_request(body))
        return EventStream(_chat_stream(reply), on_close=reply.cancel)

    @app.post("/api/tasks/{task_id}/chat/stop")
    def task_chat_stop(task_id: str, reply: int = Query(ge=1, le=SEQ_MAX)) -> dict[str, bool]:
        """Stop a reply of the task's chat: `reply` is the number its `worker` event gave. `stopped` is
        false when it had already ended. The page says this on *Stop* before it sends anything else, so
        that its next message waits for the stopped reply to wind down and is never refused for it."""
        return {"stopped": service.stop_chat(task_id, reply)}

    @app.get("/api/tasks/{task_id}/artifacts")
    def task_artifacts(task_id: str) -> dict[str, Any]:
        tdir = require_task_dir(service, task_id)
        return {"files": [{"name": p.name, "size": size} for p, size in taskfiles.adapter_files(tdir)]}

    @app.get("/api/tasks/{task_id}/adapter.tar.gz")
    def task_adapter(task_id: str) -> StreamingResponse:
        tdir = require_task_dir(service, task_id)
        files = taskfiles.adapter_files(tdir)
        if not any(p.name == "adapter_config.json" for p, _ in files):
            raise NotFound(f"task {task_id} has no adapter yet; it is written when training completes")
        return StreamingResponse(
            taskfiles.adapter_tarball(files, f"{task_id}-adapter"),
            media_type="application/gzip",
            headers={"Content-Disposition": f'attachment; filename="{task_id}-adapter.tar.gz"'},
        )

    @app.get("/api/tasks/{task_id}/handover")
    def task_handover(task_id: str) -> dict[str, str]:
        """Ready-to-copy ways to load a completed task's result: peft, vLLM, Ollama, `ftstudio export`."""
        from ftstudio.training.export import handover

        task = service.get(task_id)
        tdir = require_task_dir(service, task_id)
        if task.status != "completed" or not (tdir.adapter / "adapter_config.json").is_file():
            raise NotFound(f"task {task_id} has no adapter yet; it is written when training completes")
        return handover(task.id, task.name, tdir.adapter, service.home.root)

    @app.get("/api/tasks/{task_id}/files/{name}")
    def task_file(task_id: str, name: str) -> StreamingResponse:
        tdir = require_task_dir(service, task_id)
        where = DOWNLOADABLE.get(name)
        opened = taskfiles.open_inside(tdir.path, Path(where) / name) if where else None
        if opened is None:
            raise NotFound(f"task {task_id} has no file {name!r}; available: {', '.join(DOWNLOADABLE)}")
        f, size = opened
        return StreamingResponse(
            taskfiles.chunks(f),
            media_type="text/plain; charset=utf-8" if name.endswith(".log") else "application/json",
            headers={"Content-Disposition": f'attachment; filename="{name}"', "Content-Length": str(size)},
        )

    # -- datasets and models -------------------------------------------------

    @app.post("/api/datasets", status_code=201, openapi_extra=UPLOAD_SCHEMA)
    async def upload_dataset(request: Request) -> dict[str, Any]:
        """Upload a dataset file (.jsonl, .json, .csv, .parquet) as the multipart field `file`."""
        return await _receive_upload(service, request)

    @app.get("/api/datasets")
    def list_datasets() -> dict[str, Any]:
        return {"datasets": service.datasets()}

    @app.get("/api/datasets/{name}")
    def show_dataset(name: str) -> dict[str, Any]:
        return service.dataset(name)

    @app.get("/api/models")
    def list_models() -> dict[str, Any]:
        return {"models": service.models()}

    # -- the page ------------------------------------------------------------

    @app.middleware("http")
    async def _no_stale_page(request: Request, call_next: Any) -> Response:
        # After an upgrade the browser must not keep old JavaScript talking to a new API.
        response: Response = await call_next(request)
        if request.url.path == "/" or request.url.path.startswith("/static/"):
            response.headers["Cache-Control"] = "no-cache"
        return response

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    # Outermost: nothing reaches a route, the page or the docs without passing the gate.
    app.add_middleware(Gate, guard=guard, token_file=str(token_path(service.home)))
    return app


async def _receive_upload(service: Service, request: Request) -> dict[str, Any]:
    """Parse the multipart body as it arrives, the file part going straight to disk, bounded all the way."""
    limit = service.policy.max_upload_bytes
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit + MULTIPART_OVERHEAD:
        raise too_large(limit)  # before a byte of the body is read
    incoming = await run_in_threadpool(service.receive_dataset)
    try:
        form = MultipartFile(request.headers.get("content-type", ""), incoming)
        received, pending = 0, bytearray()
        async for chunk in request.stream():
            received += len(chunk)
            if received > limit + MULTIPART_OVERHEAD:
                raise too_large(limit)
            pending += chunk
            if len(pending) >= UPLOAD_WRITE_BYTES:  # one trip to a worker thread per MB, not per packet
                await run_in_threadpool(form.feed, bytes(pending))
                pending.clear()
        await run_in_threadpool(form.feed, bytes(pending))
        form.finish()
        return await run_in_threadpool(service.add_dataset, incoming)
    finally:
        await run_in_threadpool(incoming.discard)


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
            batch = await run_in_threadpool(service.store.events, task_id, after_seq=last, limit=1000)
            for ev in batch:
                last = ev["seq"]
                # The kind comes from the trainer's file: a newline in it would forge lines of the stream.
                kind = ev["kind"] if SSE_NAME.fullmatch(ev["kind"]) else "message"
                yield f"id: {last}\nevent: {kind}\ndata: {json.dumps(ev)}\n\n"
            task = await run_in_threadpool(service.store.get, task_id)
            view = service.task_json(task)
            if sent_task is None or _changed(sent_task, view):
                sent_task = view
                yield f"event: task\ndata: {json.dumps(view)}\n\n"
            if task.status_enum.is_final and len(batch) < 1000:
                return
            if await request.is_disconnected():
                return
            if len(batch) == 1000:
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
        "queue", "attempt", "attempts", "actions", "frozen", "resources", "slurm",
    )  # fmt: skip
    return any(old.get(k) != new.get(k) for k in keys)


def _gpus() -> list[dict[str, Any]]:
    """GPUs with memory in use, from nvidia-smi if there is one (importing torch here would slow start-up)."""
    smi = shutil.which("nvidia-smi")
    if not smi:
        return []
    try:
        out = subprocess.run(
            [smi, "--query-gpu=index,name,memory.total,memory.used", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    gpus = []
    for line in out.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 4 and parts[0].isdigit():
            gpus.append(
                {
                    "index": int(parts[0]),
                    "name": parts[1],
                    "memory_total": int(parts[2]) << 20,
                    "memory_used": int(parts[3]) << 20,
                }
            )
    return gpus


CHAT_EXAMPLE = {
    "messages": [{"role": "user", "content": "Reverse the word: stone"}],
    "system": "",
    "temperature": 0.7,
    "top_p": 0.9,
    "max_new_tokens": 256,
    "compare": False,
    "beside_training": False,
}


async def _chat_stream(reply: ChatReply) -> AsyncGenerator[str, None]:
    """Server-sent events, one per worker event (those that came together in one write). A page that
    goes away ends the response, and the reply with it (the route's EventStream cancels it): the worker
    stops and takes the next message."""

    def sse(event: dict[str, Any]) -> str:
        name = event.pop("event", "message")
        return f"event: {name}\ndata: {json.dumps(event)}\n\n"

    while (batch := await run_in_threadpool(reply.next_batch)) is not None:
        yield "".join(sse(event) for event in batch)
