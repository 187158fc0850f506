"""Helpers shared by the core tests (imported by name: `from support import ...`)."""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
SCRIPTED = ROOT / "tests" / "scripted"


def in_memory(home: Path, *, on_submit: Callable[[Any], None] | None = None, **kw: Any) -> Any:
    """A studio service on `home` whose tasks "run" in the in-memory executor (no process): the fast tier's
    stand-in for a studio. `on_submit(runner)` says what every new runner does (e.g. `runner.complete(3)`);
    `service.executor.runner(task_id)` is a task's runner, for the test to drive. `kw` go to Service."""
    from ftstudio.execution.inmemory import InMemoryExecutor
    from ftstudio.home import Home
    from ftstudio.studio.service import Service

    executor = InMemoryExecutor(on_submit=on_submit)
    service = Service(Home(home), executor=executor, **kw)
    service.supervisor.clock = executor.clock
    return service


def api_client(service: Any, **kw: Any) -> Any:
    """An in-process client of the HTTP API over `service` (FastAPI's TestClient), as the page would call it."""
    from fastapi.testclient import TestClient

    from ftstudio.web.api import create_app
    from ftstudio.web.auth import load_or_create_token

    headers = {"Authorization": f"Bearer {load_or_create_token(service.home)}"}
    return TestClient(create_app(service, **kw), base_url="http://127.0.0.1:8765", headers=headers)


def own_id(task_id: str) -> str:
    """`task_id` made this test's own ("20261122-0000-stop2" -> "20261122-0000-stop2-1a2b3c4d"): a task's
    processes are found by the id they are tagged with (procs.tagged, kill_tagged) and its cgroup is named
    for it, across the whole machine, so two tests that start processes for one fixed id (on two xdist
    workers, or in two test runs on one machine) would see, and kill, each other's."""
    return f"{task_id}-{secrets.token_hex(4)}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(pred: Callable[[], Any], timeout: float = 30.0, interval: float = 0.1, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


TRAINERS = ("ftstudio.train", "paced_trainer")
"""The module names a trainer runs as (`python -m NAME`): the product's, and the tests' paced one."""


def is_trainer(cmdline: list[str]) -> bool:
    """A trainer process (a torchrun rank included), by its command line; not torchrun's agent, nor the
    runner (whose command line names the trainer module it starts)."""
    return any(name in cmdline for name in TRAINERS) and not {"torch.distributed.run", "ftstudio.runner"} & set(cmdline)


def paced(**extra: str) -> dict[str, str]:
    """Environment for a studio whose trainers are the real one with a floor on each step's length
    (tests/scripted/paced_trainer.py): for tests that act on a run midway."""
    return {"FTSTUDIO_TRAINER_MODULE": "paced_trainer", **extra}


def home_env(home: Path, *, scripted: bool = False, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FTSTUDIO_")}
    env["FTSTUDIO_HOME"] = str(home)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(SCRIPTED)])
    env["HF_HUB_OFFLINE"] = "1"
    if scripted:
        env["FTSTUDIO_TRAINER_MODULE"] = "scripted_trainer"
    env.update(extra)
    return env


def processes_of(home: Path) -> list[psutil.Process]:
    """Every live process started for this home: studio servers and anything tagged with one of its tasks."""
    found = []
    for proc in psutil.process_iter():
        try:
            env = proc.environ()
            if (env.get("FTSTUDIO_HOME") == str(home) and proc.pid != os.getpid()) or (
                env.get("FTSTUDIO_TASK_ID") and (home / "tasks" / env["FTSTUDIO_TASK_ID"]).exists()
            ):
                found.append(proc)
        except (psutil.Error, OSError):
            continue
    return found


def end_processes(procs: list[psutil.Process]) -> None:
    """terminate -> wait -> kill, always."""
    for p in procs:
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=5)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=5)


def sweep(home: Path) -> None:
    end_processes(processes_of(home))


