"""Who may talk to the studio: the token, and the Host and Origin checks.

The studio can start processes and read files as the person who started it, so
everything under `/api` (but `GET /api/health` and the page's login and hello)
needs the token kept in `$FTSTUDIO_HOME/token` (mode 0600): sent as
`Authorization: Bearer TOKEN` by scripts and the CLI, or proved by the page with a
signature made with a key derived from it (`signing.py`), never sent by a browser.

Two more checks stop what a token alone does not:

- **Host** must be a loopback name or address, a name the owner allowed
  (`--allow-host`), or, when the owner bound beyond loopback, an IP address. A web
  page that rebinds its own DNS name to 127.0.0.1 still sends its own name as
  Host, so it is refused even if it somehow had a credential.
- **Origin**, when a request carries one, must be the studio's own: a foreign
  Origin is refused whatever the credential; no CORS header is ever sent, so no
  other origin can read an answer or send the Authorization header.
"""

from __future__ import annotations

import contextlib
import hmac
import ipaddress
import os
import secrets
import socket
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from ftstudio.home import Home
from ftstudio.storage import writing
from ftstudio.web.signing import new_epoch, page_key

LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"})
STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def token_path(home: Home) -> Path:
    return home.root / "token"


def load_or_create_token(home: Home) -> str:
    """The home's token, created on first use (0600, never logged).

    Written whole to a temporary file, then linked into place: a link never replaces an existing
    file, so two processes racing to create it agree on one token, and nobody ever reads a half-written
    one (a crash or a full disk leaves no empty token behind)."""
    path = token_path(home)
    with writing(home.root):
        home.root.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            fd, tmp = tempfile.mkstemp(prefix=".token.", dir=home.root)  # mkstemp files are 0600
            try:
                with os.fdopen(fd, "w") as f:
                    f.write(secrets.token_urlsafe(32) + "\n")
                    f.flush()
                    os.fsync(f.fileno())
                with contextlib.suppress(FileExistsError):
                    os.link(tmp, path)
            finally:
                os.unlink(tmp)
    return read_token(home)


def read_token(home: Home) -> str:
    path = token_path(home)
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd) as f:
        # Another user must not read it: tighten a copy that was made too open (e.g. restored from a backup).
        if os.fstat(f.fileno()).st_mode & 0o077:
            with contextlib.suppress(OSError):
                os.fchmod(f.fileno(), 0o600)
        token = f.read().strip()
    if len(token) < 16:
        raise ValueError(f"{path} holds no usable token; delete it and start the studio again to make a new one")
    return token


def same_token(given: str | None, token: str) -> bool:
    return bool(given) and hmac.compare_digest(given.encode(), token.encode())  # type: ignore[union-attr]


def bearer(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, value = authorization.partition(" ")
    return value.strip() if scheme.lower() == "bearer" else None


def host_name(host_header: str) -> str | None:
    """The name or address of a Host header, without its port; None when it is not a valid Host."""
    host = host_header.strip()
    if not host or any(c.isspace() or c in "/\\@?#" for c in host):
        return None
    if host.startswith("["):  # [::1]:8765
        end = host.find("]")
        if end < 0 or (host[end + 1 :] and not _port(host[end + 1 :])):
            return None
        return host[1:end].lower()
    name, sep, port = host.rpartition(":")
    if not sep:
        return host.lower().rstrip(".")
    if not _port(":" + port):
        return None
    return name.lower().rstrip(".")


def _port(text: str) -> bool:
    return text.startswith(":") and text[1:].isascii() and text[1:].isdigit() and len(text) <= 6


def is_loopback(name: str) -> bool:
    """localhost, 127.0.0.0/8 in any spelling (127.1), ::1 and ::ffff:127.0.0.1. Not `*.localhost`: some
    resolvers forward those names to DNS, where a rebinding attacker answers."""
    if name in LOOPBACK_NAMES:
        return True
    address = ip(name)
    return address is not None and address.is_loopback


def ip(name: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address a host name spells, if it is one: dotted quads, short IPv4 forms (127.1, 0) and IPv6,
    an IPv4-mapped IPv6 address as its IPv4 address."""
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        if not name or not all(part.isascii() and part.isdigit() for part in name.split(".")):
            return None
        try:
            address = ipaddress.ip_address(socket.inet_ntoa(socket.inet_aton(name)))
        except (OSError, ValueError):
            return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return address.ipv4_mapped
    return address


def is_ip(name: str) -> bool:
    return ip(name) is not None


def binds_beyond_loopback(bind_host: str) -> bool:
    """`--host 0.0.0.0`, `::`, a LAN address or a name: the studio is reachable from other machines."""
    name = bind_host.strip("[]").lower()
    return not is_loopback(name)


@dataclass(frozen=True)
class Guard:
    """The checks of one studio: its token, this run's epoch, and which Host names it answers to."""

    token: str
    port: int
    allow_hosts: tuple[str, ...] = ()
    remote: bool = False  # bound beyond loopback: IP-literal hosts are the owner's own addresses
    scheme: str = "http"
    allow_origins: tuple[str, ...] = ()  # e.g. https://box.lan, the page's origin behind a TLS proxy
    epoch: str = field(default_factory=new_epoch)  # this run: login codes and signatures are good for it only

    @property
    def page_key(self) -> bytes:
        return page_key(self.token)

    def host_ok(self, host_header: str | None) -> bool:
        name = host_name(host_header or "")
        if name is None:
            return False
        if is_loopback(name) or name in self.allow_hosts:
            return True
        # A rebinding page sends its own DNS name; a bare address was typed by someone who knows the machine.
        return self.remote and is_ip(name)

    def origin_ok(self, origin: str | None, host_header: str | None) -> bool:
        """Origin names this studio: same scheme and the same host:port as the request itself."""
        if origin is None:
            return True
        if origin == "null":
            return False
        if origin.lower().rstrip("/") in self.allow_origins:
            return True
        try:
            parts = urlsplit(origin)
            port = parts.port
        except ValueError:
            return False
        if parts.scheme != self.scheme or not parts.hostname or parts.path or parts.query:
            return False
        want = host_name(host_header or "")
        default = 443 if self.scheme == "https" else 80
        req_port = _header_port(host_header or "") or default
        return parts.hostname.lower().rstrip(".") == want and (port or default) == req_port

    def bearer_ok(self, authorization: str | None) -> bool:
        return same_token(bearer(authorization), self.token)


def _header_port(host_header: str) -> int | None:
    host = host_header.strip()
    tail = host[host.find("]") + 1 :] if host.startswith("[") else host
    _, sep, port = tail.rpartition(":")
    return int(port) if sep and port.isascii() and port.isdigit() else None
