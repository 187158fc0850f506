"""Shared pieces of the core benchmarks: a real studio server in a subprocess, the
environment it runs in, process clean-up, statistics and the result record.

Every benchmark runs real processes (`python -m ftstudio studio serve`, runners,
trainers) under a throw-away FTSTUDIO_HOME, and cleans up every process it
started before it returns, whatever happened.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import secrets
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
PY = sys.executable


def load_average() -> str:
    """The 1/5/15-minute load average, printed beside every figure: the machine is shared."""
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} / {five:.2f} / {fifteen:.2f}"


def now_utc() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


def command_line() -> str:
    """The exact command that produced the figures, runnable from any shell."""
    script = Path(sys.argv[0]).resolve()
    with contextlib.suppress(ValueError):
        script = script.relative_to(ROOT)
    args, rest = [], sys.argv[1:]
    while rest:  # --json-out is run_all's plumbing (a temporary file), not part of the measurement
        arg = rest.pop(0)
        if arg == "--json-out":
            rest = rest[1:]
        elif not arg.startswith("--json-out="):
            args.append(arg)
    return f"cd {ROOT} && PYTHONPATH=$PWD {PY} {shlex.join([str(script), *args])}"


def percentile(values: Iterable[float], p: float) -> float:
    """Nearest-rank percentile (no interpolation: with few samples it reports a value that happened)."""
    data = sorted(values)
    if not data:
        return float("nan")
    rank = max(1, min(len(data), round(p / 100.0 * len(data) + 0.5)))
    return data[rank - 1]


def median(values: Iterable[float]) -> float:
    return statistics.median(list(values))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench_env(home: Path, *, product: Path = ROOT, trainer_module: str | None = None, **extra: str) -> dict[str, str]:
    """The environment of everything a benchmark starts: its own home, no network, the ftstudio of
    `product` (this checkout unless --product names another, for before/after comparisons), bench/
    importable (for the event-emitting stand-in), and none of the caller's FTSTUDIO_* settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FTSTUDIO_")}
    env["FTSTUDIO_HOME"] = str(home)
    env["PYTHONPATH"] = os.pathsep.join([str(product.resolve()), str(BENCH)])
    env["HF_HUB_OFFLINE"] = "1"
    if trainer_module:
        env["FTSTUDIO_TRAINER_MODULE"] = trainer_module
    env.update(extra)
    return env


def wait_for(pred: Callable[[], Any], timeout: float, interval: float = 0.1, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


def stop_process(proc: subprocess.Popen[bytes] | psutil.Process, timeout: float = 10.0) -> None:
    """terminate -> wait -> kill -> wait, for one process this benchmark started."""
    try:
        proc.terminate()
        proc.wait(timeout=timeout)
    except (subprocess.TimeoutExpired, psutil.TimeoutExpired):
        with contextlib.suppress(ProcessLookupError, psutil.Error):
            proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired, psutil.Error):
            proc.wait(timeout=timeout)
    except (ProcessLookupError, psutil.NoSuchProcess):
        pass


def processes_of(home: Path) -> list[psutil.Process]:
    """Every live process started for this (temporary) home: studio servers, runners and
    trainers (tagged with FTSTUDIO_TASK_ID of one of its tasks). Nothing else matches."""
    tasks = home / "tasks"
    found = []
    for proc in psutil.process_iter():
        if proc.pid == os.getpid():
            continue
        try:
            env = proc.environ()
        except (psutil.Error, OSError):
            continue
        task_id = env.get("FTSTUDIO_TASK_ID")
        if env.get("FTSTUDIO_HOME") == str(home) or (task_id and (tasks / task_id).is_dir()):
            found.append(proc)
    return found


def sweep(home: Path) -> int:
    """Stop every process of this home: terminate, wait, then kill what is left."""
    procs = processes_of(home)
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    _, alive = psutil.wait_procs(procs, timeout=10)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(alive, timeout=10)
    return len(procs)


def tear_down(studio: Studio, home: Path, keep: bool) -> None:
    """After a benchmark: stop its studio and every process of its home; remove the home unless kept."""
    studio.close()
    sweep(home)
    if not keep:
        shutil.rmtree(home, ignore_errors=True)


def bench_token(home: Path) -> str:
    """The home's API token, made here if the studio has not made it yet (older products ignore it)."""
    path = home / "token"
    if not path.exists():
        home.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32) + "\n")
    return path.read_text().strip()