class Studio:
    """A real studio server (`python -m ftstudio studio serve`) in a subprocess."""

    def __init__(self, home: Path, env: dict[str, str], port: int | None = None, cwd: Path | None = None) -> None:
        self.home = home
        self.env = env
        self.cwd = cwd  # where it runs; `python -m` puts this folder first on sys.path
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = f"http://127.0.0.1:{self.port}"
        self.http = httpx.Client(base_url=self.url, timeout=30)

    def start(self, *flags: str, **extra_env: str) -> Studio:
        """Serve with these extra flags of `studio serve` (e.g. "--slots", "2") and environment."""
        out = open(self.home.parent / "studio-stdout.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ftstudio", "studio", "serve", "--port", str(self.port), *flags],
            env={**self.env, **extra_env},
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=self.cwd,
        )
        out.close()
        wait_for(self._ready, timeout=60, what="the studio to answer")
        # As the CLI does: the token is read from the home, where the studio made it on first start.
        self.token = (self.home / "token").read_text().strip()
        self.http.headers["Authorization"] = f"Bearer {self.token}"
        return self

    @property
    def auth(self) -> dict[str, str]:
        """Headers for a request made outside `self.http` (a stream)."""
        return {"Authorization": f"Bearer {self.token}"}

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"studio exited with {self.proc.returncode}: {self.log_tail()}")
        try:
            return self.http.get("/api/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def kill(self, sig: int = signal.SIGKILL) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.http.close()

    def log_tail(self) -> str:
        """The studio's own log and what the process printed (a start-up error lands in the latter)."""
        paths = (self.home / "studio.log", self.home.parent / "studio-stdout.log")
        return "\n".join(p.read_text(errors="replace")[-3000:] for p in paths if p.exists())

    def task(self, task_id: str) -> dict[str, Any]:
        r = self.http.get(f"/api/tasks/{task_id}")
        r.raise_for_status()
        return r.json()

    def wait_status(self, task_id: str, *statuses: str, timeout: float = 120) -> dict[str, Any]:
        return wait_for(
            lambda: (t := self.task(task_id))["status"] in statuses and t,
            timeout=timeout,
            interval=0.2,
            what=f"task {task_id} to reach {statuses}",
        )


def run_cli(
    home: Path,
    *args: str,
    scripted: bool = False,
    timeout: float = 180,
    wrapper: Sequence[str] = (),
    **extra: str,
) -> subprocess.CompletedProcess[str]:
    """`ftstudio ARGS` on `home`; `wrapper`: a command that runs it (its argv follows the wrapper's)."""
    return subprocess.run(
        [*wrapper, sys.executable, "-m", "ftstudio", *args],
        env=home_env(home, scripted=scripted, **extra),
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def cli_json(home: Path, *args: str, **kw: Any) -> Any:
    r = run_cli(home, *args, "--json", **kw)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def tiny(steps: int, every: int) -> dict[str, Any]:
    """builtin:tiny, cheap: the real trainer, for tests about what runs it."""
    return {
        "preset": "cpu-demo",
        "data": {"validation": "0", "max_length": 64},
        "optim": {"max_steps": steps, "batch_size": 4, "seed": 5},
        "checkpoint": {"every_steps": every},
        "logging": {"eval_on_start": False},
    }


def submit_tiny(studio: Studio, steps: int, every: int, name: str = "tiny on slurm") -> str:
    r = studio.http.post("/api/tasks", json={"name": name, "config": tiny(steps, every)})
    assert r.status_code == 201, r.text
    return r.json()["id"]


def progress_steps(studio: Studio, tid: str) -> list[int]:
    """The step of each progress event the studio keeps, across attempts (a resumed attempt's redone steps
    replace the earlier ones)."""
    events = studio.http.get(f"/api/tasks/{tid}/metrics").json()["events"]
    return [e["step"] for e in events if e["kind"] == "progress"]
