"""The studio's HTTP app: the routers of web/routes/, the error handlers that map `ftstudio.errors`
to status codes at the edge, the page, and the gate in front of all of it."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from ftstudio import __version__
from ftstudio.errors import FtstudioError, ValidationError
from ftstudio.studio.service import Service
from ftstudio.web import apidoc
from ftstudio.web.api_input import request_problems
from ftstudio.web.auth import Guard, load_or_create_token, token_path
from ftstudio.web.broker import Broker
from ftstudio.web.gate import Gate
from ftstudio.web.routes import datasets, results, studio, tasks

STATIC = Path(__file__).with_name("static")


def create_app(
    service: Service,
    broker: Broker | None = None,
    *,
    started_at: float | None = None,
    guard: Guard | None = None,
) -> FastAPI:
    """The app behind its gate. Without a `guard` it takes the home's token and the default port (tests)."""
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
    app.state.service = service
    app.state.broker = broker or Broker()
    app.state.started_at = started_at or time.time()
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
        mapped = service.storage_problem(exc)
        if mapped is None:
            raise exc
        return JSONResponse({"detail": str(mapped)}, status_code=mapped.http_status)

    @app.exception_handler(RequestValidationError)
    async def _bad_request(_req: Request, exc: RequestValidationError) -> JSONResponse:
        problems = request_problems(list(exc.errors()))
        detail = "; ".join(f"{p['field']}: {p['message']}" if p["field"] else p["message"] for p in problems)
        return JSONResponse({"detail": detail or "malformed request", "problems": problems}, status_code=422)

    for area in (studio, tasks, results, datasets):
        app.include_router(area.router)

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
