"""The HTTP server the studio runs its API on: uvicorn, made quiet when idle."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from types import FrameType

import uvicorn


class QuietServer(uvicorn.Server):
    """uvicorn's server with its housekeeping tick once a second instead of ten times.

    The tick only refreshes the Date header and looks for a stop request; at 10 Hz it was half
    of an idle studio's CPU (bench/bench_supervisor.py). A stop signal wakes the loop at once,
    so stopping is no slower.
    """

    _wake: asyncio.Event | None = None
    _loop: asyncio.AbstractEventLoop | None = None
    on_exit: Callable[[], None] | None = None
    """Called from the signal handler when a stop signal arrives, before the graceful shutdown: the studio
    stops its supervisor there, so no attempt is launched while the server winds down (in a machine's
    shutdown the runners get the same SIGTERM, and relaunching them then only loses the attempt)."""

    async def main_loop(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        # Counter 0 on every tick: the Date header is refreshed every tick, as uvicorn does once a second.
        while not await self.on_tick(0):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=1.0)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.on_exit is not None:
            self.on_exit()
        super().handle_exit(sig, frame)
        # uvicorn raises the signal again once it has shut down, so that the process dies of it: that would
        # skip the studio's own shutdown after the server's (fold the WAL into studio.db, remove studio.json,
        # log "studio stopped"). The studio exits by itself once that is done.
        captured = getattr(self, "_captured_signals", None)
        if isinstance(captured, list):
            captured.clear()
        if self._loop is not None and self._wake is not None:
            self._loop.call_soon_threadsafe(self._wake.set)
