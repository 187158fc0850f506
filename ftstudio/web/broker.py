"""Wake-ups for the event stream: the supervisor thread says "task X changed", and
every stream of X waiting in the event loop wakes and reads the store. The store
stays the source of truth; a missed wake-up only costs the 1 s poll."""

from __future__ import annotations

import asyncio
import threading
from collections import defaultdict


class Broker:
    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._subs: dict[str, set[asyncio.Event]] = defaultdict(set)
        self._lock = threading.Lock()

    def subscribe(self, task_id: str) -> asyncio.Event:
        self._loop = asyncio.get_running_loop()
        ev = asyncio.Event()
        with self._lock:
            self._subs[task_id].add(ev)
        return ev

    def unsubscribe(self, task_id: str, ev: asyncio.Event) -> None:
        with self._lock:
            subs = self._subs.get(task_id)
            if subs is not None:
                subs.discard(ev)
                if not subs:
                    del self._subs[task_id]

    def streamed(self) -> set[str]:
        """Tasks with at least one stream open (the supervisor tails these every tick). Callable from any thread."""
        with self._lock:
            return set(self._subs)

    def notify(self, task_ids: set[str]) -> None:
        """Callable from any thread."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        with self._lock:
            waiting = [ev for tid in task_ids for ev in self._subs.get(tid, ())]
        for ev in waiting:
            loop.call_soon_threadsafe(ev.set)
