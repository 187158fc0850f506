"""The real studio server as a subprocess for the browser tests, and the
processes it starts for training (tagged with FTSTUDIO_TASK_ID by the runner)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import psutil
from support import Studio, home_env

from ftstudio.web.signing import login_code

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


class LiveStudio(Studio):
    """The core tests' studio subprocess, plus `api()`: one JSON call, raising on an HTTP error."""

    def __init__(self, home: Path, port: int) -> None:
        # A cache of its own: the inspector's reports and the time estimates kept by earlier runs are not this test's.
        super().__init__(home, home_env(home, XDG_CACHE_HOME=str(home.parent / "cache")), port)

    def page_url(self, fragment: str = "") -> str:
        """The login URL, as `ftstudio studio url` prints it (a code for this run of the studio), landing on
        `fragment`."""
        epoch = json.loads((self.home / "studio.json").read_text())["epoch"]
        return f"{self.url}/?login={login_code(self.token, epoch)}{fragment}"

    def api(self, method: str, path: str, body: Any = None, timeout: float = 30) -> Any:
        r = self.http.request(method, path, json=body, timeout=timeout)
        r.raise_for_status()
        return r.json() if r.content else None
