"""What a route gets from the app it is mounted in: the service, the event-stream broker and when
the studio started. `create_app` (api.py) puts them on `app.state`; routes ask for them by type."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from ftstudio.studio.service import Service
from ftstudio.web.broker import Broker


def service_of(request: Request) -> Service:
    service: Service = request.app.state.service
    return service


def broker_of(request: Request) -> Broker:
    broker: Broker = request.app.state.broker
    return broker


def started_at_of(request: Request) -> float:
    started: float = request.app.state.started_at
    return started


ServiceDep = Annotated[Service, Depends(service_of)]
BrokerDep = Annotated[Broker, Depends(broker_of)]
StartedAt = Annotated[float, Depends(started_at_of)]
