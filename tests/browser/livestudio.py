"""The real studio server as a subprocess for the browser tests, and the
processes it starts for training (tagged with FTSTUDIO_TASK_ID by the runner)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import psutil
from support import wait_for

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = Path(os.environ.get("FTSTUDIO_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def task_processes(home: Path, task_id: str | None = None) -> list[psutil.Process]:
    """Live processes tagged with a task of this home (or with one task)."""
    found = []
    for proc in psutil.process_iter():
        try:
            tag = proc.environ().get("FTSTUDIO_TASK_ID")
        except (psutil.Error, OSError):
            continue
        if tag and (tag == task_id if task_id else (home / "tasks" / tag).exists()):
            found.append(proc)
    return found


class LiveStudio:
    """`python -m ftstudio studio serve` on its own home and port; restartable on the same ones."""

    def __init__(self, home: Path, port: int) -> None:
        self.home = home
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen[bytes] | None = None
        env = {k: v for k, v in os.environ.items() if not k.startswith("FTSTUDIO_")}
        paths = [str(ROOT), *[p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]]
        env.update(FTSTUDIO_HOME=str(home), PYTHONPATH=os.pathsep.join(paths), HF_HUB_OFFLINE="1")
        self.env = env

    def start(self, timeout: float = 60) -> LiveStudio:
        with open(self.home.parent / "studio-stdout.log", "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "ftstudio", "studio", "serve", "--port", str(self.port)],
                env=self.env,
                cwd=self.home.parent,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        wait_for(self._ready, timeout=timeout, what="the studio to answer /api/health")
        return self

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"the studio exited with {self.proc.returncode}:\n{self.log_tail()}")
        try:
            return self.api("GET", "/api/health", timeout=1)["status"] == "ok"
        except (OSError, ValueError):
            return False

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """End the server abruptly, as a crash or an OOM kill would (its training keeps running)."""
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

    def api(self, method: str, path: str, body: Any = None, timeout: float = 30) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw = r.read()
        return json.loads(raw) if raw else None

    def task(self, task_id: str) -> dict[str, Any]:
        return self.api("GET", f"/api/tasks/{task_id}")

    def log_tail(self) -> str:
        parts = []
        for path in (self.home / "studio.log", self.home.parent / "studio-stdout.log"):
            if path.exists():
                parts.append(path.read_text(errors="replace")[-3000:])
        return "\n".join(parts)
