"""The studio's front door: every request passes here before any route (ASGI middleware).

In order: the Host check, a foreign Origin, the token (for `/api` but health, and the
API docs), the Origin of a cookie-authenticated state change, the content type of a
state change, and the size of a JSON body. Refusals are one-line JSON like every
other error. Every answer gets the security headers (no framing, no sniffing, no
referrer, a Content-Security-Policy without inline script). The rules themselves
live in `auth.py`; this module only applies them.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import parse_qs

from starlette.requests import cookie_parser

from ftstudio.web.auth import STATE_CHANGING, Guard, is_loopback, same_token

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

MAX_JSON_BYTES = 1 << 20  # a training config is a few KB; nothing else takes a body but uploads
BODY_TIMEOUT_S = 30.0
UPLOAD_PATH = "/api/datasets"
OPEN_PATHS = frozenset({"/api/health"})
# The interactive docs pages are off (api.py): they would run a CDN's script with the studio's authority.
# Their paths stay behind the token all the same, like the OpenAPI document.
DOC_PATHS = frozenset({"/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
COOKIE_MAX_AGE_S = 30 * 24 * 3600
PAGE_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "font-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"cross-origin-resource-policy", b"same-origin"),
]


class Gate:
    def __init__(self, app: ASGIApp, guard: Guard, *, token_file: str) -> None:
        self.app = app
        self.guard = guard
        self.token_file = token_file

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope.get("path", "")
        method: str = scope.get("method", "GET")
        headers = _headers(scope)
        send = _with_security_headers(send, PAGE_CSP)
        guard = self.guard

        host = headers.get("host")
        if not guard.host_ok(host):
            shown = (host or "")[:80]
            await _refuse(
                send,
                403,
                f"this studio does not answer to the host name {shown!r}; open it as http://127.0.0.1:{guard.port}/, "
                "or let its owner allow the name with `ftstudio studio start --allow-host NAME`",
            )
            return
        origin = headers.get("origin")
        if origin is not None and not guard.origin_ok(origin, host):
            await _refuse(send, 403, "requests from other web pages are refused; use the studio's own page")
            return

        login = path == "/" and method in ("GET", "HEAD") and scope.get("query_string")
        if login and await self._login(scope, send):
            return

        needs_token = (path.startswith("/api/") or path == "/api" or path in DOC_PATHS) and path not in OPEN_PATHS
        credential = guard.credential(headers.get("authorization"), _cookie(headers.get("cookie"), guard.cookie))
        scope.setdefault("state", {})["credential"] = credential
        if needs_token and credential is None:
            # Where the token lies is said to this machine only: the path names the user and the home's layout.
            where = self.token_file if _from_loopback(scope) else "the file `token` of the studio's data home"
            await _refuse(
                send,
                401,
                f"this studio needs its token: open the login URL that `ftstudio studio url` prints, "
                f"or send `Authorization: Bearer TOKEN` with the token in {where}",
                extra=[(b"www-authenticate", b'Bearer realm="ftstudio"')],
            )
            return

        if method in STATE_CHANGING:
            # The cookie rides along with any page's request; only the studio's own page may use it to change things.
            if credential == "cookie" and origin is None and headers.get("sec-fetch-site", "").lower() != "same-origin":
                await _refuse(send, 403, "a change made through the browser must come from the studio's own page")
                return
            problem = _content_type_problem(path, headers)
            if problem:
                await _refuse(send, 415, problem)
                return
            # Only a request that passed the token check is read: nobody else can make the studio hold a body.
            if needs_token and path != UPLOAD_PATH:
                length = headers.get("content-length")
                if length is not None and (not length.isascii() or not length.isdigit()):
                    await _refuse(send, 400, "the Content-Length header is not a number")
                    return
                try:
                    body = None if length is not None and int(length) > MAX_JSON_BYTES else await _read(receive)
                except TimeoutError:
                    await _refuse(send, 408, f"the request body did not arrive within {BODY_TIMEOUT_S:.0f}s")
                    return
                if body is None:
                    await _refuse(
                        send, 413, f"the request body is over {MAX_JSON_BYTES >> 10} KB; a config is a few KB"
                    )
                    return
                receive = _replay(body, receive)
        await self.app(scope, receive, send)

    async def _login(self, scope: Scope, send: Send) -> bool:
        """`/?token=...`: set the cookie and send the browser on to `/`, so the token leaves the address bar."""
        query = parse_qs(scope["query_string"].decode("latin-1"))  # a login link may gain tracking fields
        given = (query.get("token") or [None])[0]
        if given is None:
            return False
        if not same_token(given, self.guard.token):
            await _refuse(
                send,
                401,
                "this login link's token is not the studio's (it changes when the data home does); "
                "`ftstudio studio url` prints the current link",
            )
            return True
        secure = "; Secure" if self.guard.scheme == "https" else ""
        cookie = (
            f"{self.guard.cookie}={self.guard.token}; Path=/; HttpOnly; SameSite=Strict; Max-Age={COOKIE_MAX_AGE_S}"
            f"{secure}"
        )
        await send(
            {
                "type": "http.response.start",
                "status": 303,
                "headers": [
                    (b"location", b"/"),
                    (b"set-cookie", cookie.encode("latin-1")),
                    (b"cache-control", b"no-store"),
                    (b"content-length", b"0"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": b""})
        return True


def _headers(scope: Scope) -> dict[str, str]:
    """Request headers by lower-case name; a repeated header keeps its first value (a second Host is ignored)."""
    out: dict[str, str] = {}
    for name, value in scope.get("headers", []):
        out.setdefault(name.decode("latin-1").lower(), value.decode("latin-1"))
    return out


def _cookie(header: str | None, name: str) -> str | None:
    """Our cookie among the others of this host. Lenient (Starlette's parser): other programs on
    localhost set cookies that the standard library's strict parser gives up on, and with it ours."""
    return cookie_parser(header).get(name) if header else None


def _from_loopback(scope: Scope) -> bool:
    client = scope.get("client")
    return client is not None and is_loopback(str(client[0]))


def _content_type_problem(path: str, headers: dict[str, str]) -> str | None:
    ctype = headers.get("content-type")
    if ctype is None:
        body = headers.get("content-length", "0") not in ("", "0") or "transfer-encoding" in headers
        return "send the body as JSON (Content-Type: application/json)" if body else None
    mime = ctype.split(";", 1)[0].strip().lower()
    if path == UPLOAD_PATH:
        return None if mime == "multipart/form-data" else "upload a dataset as multipart/form-data with a `file` field"
    return None if mime == "application/json" else f"send JSON (Content-Type: application/json), not {mime[:60]!r}"


async def _read(receive: Receive) -> bytes | None:
    """A JSON body, whole; None past MAX_JSON_BYTES (a chunked body has no Content-Length to refuse up front).
    Raises TimeoutError when it trickles in for longer than BODY_TIMEOUT_S."""
    chunks: list[bytes] = []
    size = 0
    deadline = asyncio.get_running_loop().time() + BODY_TIMEOUT_S
    while True:
        remaining = deadline - asyncio.get_running_loop().time()
        if remaining <= 0:
            raise TimeoutError
        message = await asyncio.wait_for(receive(), remaining)
        if message["type"] != "http.request":
            return b"".join(chunks)  # the client left; the route sees an empty body and the answer goes nowhere
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_JSON_BYTES:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """Hand the app the body already read, then whatever comes next (a disconnect)."""
    sent = False

    async def wrapped() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return wrapped


def _with_security_headers(send: Send, csp: str) -> Send:
    async def wrapped(message: Message) -> None:
        if message["type"] == "http.response.start":
            names = {name.lower() for name, _ in message.get("headers", [])}
            extra = [(k, v) for k, v in SECURITY_HEADERS if k not in names]
            if b"content-security-policy" not in names:
                extra.append((b"content-security-policy", csp.encode()))
            message["headers"] = [*message.get("headers", []), *extra]
        await send(message)

    return wrapped


async def _refuse(send: Send, status: int, detail: str, extra: list[tuple[bytes, bytes]] | None = None) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *(extra or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
