"""Server-sent events as an HTTP response that ends what it streams when the response ends, however it
ends: finished, failed, or cut off by a client that went away."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable

from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send


def _nothing() -> None:
    return None


class EventStream(StreamingResponse):
    """`text/event-stream`, uncached and unbuffered by proxies, from an async generator of events;
    `on_close` runs once the response has ended, whatever ended it.

    A closed page must end at once what its stream holds (a chat reply, a subscription). A generator's
    `finally` is not enough for that: Starlette cancels the response when the client goes away, but when
    the cancel lands while a chunk is being sent (the studio's middleware hands each chunk on through a
    stream that waits for the next layer, so that is where it usually lands) the generator is left
    suspended at its `yield`, its `finally` waiting for the garbage collector; and a client that went
    away before the first chunk leaves a generator that never started, whose `finally` never runs. The
    chat worker then went on answering nobody, and the message sent after Stop was refused as
    "answering another message" (issue 20)."""

    def __init__(self, events: AsyncGenerator[str, None], *, on_close: Callable[[], None] = _nothing) -> None:
        super().__init__(
            events,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self.events = events
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                # GeneratorExit at the suspended `yield`; nothing for one that ended or never started.
                await self.events.aclose()
            finally:
                self.on_close()
