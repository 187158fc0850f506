"""The studio's front door: every request passes here before any route (ASGI middleware).

In order: the Host check, a foreign Origin, the page's handshake (hello and login), the
token or a page's signature (for `/api` but health, and the API docs), the content type of
a state change, and the size (and, when signed, the digest) of a JSON body. Refusals are one-line JSON like every
other error. Every answer gets the security headers (no framing, no sniffing, no
referrer, a Content-Security-Policy without inline script). The rules themselves
live in `auth.py`; this module only applies them.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import parse_qs

from ftstudio.web.auth import STATE_CHANGING, Guard, is_loopback, same_token
from ftstudio.web.signing import (
    EMPTY_DIGEST,
    Nonces,
    Signed,
    b64,
    check,
    good_challenge,
    login_code,
    parse_header,
    parse_query,
    server_proof,
)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

MAX_JSON_BYTES = 1 << 20  # a training config is a few KB; nothing else takes a body but uploads
BODY_TIMEOUT_S = 30.0
UPLOAD_PATH = "/api/datasets"
HELLO_PATH = "/api/hello"
LOGIN_PATH = "/api/login"
HANDSHAKE_PATHS = frozenset({HELLO_PATH, LOGIN_PATH})
OPEN_PATHS = frozenset({"/api/health"})
# The interactive docs pages are off (api.py): they would run a CDN's script with the studio's authority.
# Their paths stay behind the token all the same, like the OpenAPI document.
DOC_PATHS = frozenset({"/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
SIGNATURE_REFUSALS = {
    "session": (
        401,
        "this page's session is from an earlier run of the studio, or its clock is over 2 minutes off; "
        "the page says hello again by itself (reload it if it does not)",
    ),
    "signature": (
        401,
        "the request's signature does not match: this page logged in to another studio, or the token changed; "
        "open the login URL that `ftstudio studio url` prints",
    ),
    "replayed": (401, "this signed request was sent before; a signature is good once"),
    "busy": (503, "too many signed requests in the last minutes; try again in a minute"),
}
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
        self.nonces = Nonces()  # touched from the event loop only

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

        if path in HANDSHAKE_PATHS:
            await self._handshake(path, method, headers, scope, send)
            return

        needs_token = (path.startswith("/api/") or path == "/api" or path in DOC_PATHS) and path not in OPEN_PATHS
        if not needs_token:
            if guard.bearer_ok(headers.get("authorization")):  # health says more to its owner
                scope.setdefault("state", {})["credential"] = "bearer"
            await self.app(scope, receive, send)
            return
        signed: Signed | None = None
        if guard.bearer_ok(headers.get("authorization")):
            credential = "bearer"
        else:
            signed = parse_header(headers.get("authorization"))
            query = scope.get("query_string", b"").decode("latin-1")
            if signed is None and method in ("GET", "HEAD"):
                query, signed = parse_query(query)
            if signed is None:
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
            refusal = check(
                signed,
                key=guard.page_key,
                epoch=guard.epoch,
                nonces=self.nonces,
                method=method,
                host=headers.get("host", ""),
                target=_raw_path(scope) + ("?" + query if query else ""),
                unsigned_body_ok=method == "POST" and path == UPLOAD_PATH,
            )
            if refusal is None and method not in STATE_CHANGING and signed.body != EMPTY_DIGEST:
                refusal = "signature"
            if refusal is not None:
                status, detail = SIGNATURE_REFUSALS[refusal]
                await _refuse(send, status, detail, code=refusal)
                return
            credential = "signed"
        scope.setdefault("state", {})["credential"] = credential

        if method in STATE_CHANGING:
            problem = _content_type_problem(path, headers)
            if problem:
                await _refuse(send, 415, problem)
                return
            # Only a request that passed the token check is read: nobody else can make the studio hold a body.
            if path != UPLOAD_PATH:
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
                # The signature covers the digest the page claimed; the body must be the one it digested.
                if signed is not None and hashlib.sha256(body).hexdigest() != signed.body:
                    status, detail = SIGNATURE_REFUSALS["signature"]
                    await _refuse(send, status, detail, code="signature")
                    return
                receive = _replay(body, receive)
        await self.app(scope, receive, send)

    async def _handshake(self, path: str, method: str, headers: dict[str, str], scope: Scope, send: Send) -> None:
        """The page's two open doors (signing.py). `GET /api/hello?challenge=C`: this studio proves it holds the
        page key before a page signs anything for it. `POST /api/login` with `X-Ftstudio-Login: CODE`: the code of
        the login URL buys the page key; the code is good for this run of the studio only."""
        guard = self.guard
        now = f"{time.time():.3f}"
        if path == HELLO_PATH:
            if method not in ("GET", "HEAD"):
                await _refuse(send, 405, "say hello with GET /api/hello?challenge=C")
                return
            query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
            challenge = (query.get("challenge") or [""])[0]
            if not good_challenge(challenge):
                await _refuse(send, 400, "send ?challenge= with 16 to 128 letters, digits, '-' or '_'")
                return
            proof = server_proof(guard.page_key, challenge, guard.epoch, now)
            await _answer(send, {"epoch": guard.epoch, "time": now, "proof": proof})
            return
        if method != "POST":
            await _refuse(send, 405, "log in with POST /api/login and the header X-Ftstudio-Login")
            return
        given = headers.get("x-ftstudio-login", "")
        if not same_token(given, login_code(guard.token, guard.epoch)):
            await _refuse(
                send,
                401,
                "this login link is not the running studio's (a new one is made each time the studio starts): "
                "`ftstudio studio url` prints the current one",
            )
            return
        await _answer(send, {"key": b64(guard.page_key), "epoch": guard.epoch, "time": now})


def _headers(scope: Scope) -> dict[str, str]:
    """Request headers by lower-case name; a repeated header keeps its first value (a second Host is ignored)."""
    out: dict[str, str] = {}
    for name, value in scope.get("headers", []):
        out.setdefault(name.decode("latin-1").lower(), value.decode("latin-1"))
    return out


def _raw_path(scope: Scope) -> str:
    """The path as the client sent it (percent-escapes kept): what a page signed."""
    raw = scope.get("raw_path")
    return raw.decode("latin-1") if isinstance(raw, bytes) else str(scope.get("path", ""))


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


async def _answer(send: Send, data: dict[str, str]) -> None:
    body = json.dumps(data).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"cache-control", b"no-store"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def _refuse(
    send: Send, status: int, detail: str, extra: list[tuple[bytes, bytes]] | None = None, *, code: str = ""
) -> None:
    body = json.dumps({"detail": detail, **({"code": code} if code else {})}).encode()
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
