"""Connections bounded in time and number, so that nobody who lacks the token can hold the studio up.

uvicorn's h11 server has no timeout for a request's headers: a connection that sends nothing, or
trickles its headers a byte at a time, stays open for ever, and enough of them use up the studio's
open files until the owner's own requests time out. On loopback every client has the same address,
so a cap per client would cap the owner too. Instead:

- a connection must finish its request's headers within HEADER_TIMEOUT_S of opening (and a
  keep-alive one within uvicorn's idle timeout of its last response), or it is closed;
- at most `waiting` connections may be waiting for their headers at once; the next one closes the
  one that has waited longest, so a flood of silent connections only evicts itself and a request
  that arrives whole (the owner's) gets through;
- beyond `limit` connections in all, a request gets uvicorn's 503 before the process runs out of
  open files (`limits_for`, from RLIMIT_NOFILE);
- malformed requests are counted, and summed up in studio.log at most every NOISE_EVERY_S, not
  logged one line each.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from collections import OrderedDict
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

HEADER_TIMEOUT_S = 10.0
"""From a connection's opening to the end of its request's headers; a real client needs milliseconds."""
RESERVED_FILES = 96
"""Open files kept for the studio itself (the store, logs, runners' pipes, chat workers, uploads)."""
NOISE_EVERY_S = 600.0

log = logging.getLogger("ftstudio.connections")


def limits_for(nofile: int | None = None) -> tuple[int, int]:
    """(connections in all, connections waiting for their headers) that fit in the open-file limit."""
    if nofile is None:
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if nofile == resource.RLIM_INFINITY:
            nofile = 65536
    limit = max(16, min(4096, nofile - RESERVED_FILES))
    return limit, max(8, min(256, limit // 4))


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for the request headers and a bound on waiting connections."""

    waiting_limit = 64
    """Set from `limits_for` by the server before it starts."""

    _deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._start_waiting()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:
            self._stop_waiting()  # its request's headers are in: it is a request now, not a wait
        elif self._deadline is None and not self.transport.is_closing():
            self._start_waiting()  # a keep-alive connection began its next request: the same deadline

    def _start_waiting(self) -> None:
        self._deadline = self.loop.call_later(HEADER_TIMEOUT_S, self._too_slow)
        waiting = _waiting(self.server_state)
        waiting[id(self)] = self
        while len(waiting) > self.waiting_limit:
            _, oldest = waiting.popitem(last=False)
            oldest._close_waiting()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_waiting()
        super().connection_lost(exc)

    def _stop_waiting(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        _waiting(self.server_state).pop(id(self), None)

    def _too_slow(self) -> None:
        self._deadline = None
        if self.conn.their_state is h11.IDLE:
            self._close_waiting()

    def _close_waiting(self) -> None:
        self._stop_waiting()
        if not self.transport.is_closing():
            self.transport.close()


def _waiting(server_state: Any) -> OrderedDict[int, GuardedH11Protocol]:
    """The connections still waiting for their headers, oldest first (kept on uvicorn's shared server state)."""
    found = getattr(server_state, "ftstudio_waiting", None)
    if found is None:
        found = OrderedDict()
        server_state.ftstudio_waiting = found
    return found


class NoiseFilter(logging.Filter):
    """Drops uvicorn's line for each malformed request and counts them instead; one line sums them up at
    most every NOISE_EVERY_S (a port scanner or a confused client would otherwise fill studio.log)."""

    NOISE = ("Invalid HTTP request received.",)

    def __init__(self, every_s: float = NOISE_EVERY_S, clock: Any = time.monotonic) -> None:
        super().__init__()
        self.every_s = every_s
        self.clock = clock
        self.count = 0
        self.total = 0
        self._since = clock()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.getMessage() not in self.NOISE:
            return True
        self.count += 1
        self.total += 1
        now = self.clock()
        if now - self._since >= self.every_s:
            minutes = (now - self._since) / 60
            log.warning(
                "refused %d malformed request(s) in the last %.0f minutes (not logged one by one)", self.count, minutes
            )
            self.count, self._since = 0, now
        return False
