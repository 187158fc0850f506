"""The studio server's lifecycle: one server per data home, started in the
background and stopped without touching training.

`serve` holds `studio.lock` (an exclusive flock: a second server on the same
home refuses), reconciles every task *before* the API answers, then runs the
supervisor's watch loop beside uvicorn. `start` launches `serve` detached and
waits until it answers; `stop` sends SIGTERM to the server alone — training
runs in its own sessions and never notices.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import ipaddress
import json
import logging
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import psutil

from ftstudio.errors import DamagedFile, FtstudioError, StudioAlreadyRunning, ValidationError
from ftstudio.execution.facts import Liveness
from ftstudio.execution.procs import Identity, check
from ftstudio.home import Home, read_json, write_json_atomic
from ftstudio.studio.policy import MAX_SLOTS, Policy

if TYPE_CHECKING:
    from ftstudio.studio.service import Service
from ftstudio.web.auth import Guard, binds_beyond_loopback, ip, load_or_create_token
from ftstudio.web.signing import login_code

log = logging.getLogger("ftstudio")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
MAX_UPLOAD_MB = 1 << 20  # 1 TB: past this a dataset belongs on disk, given by path


@dataclass(frozen=True)
class ServerOptions:
    """How the studio server listens and what it allows: the flags of `studio start|serve`."""

    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    certfile: str | None = None
    keyfile: str | None = None
    policy: Policy = field(default_factory=Policy)
    slots: int | None = None
    """Training slots to remember in the home (--slots); None keeps what the home has."""

    @classmethod
    def checked(
        cls,
        *,
        host: str = DEFAULT_HOST,
        port: int = DEFAULT_PORT,
        certfile: str | None = None,
        keyfile: str | None = None,
        allow_remote_code: bool = False,
        allow_paths: list[str] | tuple[str, ...] = (),
        allow_hosts: list[str] | tuple[str, ...] = (),
        allow_origins: list[str] | tuple[str, ...] = (),
        max_upload_mb: int = Policy.max_upload_bytes >> 20,
        max_row_kb: int = Policy.max_row_bytes >> 10,
        max_pending: int = Policy.max_pending,
        slots: int | None = None,
    ) -> ServerOptions:
        """Build from the command line, every problem named with its flag."""
        problems: list[str] = []
        if not 0 <= port <= 65535:
            problems.append(f"--port: must be between 0 and 65535 (got {port})")
        if not 1 <= max_upload_mb <= MAX_UPLOAD_MB:
            problems.append(f"--max-upload-mb: must be between 1 and {MAX_UPLOAD_MB} (got {max_upload_mb})")
        if not 1 <= max_row_kb <= 1 << 20:
            problems.append(f"--max-row-kb: must be between 1 and {1 << 20} (got {max_row_kb})")
        if not 1 <= max_pending <= 100_000:
            problems.append(f"--max-pending: must be between 1 and 100000 (got {max_pending})")
        if slots is not None and not 1 <= slots <= MAX_SLOTS:
            problems.append(f"--slots: must be between 1 and {MAX_SLOTS} (got {slots})")
        roots = []
        for raw in allow_paths:
            path = Path(raw).expanduser()
            if not path.is_dir():
                problems.append(f"--allow-path: {raw} is not a directory")
            else:
                roots.append(path.resolve())
        hosts = []
        for name in allow_hosts:
            name = name.strip().lower().rstrip(".")
            if not name or not all(part and part.replace("-", "").isalnum() for part in name.split(".")):
                problems.append(f"--allow-host: {name!r} is not a host name (letters, digits, dots and dashes)")
            else:
                hosts.append(name)
        origins = []
        for origin in allow_origins:
            parts = urlsplit(origin.strip())
            if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/"):
                problems.append(f"--allow-origin: {origin!r} is not an origin like https://studio.example.org")
            else:
                origins.append(f"{parts.scheme}://{parts.netloc}".lower())
        if bool(certfile) != bool(keyfile):
            problems.append("--certfile and --keyfile: give both, or neither")
        for flag, path_ in (("--certfile", certfile), ("--keyfile", keyfile)):
            if path_ and not Path(path_).is_file():
                problems.append(f"{flag}: {path_} is not a file")
        if problems:
            raise ValidationError("; ".join(problems))
        policy = Policy(
            allow_remote_code=allow_remote_code,
            allow_paths=tuple(roots),
            allow_hosts=tuple(hosts),
            allow_origins=tuple(origins),
            max_upload_bytes=max_upload_mb << 20,
            max_row_bytes=max_row_kb << 10,
            max_pending=max_pending,
        )
        return cls(
            host=host,
            port=port,
            certfile=str(Path(certfile).resolve()) if certfile else None,
            keyfile=str(Path(keyfile).resolve()) if keyfile else None,
            policy=policy,
            slots=slots,
        )

    def argv(self) -> list[str]:
        """The same options as flags of `ftstudio studio serve` (how `start` hands them on)."""
        out = ["--host", self.host, "--port", str(self.port)]
        p = self.policy
        if p.allow_remote_code:
            out.append("--allow-remote-code")
        for root in p.allow_paths:
            out += ["--allow-path", str(root)]
        for name in p.allow_hosts:
            out += ["--allow-host", name]
        for origin in p.allow_origins:
            out += ["--allow-origin", origin]
        out += ["--max-upload-mb", str(p.max_upload_bytes >> 20), "--max-row-kb", str(p.max_row_bytes >> 10)]
        out += ["--max-pending", str(p.max_pending)]
        if self.slots is not None:
            out += ["--slots", str(self.slots)]
        if self.certfile and self.keyfile:
            out += ["--certfile", self.certfile, "--keyfile", self.keyfile]
        return out


@dataclass
class ServerInfo:
    pid: int
    start_time: float
    boot_id: str
    host: str
    port: int
    started_at: float
    scheme: str = "http"
    epoch: str = ""  # this run of the studio: its login code is made from it (web/signing.py)

    @property
    def url(self) -> str:
        """Where a person on this machine opens the studio."""
        return f"{self.scheme}://{reachable_host(self.host)}:{self.port}/"

    def login_url(self, token: str) -> str:
        """The URL that logs a browser in: a code good for this run of the studio only, which the page trades
        for its signing key and then drops from the address bar. The token itself never goes to a browser."""
        if not self.epoch:  # a studio of an earlier release, still running: its own cookie login
            return f"{self.url}?token={token}"
        return f"{self.url}?login={login_code(token, self.epoch)}"


def reachable_host(bind_host: str) -> str:
    """A host for a URL people can open: the wildcard addresses are not, and IPv6 needs brackets."""
    host = bind_host.strip("[]")
    address = ip(host) if host else ipaddress.ip_address("0.0.0.0")
    if address is None:
        return host  # a name
    if address.is_unspecified:
        return "[::1]" if address.version == 6 else "127.0.0.1"
    return f"[{address}]" if address.version == 6 else str(address)


def running_server(home: Home) -> ServerInfo | None:
    """The live server of this home, if there is one (identity-checked, not a bare pid). A damaged record is
    stale when no studio holds the lock (the next start writes a new one); while one does, it is an error
    that says what to do, since that studio cannot be found or stopped by it."""
    try:
        data = read_json(home.server_info)
        known = ServerInfo.__dataclass_fields__
        info = ServerInfo(**{k: v for k, v in (data or {}).items() if k in known}) if data else None
        if info is not None and not (isinstance(info.pid, int) and isinstance(info.port, int)):
            raise ValueError("its pid and port are not numbers")
    except (ValueError, TypeError, AttributeError, OSError) as e:  # not JSON, not an object, wrong fields
        if not _lock_held(home):
            return None
        why = "not valid JSON" if isinstance(e, json.JSONDecodeError) else "not what a studio writes"
        raise DamagedFile(
            f"{home.server_info}, the running studio's address, is damaged ({why}); stop that studio (its process "
            f"runs `ftstudio studio serve` with FTSTUDIO_HOME={home.root}) and start it again: it writes a new one"
        ) from None
    if info is None:
        return None
    if check(Identity(info.pid, info.start_time, info.boot_id), marker="studio") != Liveness.ALIVE:
        return None
    return info


def _lock_held(home: Home) -> bool:
    """Whether a studio holds this home's lock now (asked without taking it for more than a moment)."""
    try:
        fd = os.open(home.lock, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False  # no lock file: no studio ever ran here
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # and with it the shared lock, if it was taken


def _take_lock(home: Home) -> int:
    fd = os.open(home.lock, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        other = running_server(home)
        where = f" (pid {other.pid}, {other.url})" if other else ""
        raise StudioAlreadyRunning(
            f"another studio is already running on {home.root}{where}; use it, or stop it with `ftstudio studio stop`"
        ) from None
    return fd


def serve(home: Home, options: ServerOptions | None = None) -> int:
    """Run the studio server in the foreground until SIGTERM/SIGINT."""
    options = options or ServerOptions()
    host, port = options.host, options.port
    import uvicorn

    from ftstudio.studio.service import Service, setup_logging
    from ftstudio.web.api import create_app
    from ftstudio.web.broker import Broker
    from ftstudio.web.connections import GuardedH11Protocol, NoiseFilter, limits_for
    from ftstudio.web.server import QuietServer

    home.ensure()
    setup_logging(home, to_stderr=sys.stderr.isatty())
    tightened = home.tighten()
    if tightened is not None:
        left = (
            f"; could not change {len(tightened.failed)} (not yours?): {', '.join(tightened.failed[:3])}"
            if tightened.failed
            else ""
        )
        log.warning(
            "the data home %s was open to other users (mode %o): made it yours alone, folders 0700 and files 0600"
            " (%d changed)%s",
            home.root, tightened.mode, tightened.changed, left,
        )  # fmt: skip
    lock_fd = _take_lock(home)
    token = load_or_create_token(home)
    socks = bind(host, port)
    port = socks[0].getsockname()[1]  # --port 0 asks for any free port
    scheme = "https" if options.certfile else "http"
    remote = binds_beyond_loopback(host)
    guard = Guard(
        token=token,
        port=port,
        allow_hosts=options.policy.allow_hosts,
        remote=remote,
        scheme=scheme,
        allow_origins=options.policy.allow_origins,
    )
    if remote:
        log.warning("%s", exposure_warning(host, port, scheme))
    started_at = time.time()
    broker = Broker()
    service = Service(home, in_server=True, policy=options.policy)
    service.supervisor.notify = broker.notify
    service.supervisor.streamed = broker.streamed
    service.executor.on_exit = service.supervisor.poke  # a runner we started ended: read its exit record now

    if options.slots is not None:
        service.set_slots(options.slots)
    # Folders the index does not know (an emptied or replaced studio.db): back in it before anything is decided.
    found = service.reindex()
    if found.rebuilt:
        shown = ", ".join(found.rebuilt[:5]) + (f" and {len(found.rebuilt) - 5} more" if len(found.rebuilt) > 5 else "")
        log.warning(
            "studio.db did not know %d task folder(s); rebuilt them from the folders: %s", len(found.rebuilt), shown
        )
    for line in found.skipped:
        log.warning("not re-indexed: %s", line)
    verdicts = service.supervisor.reconcile_all()  # before the API answers anything
    released = service.store.release_orphans()  # leases of tasks that ended while no studio watched
    if released:
        log.info("released %d lease(s) of tasks that are no longer running", released)
    watched = len(service.supervisor.watched())
    log.info(
        "studio started (pid %s) on http://%s:%s/: %d running task(s) reattached, %d decided at start-up",
        os.getpid(), host, port, watched, len(verdicts),
    )  # fmt: skip
    me = psutil.Process()
    info = ServerInfo(
        me.pid, me.create_time(), Identity.of(me.pid).boot_id, host, port, started_at, scheme, guard.epoch
    )
    write_json_atomic(home.server_info, info.__dict__)

    stop = threading.Event()
    watcher = threading.Thread(target=service.supervisor.run, args=(stop,), name="supervisor", daemon=True)
    watcher.start()
    checker = threading.Thread(target=_check_executor, args=(service, stop), name="executor-check", daemon=True)
    checker.start()
    app = create_app(service, broker, started_at=started_at, guard=guard)
    limit, waiting = limits_for()
    GuardedH11Protocol.waiting_limit = waiting
    config = uvicorn.Config(
        app,
        http=GuardedH11Protocol,  # headers within 10 s; silent connections evict each other (web/connections.py)
        limit_concurrency=limit,  # a 503 before the process runs out of open files
        log_level="warning",
        access_log=False,
        lifespan="off",
        timeout_graceful_shutdown=2,
        ssl_certfile=options.certfile,
        ssl_keyfile=options.keyfile,
    )
    logging.getLogger("uvicorn.error").addFilter(NoiseFilter())  # after Config, which sets uvicorn's logging up
    server = QuietServer(config)

    def stop_supervising() -> None:
        stop.set()
        service.supervisor.poke()

    server.on_exit = stop_supervising
    try:
        server.run(sockets=socks)
    finally:
        stop.set()
        service.supervisor.poke()
        watcher.join(timeout=5)
        checker.join(timeout=10)  # its check job is cancelled on the way out
        try:
            service.store.checkpoint()  # studio.db alone is complete once the studio has stopped
        except Exception:  # a busy or read-only database: the WAL stays beside it, and SQLite reads both
            log.warning("could not fold the write-ahead log into %s; keep studio.db-wal beside it", home.db)
        if (read_json(home.server_info) or {}).get("pid") == me.pid:
            home.server_info.unlink(missing_ok=True)
        log.info("studio stopped (pid %s); training processes keep running", me.pid)
        os.close(lock_fd)
    return 0


def _check_executor(service: Service, stop: threading.Event) -> None:
    """Changed Slurm settings (`studio start --executor slurm ...`) are checked here while the studio serves:
    the executor in use keeps serving until their check job has seen the home from a compute node."""
    while not stop.is_set():
        if service.launcher.pending() is not None:
            log.info("checking the new Slurm settings with a check job; new fine-tunes keep their executor meanwhile")
            try:
                done = service.check_pending_executor(stop)
            except Exception:  # the checker must outlive any one check; the person reads why in the log
                log.exception("the check of the new Slurm settings failed unexpectedly; trying again in a minute")
                stop.wait(60.0)
                continue
            if done is not None:
                passed, line = done
                if passed:
                    log.info("%s; new fine-tunes go to Slurm from now on", line)
                else:
                    log.warning("the new Slurm settings were not taken: %s", line)
        stop.wait(2.0)


def bind(host: str, port: int) -> list[socket.socket]:
    """The listening sockets for `--host`. `localhost` is both 127.0.0.1 and ::1 on one port: a browser may
    reach either for `localhost:PORT`, and a twin left free is one another user can take, to receive what the
    owner's tab sends there. Without IPv6 on the machine, 127.0.0.1 alone."""
    if host.strip("[]").lower() != "localhost":
        return [_bind_one(host, port)]
    for _ in range(20 if port == 0 else 1):  # --port 0: a free v4 port may be taken on v6; pick again
        v4 = _bind_one("127.0.0.1", port)
        chosen = v4.getsockname()[1]
        try:
            return [v4, _bind_one("::1", chosen)]
        except _NoIPv6:
            log.info("this machine has no IPv6 loopback; listening on 127.0.0.1 only")
            return [v4]
        except FtstudioError:
            v4.close()
            if port != 0:
                raise
    raise FtstudioError("found no port free on both 127.0.0.1 and ::1; pick one with --port")


class _NoIPv6(Exception):
    pass


def _bind_one(host: str, port: int) -> socket.socket:
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto IPPROTO_TCP, not the default 0: asyncio sets TCP_NODELAY only on sockets that say TCP, and
    # without it every keep-alive request waited ~40 ms (Nagle vs delayed ACK; bench/bench_startup.py).
    try:
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    except OSError as e:
        if family == socket.AF_INET6 and e.errno == errno.EAFNOSUPPORT:
            raise _NoIPv6 from None
        raise
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        shown = f"[{host}]" if ":" in host else host
        if e.errno == errno.EADDRINUSE:
            raise FtstudioError(
                f"port {port} on {shown} is in use by another program; pick another with --port"
            ) from None
        if family == socket.AF_INET6 and host == "::1" and e.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
            raise _NoIPv6 from None
        raise FtstudioError(f"cannot listen on {shown}:{port}: {e.strerror}; check --host") from None
    sock.listen(128)
    return sock


def start(home: Home, options: ServerOptions | None = None, *, timeout: float = 60.0) -> ServerInfo:
    """Start `serve` in the background and wait until it answers."""
    options = options or ServerOptions()
    home.ensure()
    existing = running_server(home)
    if existing:
        return existing
    with open(home.log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ftstudio", "studio", "serve", *options.argv()],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "FTSTUDIO_HOME": str(home.root)},
        )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise FtstudioError(f"the studio did not start: {_last_error(home)} (full log: {home.log})")
        info = running_server(home)
        if info and info.pid == proc.pid and _answers(info):
            return info
        time.sleep(0.1)
    raise FtstudioError(f"the studio did not answer within {timeout:.0f}s; see {home.log}")


def exposure_warning(host: str, port: int, scheme: str) -> str:
    """What binding beyond loopback means, said once at start (studio.log and the terminal)."""
    text = (
        f"the studio listens on {host}:{port}, so other machines can reach it: every request needs the token, "
        "but never share the login URL"
    )
    if scheme == "http":
        text += (
            "; traffic is unencrypted (the token included): put TLS in front of it (a reverse proxy such as "
            "nginx or caddy) or start it with --certfile and --keyfile"
        )
    return text


def _answers(info: ServerInfo) -> bool:
    context = None
    if info.scheme == "https":
        # Our own server, asked on this machine: its certificate is often self-signed or names another host.
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    try:
        with urllib.request.urlopen(f"{info.url}api/health", timeout=2, context=context) as r:
            return bool(r.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _last_error(home: Home) -> str:
    try:
        lines = home.log.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "no log"
    for line in reversed(lines[-40:]):
        if "Error:" in line or "error:" in line:
            return line.split("Error: ", 1)[-1].split("error: ", 1)[-1].strip()
    return lines[-1] if lines else "no log"


def stop(home: Home, *, timeout: float = 15.0) -> ServerInfo | None:
    """Stop the server alone. Returns what was stopped, or None if none was running."""
    info = running_server(home)
    if info is None:
        return None
    with contextlib.suppress(ProcessLookupError):
        os.kill(info.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check(Identity(info.pid, info.start_time, info.boot_id)) != Liveness.ALIVE:
            return info
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.kill(info.pid, signal.SIGKILL)
    return info


def status(home: Home) -> dict[str, Any]:
    info = running_server(home)
    if info is None:
        return {"running": False, "home": str(home.root)}
    return {
        "running": True,
        "pid": info.pid,
        "url": info.url,
        "exposed": binds_beyond_loopback(info.host),
        "uptime_s": round(time.time() - info.started_at, 1),
        "home": str(home.root),
    }
