"""The studio itself: health, the machine, the config's fields and presets, the statuses, the queue."""

from __future__ import annotations

from typing import Any

import psutil
from fastapi import APIRouter, Request

from ftstudio import __version__
from ftstudio.web.context import ServiceDep, StartedAt

router = APIRouter(prefix="/api")


@router.get("/health")
def health(request: Request, service: ServiceDep, started_at: StartedAt) -> dict[str, Any]:
    public = {"status": "ok", "version": __version__}
    if getattr(request.state, "credential", None) is None:
        return public  # the one open route: says it is up, and nothing about the machine
    return {**service.health(), **public, "pid": psutil.Process().pid, "started_at": started_at}


@router.get("/system")
def system(service: ServiceDep) -> dict[str, Any]:
    return service.system()


@router.get("/config/fields")
def config_fields(service: ServiceDep) -> list[dict[str, Any]]:
    return service.config_fields()


@router.get("/config/presets")
def config_presets(service: ServiceDep) -> dict[str, Any]:
    return service.presets()


@router.get("/statuses")
def statuses(service: ServiceDep) -> dict[str, Any]:
    """Every task status (its words, whether it is final, whether a process may run in it, the
    actions it allows) and every action's words: the lifecycle's own table, so clients keep no copy."""
    return service.statuses()


@router.get("/queue")
def queue(service: ServiceDep) -> dict[str, Any]:
    return service.queue()
