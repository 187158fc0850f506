"""Signed requests: how the page proves it holds the studio's key without ever sending it.

A browser shares cookies across every port of 127.0.0.1, and after a stop another user can bind
the studio's own port (v4 or v6) and receive whatever an open tab sends there. So the page sends
no reusable secret at all:

- **The page key** is derived from the token (`page_key`), handed to a page once in exchange for
  the login code, and kept by the browser as a non-extractable Web Crypto key in the origin's
  IndexedDB (origin-scoped: another port is another origin). The token itself never reaches a page.
- **The login code** (`login_code`) is bound to this run of the studio (its epoch): a link printed
  before a restart, or opened while something else holds the port, is worth nothing later.
- **Every request is signed** (`request_signature`): HMAC over method, host, path and query, the
  body's digest, the time, a nonce and the epoch. The studio takes each nonce once, only within
  `SKEW_S` of its own clock, and only for its current epoch, so a signature caught by a squatter
  cannot be replayed to the studio when it comes back (a new start is a new epoch).
- **The server proves itself first** (`server_proof`): after a (re)connect the page sends a fresh
  challenge and signs nothing until the answer verifies with its key. A squatter cannot answer.

Scripts and the CLI keep `Authorization: Bearer TOKEN`: they read the token on this machine and
talk to the address in `studio.json`, which only a live studio writes.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass

SCHEME = "ftstudio"
QUERY_PARAM = "_auth"  # a signed GET that cannot carry a header (a download link); always the query's last field
UNSIGNED_BODY = "-"  # an upload: the page cannot digest a file of hundreds of MB before sending it
EMPTY_DIGEST = hashlib.sha256(b"").hexdigest()
SKEW_S = 120.0
NONCE_CAP = 200_000  # nonces remembered at once (2 x SKEW_S of them); past it, new requests wait for room
_PAGE_KEY_LABEL = b"ftstudio page key v1"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _mac(key: bytes, *fields: str) -> str:
    return b64(hmac.new(key, "\n".join(fields).encode(), hashlib.sha256).digest())


def new_epoch() -> str:
    """A run of the studio: random, so nothing signed for one run is good for the next."""
    return secrets.token_urlsafe(16)


def page_key(token: str) -> bytes:
    """What a logged-in page signs with: derived from the token, so a new token logs every page out."""
    return hmac.new(token.encode(), _PAGE_KEY_LABEL, hashlib.sha256).digest()


def login_code(token: str, epoch: str) -> str:
    return _mac(token.encode(), "ftstudio login", epoch)


def server_proof(key: bytes, challenge: str, epoch: str, now: str) -> str:
    return _mac(key, "ftstudio server", challenge, epoch, now)


def request_signature(
    key: bytes, *, method: str, host: str, target: str, ts: str, nonce: str, epoch: str, body: str
) -> str:
    return _mac(key, "ftstudio request", method.upper(), host, target, ts, nonce, epoch, body)


def good_challenge(text: str) -> bool:
    return 16 <= len(text) <= 128 and text.isascii() and all(c.isalnum() or c in "-_" for c in text)


@dataclass(frozen=True)
class Signed:
    """The fields of a signed request, from its Authorization header or its `_auth` query field."""

    epoch: str
    ts: str
    nonce: str
    body: str
    sig: str


def parse_header(authorization: str | None) -> Signed | None:
    """`Authorization: ftstudio epoch=E, ts=T, nonce=N, body=HEX, sig=S`; None when it is not one."""
    if not authorization:
        return None
    scheme, _, rest = authorization.partition(" ")
    if scheme.lower() != SCHEME:
        return None
    fields: dict[str, str] = {}
    for part in rest.split(","):
        name, sep, value = part.strip().partition("=")
        if not sep or name in fields:
            return None
        fields[name] = value
    return _signed(fields)


def parse_query(query: str) -> tuple[str, Signed | None]:
    """The query without a trailing `_auth=E.T.N.S` field (what was signed), and the fields it held."""
    head, sep, value = query.rpartition(QUERY_PARAM + "=")
    if not sep or (head and not head.endswith("&")) or "&" in value:
        return query, None
    parts = value.split(".")
    if len(parts) != 4:
        return query, None
    epoch, ts, nonce, sig = parts
    return head.removesuffix("&"), _signed({"epoch": epoch, "ts": ts, "nonce": nonce, "body": EMPTY_DIGEST, "sig": sig})


def _signed(fields: dict[str, str]) -> Signed | None:
    if set(fields) != {"epoch", "ts", "nonce", "body", "sig"}:
        return None
    if not all(
        0 < len(v) <= 128 and v.isascii() and all(c.isalnum() or c in "-_." for c in v) for v in fields.values()
    ):
        return None
    return Signed(**fields)


class Nonces:
    """Nonces seen within the clock window of this run; each is taken once."""

    def __init__(self, cap: int = NONCE_CAP) -> None:
        self.cap = cap
        self._seen: dict[str, float] = {}

    def take(self, nonce: str, now: float) -> bool | None:
        """True: first use. False: seen before. None: no room (a flood of signed requests)."""
        if nonce in self._seen:
            return False
        if len(self._seen) >= self.cap:
            cutoff = now - 2 * SKEW_S
            self._seen = {n: t for n, t in self._seen.items() if t >= cutoff}
            if len(self._seen) >= self.cap:
                return None
        self._seen[nonce] = now
        return True


def check(
    signed: Signed,
    *,
    key: bytes,
    epoch: str,
    nonces: Nonces,
    method: str,
    host: str,
    target: str,
    unsigned_body_ok: bool,
    now: float | None = None,
) -> str | None:
    """None when the signature holds; else a refusal code: `session` (another run of the studio, or a clock
    far off: say hello again), `signature`, `replayed`, `busy`."""
    now = time.time() if now is None else now
    if not hmac.compare_digest(signed.epoch.encode(), epoch.encode()):
        return "session"
    try:
        ts = float(signed.ts)
    except ValueError:
        return "signature"
    if abs(now - ts) > SKEW_S:
        return "session"
    if signed.body == UNSIGNED_BODY and not unsigned_body_ok:
        return "signature"
    want = request_signature(
        key, method=method, host=host, target=target, ts=signed.ts, nonce=signed.nonce, epoch=epoch, body=signed.body
    )
    if not hmac.compare_digest(want.encode(), signed.sig.encode()):
        return "signature"
    taken = nonces.take(signed.nonce, now)
    if taken is None:
        return "busy"
    return None if taken else "replayed"