class Studio:
    """A real studio server (`python -m ftstudio studio serve`) in a subprocess."""

    def __init__(
        self,
        home: Path,
        env: dict[str, str],
        port: int | None = None,
        *,
        max_running: int = 0,
        slots: int = 0,
        flags: tuple[str, ...] = (),
    ) -> None:
        self.home = home
        self.flags = flags  # more flags of `studio serve` (e.g. --executor slurm --partition debug)
        self.max_running = max_running  # 0: the product's default
        self.slots = slots  # 0: the product's default (1 since the queue; before it, no limit)
        self.env = env
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.auth = {"Authorization": f"Bearer {bench_token(home)}"}
        self.http = httpx.Client(base_url=self.url, timeout=60, headers=self.auth)

    def spawn(self) -> subprocess.Popen[bytes]:
        out = open(self.home / "studio-stdout.log", "ab")  # noqa: SIM115  (the child keeps its own copy)
        try:
            self.proc = subprocess.Popen(
                [PY, "-m", "ftstudio", "studio", "serve", "--port", str(self.port), *self._limits(), *self.flags],
                env=self.env,
                cwd=self.home,  # `-m` puts the cwd first on sys.path: it must not shadow --product
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        finally:
            out.close()
        return self.proc

    def _limits(self) -> list[str]:
        """--max-pending (--max-running before the queue) and --slots for a benchmark that runs more tasks at once
        than the product allows by default; a product from before a flag has no such limit and gets no flag."""
        product = Path(self.env.get("PYTHONPATH", str(ROOT)).split(os.pathsep)[0])
        # The CLI's source: one module in older products, a folder of them since the parts were split out.
        sources = [product / "ftstudio" / "cli.py", *sorted((product / "ftstudio" / "cli").glob("*.py"))]
        text = "".join(path.read_text() for path in sources if path.exists())
        out = []
        if self.max_running and "--max-pending" in text:
            out += ["--max-pending", str(self.max_running)]
        elif self.max_running and "--max-running" in text:
            out += ["--max-running", str(self.max_running)]
        if self.slots and "--slots" in text:
            out += ["--slots", str(self.slots)]
        return out

    def answers(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"the studio exited with {self.proc.returncode}; see {self.home / 'studio.log'}")
        try:
            return self.http.get("/api/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def start(self, timeout: float = 90.0) -> Studio:
        self.spawn()
        wait_for(self.answers, timeout=timeout, interval=0.05, what="the studio to answer")
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            stop_process(self.proc)
        self.proc = None

    def close(self) -> None:
        self.stop()
        self.http.close()

    def task(self, task_id: str) -> dict[str, Any]:
        r = self.http.get(f"/api/tasks/{task_id}")
        r.raise_for_status()
        return r.json()


ENDED = ("completed", "failed", "cancelled")


def wait_completed(studio: Studio, tid: str, timeout: float, label: str = "task") -> dict[str, Any]:
    """Wait for the task to end (polling GET /api/tasks/{tid}); its record if it completed, else RuntimeError.
    `label` names it in the messages (e.g. "slurm task")."""
    task = wait_for(
        lambda: (t := studio.http.get(f"/api/tasks/{tid}").json())["status"] in ENDED and t,
        timeout=timeout,
        what=f"{label} {tid} to end",
    )
    if task["status"] != "completed":
        raise RuntimeError(f"{label} {tid} ended {task['status']}: {task['error']}")
    return task


def trainer_seconds(home: Path, tid: str) -> float:
    """The trainer's wall time as the runner recorded it: launch.json `started_at` -> exit.json `finished_at`."""
    tdir = home / "tasks" / tid
    started = json.loads((tdir / "launch.json").read_text())["started_at"]
    return json.loads((tdir / "exit.json").read_text())["finished_at"] - started


@dataclass
class Figure:
    """One row of the results table in docs/benchmarks.md."""

    benchmark: str
    figure: str
    goal: str
    met: bool | None  # None: informational, no goal
    command: str = ""
    date: str = field(default_factory=now_utc)
    load: str = field(default_factory=load_average)
    details: dict[str, Any] = field(default_factory=dict)

    def row(self) -> str:
        met = "—" if self.met is None else ("yes" if self.met else "**no**")
        return (
            f"| {self.benchmark} | {self.figure} | {self.goal} | {met} | `{self.command}` | {self.date} | {self.load} |"
        )


TABLE_HEAD = (
    "| benchmark | figure | goal | met? | command | date | load average (1/5/15 min, 2 cores) |\n"
    "| --- | --- | --- | --- | --- | --- | --- |"
)


def report(figures: list[Figure], json_out: Path | None) -> None:
    """Print the figures (with the command that produced them) and optionally save them for run_all."""
    print()
    print(f"command: {command_line()}")
    print(f"load average now: {load_average()}")
    print(TABLE_HEAD)
    for f in figures:
        f.command = f.command or command_line()
        print(f.row())
    if json_out:
        json_out.write_text(json.dumps([asdict(f) for f in figures], indent=2) + "\n")


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json-out", type=Path, default=None, help="also write the figures here (run_all uses it)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary home for inspection")
    parser.add_argument(
        "--product",
        type=Path,
        default=ROOT,
        help="the ftstudio checkout whose studio, runner and trainer run (default: this one); e.g. "
        "`git archive COMMIT | tar -x -C DIR` for a before/after comparison on the same machine",
    )
