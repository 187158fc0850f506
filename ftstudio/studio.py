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
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

import psutil

from ftstudio.errors import FtstudioError, StudioAlreadyRunning
from ftstudio.home import Home, read_json, write_json_atomic
from ftstudio.procs import Identity, Liveness, check

log = logging.getLogger("ftstudio")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765


@dataclass
class ServerInfo:
    pid: int
    start_time: float
    boot_id: str
    host: str
    port: int
    started_at: float

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"http://{host}:{self.port}/"


def running_server(home: Home) -> ServerInfo | None:
    """The live server of this home, if there is one (identity-checked, not a bare pid)."""
    data = read_json(home.server_info)
    if not data:
        return None
    try:
        info = ServerInfo(**{k: data[k] for k in ServerInfo.__dataclass_fields__})
    except (KeyError, TypeError):
        return None
    if check(Identity(info.pid, info.start_time, info.boot_id), marker="studio") != Liveness.ALIVE:
        return None
    return info


def _take_lock(home: Home) -> int:
    fd = os.open(home.lock, os.O_RDWR | os.O_CREAT, 0o644)
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


def serve(home: Home, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> int:
    """Run the studio server in the foreground until SIGTERM/SIGINT."""
    import uvicorn

    from ftstudio.api import create_app
    from ftstudio.broker import Broker
    from ftstudio.server import QuietServer
    from ftstudio.service import Service, setup_logging

    home.ensure()
    setup_logging(home, to_stderr=sys.stderr.isatty())
    lock_fd = _take_lock(home)
    sock = _bind(host, port)
    port = sock.getsockname()[1]  # --port 0 asks for any free port
    started_at = time.time()
    broker = Broker()
    service = Service(home, in_server=True)
    service.supervisor.notify = broker.notify
    service.supervisor.streamed = broker.streamed
    service.executor.on_exit = service.supervisor.poke  # a runner we started ended: read its exit record now

    verdicts = service.supervisor.reconcile_all()  # before the API answers anything
    watched = len(service.supervisor.watched())
    log.info(
        "studio started (pid %s) on http://%s:%s/: %d running task(s) reattached, %d decided at start-up",
        os.getpid(), host, port, watched, len(verdicts),
    )  # fmt: skip
    me = psutil.Process()
    info = ServerInfo(me.pid, me.create_time(), Identity.of(me.pid).boot_id, host, port, started_at)
    write_json_atomic(home.server_info, info.__dict__)

    stop = threading.Event()
    watcher = threading.Thread(target=service.supervisor.run, args=(stop,), name="supervisor", daemon=True)
    watcher.start()
    app = create_app(service, broker, started_at=started_at)
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off", timeout_graceful_shutdown=2)
    server = QuietServer(config)
    try:
        server.run(sockets=[sock])
    finally:
        stop.set()
        service.supervisor.poke()
        watcher.join(timeout=5)
        if (read_json(home.server_info) or {}).get("pid") == me.pid:
            home.server_info.unlink(missing_ok=True)
        log.info("studio stopped (pid %s); training processes keep running", me.pid)
        os.close(lock_fd)
    return 0


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto IPPROTO_TCP, not the default 0: asyncio sets TCP_NODELAY only on sockets that say TCP, and
    # without it every keep-alive request waited ~40 ms (Nagle vs delayed ACK; bench/bench_startup.py).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise FtstudioError(
                f"port {port} on {host} is in use by another program; pick another with --port"
            ) from None
        raise FtstudioError(f"cannot listen on {host}:{port}: {e.strerror}; check --host") from None
    sock.listen(128)
    return sock


def start(home: Home, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, *, timeout: float = 60.0) -> ServerInfo:
    """Start `serve` in the background and wait until it answers."""
    home.ensure()
    existing = running_server(home)
    if existing:
        return existing
    with open(home.log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ftstudio", "studio", "serve", "--host", host, "--port", str(port)],
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


def _answers(info: ServerInfo) -> bool:
    try:
        with urllib.request.urlopen(f"{info.url}api/health", timeout=2) as r:
            return r.status == 200
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
        "uptime_s": round(time.time() - info.started_at, 1),
        "home": str(home.root),
    }
