"""Time estimates: measuring them, keeping them, and saying how a finished run compared. One of the parts the
service is composed of (service.py); the measurement itself is training/calibration.py.

A measurement is a few real training steps in a process of its own. Its files, one set per model and settings
(`calibration.key`), in the calibration cache:

    KEY.json          the raw figures (calibration.measurement), or {"state": "failed", "message"}: written
                      whole by the process; what they mean for a run is worked out for the settings that ask
    KEY.running       {"pid", "started"} while the process runs (a marker whose process is gone is stale)
    KEY.spec.json     what it was asked: the config and the data home
    KEY.log           the trainer's lines, for whoever digs into a failure
    KEY.work-PID/     the process's scratch folder, removed when it ends (or, if it was killed, later)
    measuring.lock    held (flock) by the studio or CLI that started a measurement, from before its process
                      starts until that process has ended

One measurement runs at a time on the machine, across the studio and every CLI: two would slow each other and
both be wrong. The starter holds the lock, not the measuring process: a process of the trainer's may fork
helpers that outlive it, and a lock handed down would stay held by them. A starter that dies lets it go (the
kernel does), and its measuring process dies with it (die_with_parent).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from ftstudio.config import WHOLE_MODEL, TrainingConfig
from ftstudio.errors import Conflict
from ftstudio.home import read_json, write_json_atomic
from ftstudio.resources import cuda_env, gpu_usage, parse_gpu_ids, want_of
from ftstudio.training import calibration

log = logging.getLogger("ftstudio")

ESTIMATE_FILE = "estimate.json"
"""The time estimate recorded at submit, in the task's folder, for the task view to hold the run against."""
LIMIT_S = 3600
"""A measurement that takes longer is stopped: it holds the machine's one measuring turn, and a model that needs
an hour for 10 steps here is better timed by its first real steps."""
LOCK = "measuring.lock"


class Estimates:
    def __init__(self, gpus: tuple[int, ...], cache: Path | None = None) -> None:
        self.gpus = gpus
        self.cache = cache or calibration.cache_dir()

    def where(self, cfg: TrainingConfig) -> tuple[str | None, dict[str, str]]:
        """The device the run would train on, by name (None: the CPU), and the environment that gives the
        measurement that device: the GPU the run names (resources.gpu_ids), else the one with the most free memory."""
        if want_of(cfg.to_dict()["resources"], len(self.gpus)).gpus <= 0:
            return None, cuda_env(())
        gpus = gpu_usage()
        named: tuple[int, ...] = ()
        with contextlib.suppress(ValueError):  # the submit check says what is wrong with it
            named = parse_gpu_ids(cfg.resources.gpu_ids) if cfg.resources.gpu_ids.strip() else ()
        if named:
            gpus = [g for g in gpus if g["index"] in named] or gpus
        if not gpus:
            return None, cuda_env(())
        best = max(gpus, key=lambda g: (g.get("memory_total") or 0) - (g.get("memory_used") or 0))
        return str(best.get("name") or f"GPU {best['index']}"), cuda_env((int(best["index"]),))

    @staticmethod
    def unsupported(cfg: TrainingConfig, executor: str) -> str | None:
        """Why this run cannot be timed here, or None."""
        if executor == "slurm":
            return "tasks run on the Slurm cluster, whose nodes this studio cannot time"
        if cfg.resources.processes > 1 or cfg.resources.nodes > 1:
            return "the estimate times one training process; this run has several"
        if cfg.method in ("dpo", "kto") and cfg.adapter in WHOLE_MODEL:
            return (
                f"a {cfg.adapter} {cfg.method} run scores its reference over all the data first, more than a few steps"
            )
        return None

    def state(self, key: str, cfg: TrainingConfig | None = None) -> dict[str, Any]:
        """The measurement of `key` for the settings `cfg` (None: those that asked for it): done (the estimate and
        its line), failed (with why), running, or none."""
        running = self._running(key)
        if running is not None:
            return {"state": "running", "key": key, "started": running.get("started")}
        found = read_json(self.cache / f"{key}.json")
        if not isinstance(found, dict) or found.get("state") not in ("done", "failed"):
            return {"state": "none", "key": key, "steps": calibration.WARMUP + calibration.MEASURED}
        if found["state"] == "failed":
            return {"state": "failed", "message": str(found.get("message")), "key": key}
        if cfg is None:
            asked = read_json(self.cache / f"{key}.spec.json")
            if not isinstance(asked, dict) or not isinstance(asked.get("config"), dict):
                return {"state": "none", "key": key, "steps": calibration.WARMUP + calibration.MEASURED}
            cfg = TrainingConfig.from_dict(asked["config"])
        try:
            shown = calibration.figures(found, cfg)
        except (KeyError, TypeError, ValueError):  # a file of an older ftstudio, or damaged: measure again
            return {"state": "none", "key": key, "steps": calibration.WARMUP + calibration.MEASURED}
        return {**shown, "line": calibration.line(shown), "key": key}

    def start(
        self,
        key: str,
        cfg: TrainingConfig,
        device: dict[str, str],
        home: Path,
        busy: int,
        *,
        wait: bool = False,
        again: bool = False,
    ) -> dict[str, Any]:
        """Measure `key` on `device` (the environment `where` gave) unless it is measured or being measured. A
        failed measurement is tried again; `again`: a kept one too (it was taken while the machine was busy, say).
        `wait`: until it is done or failed (the CLI), waiting its turn behind another measurement instead of being
        refused."""
        while True:
            now = self.state(key, cfg)
            if again and now["state"] == "done":
                now = {"state": "none", "key": key}
            if now["state"] == "done" or (now["state"] == "running" and not wait):
                return now
            if now["state"] != "running":
                try:
                    thread = self._launch(key, cfg, device, home, busy)
                except Conflict:
                    if not wait:
                        raise
                else:
                    if not wait:
                        return {"state": "running", "key": key, "started": time.time()}
                    thread.join()
                    return self.state(key, cfg)
            time.sleep(1.0)  # its own measurement by another, or another's turn: wait, then look again

    def _launch(self, key: str, cfg: TrainingConfig, device: dict[str, str], home: Path, busy: int) -> threading.Thread:
        self.cache.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._prune()
        lock = os.open(self.cache / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock)
            raise Conflict(
                "another time estimate is being measured on this machine; two at once would slow each other and "
                "both be wrong: wait for it (a minute or so for a small model) and ask again"
            ) from None
        spec = self.cache / f"{key}.spec.json"
        out = self.cache / f"{key}.json"
        logfile = self.cache / f"{key}.log"
        started = threading.Event()

        def run() -> None:
            # Started and waited for by this thread alone: the process dies with the thread that started it
            # (die_with_parent's PR_SET_PDEATHSIG follows the thread), and a request's worker thread can end first.
            try:
                write_json_atomic(spec, {"config": cfg.to_dict(), "home": str(home), "busy": busy})
                out.unlink(missing_ok=True)
                with logfile.open("wb") as output:
                    # Not niced: the steps are timed as the real run would take them.
                    proc = subprocess.Popen(
                        [sys.executable, "-m", "ftstudio.training.calibration", str(spec), str(out)],
                        stdin=subprocess.DEVNULL,
                        stdout=output,
                        stderr=subprocess.STDOUT,
                        env={**os.environ, **device},
                        start_new_session=True,
                    )
                write_json_atomic(self.cache / f"{key}.running", {"pid": proc.pid, "started": time.time()})
            except OSError as e:
                write_json_atomic(out, {"state": "failed", "message": f"the time estimate could not start: {e}"})
                return
            finally:
                started.set()
            log.info("time estimate %s: timing %s (pid %d)", key[:12], cfg.model.name, proc.pid)
            try:
                code = proc.wait(timeout=LIMIT_S)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(OSError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                write_json_atomic(out, {"state": "failed", "message": (
                    f"the time estimate's steps took over {LIMIT_S // 60} minutes and were stopped: this model is "
                    f"slow to train here; start the run and read its first steps' pace (log: {logfile})"
                )})  # fmt: skip
                code = 0
            if code != 0 and not out.exists():  # ended without a word: killed
                write_json_atomic(out, {"state": "failed", "message": stopped_by(code, logfile)})

        def measure() -> None:
            try:
                run()
            finally:
                # The measurement is over, however it went: the lock first, then the marker, so whoever sees it
                # over finds the machine free for the next.
                os.close(lock)
                (self.cache / f"{key}.running").unlink(missing_ok=True)
                started.set()

        thread = threading.Thread(target=measure, name=f"estimate-{key[:8]}", daemon=True)
        thread.start()
        started.wait()
        return thread

    def _running(self, key: str) -> dict[str, Any] | None:
        marker = read_json(self.cache / f"{key}.running")
        if not isinstance(marker, dict):
            return None
        return marker if alive(marker.get("pid"), key) else None

    def _prune(self) -> None:
        """Keep the newest measurements; drop the rest with their files, and what killed ones left behind."""
        with contextlib.suppress(OSError):
            for work in self.cache.glob("*.work-*"):
                pid = work.name.rsplit("-", 1)[-1]
                if not (pid.isdigit() and psutil.pid_exists(int(pid))):
                    shutil.rmtree(work, ignore_errors=True)
            for marker in self.cache.glob("*.running"):
                if self._running(marker.name.removesuffix(".running")) is None:
                    marker.unlink(missing_ok=True)
            done = sorted(
                (p for p in self.cache.glob("*.json") if not p.name.endswith(".spec.json")),
                key=lambda p: p.stat().st_mtime,
            )
            for old in done[: -calibration.CACHE_KEEP]:
                stem = old.name.removesuffix(".json")
                for suffix in (".json", ".spec.json", ".log"):
                    (self.cache / f"{stem}{suffix}").unlink(missing_ok=True)


def alive(pid: Any, key: str) -> bool:
    """Whether `pid` is the measuring process of `key` (a reused pid runs something else)."""
    try:
        proc = psutil.Process(int(pid))
        command = " ".join(proc.cmdline())
    except (psutil.Error, ValueError, TypeError):
        return False
    return proc.is_running() and "ftstudio.training.calibration" in command and key in command


def stopped_by(code: int, logfile: Path) -> str:
    """The one line for a measuring process that ended without writing why."""
    if code < 0:
        name = signal.Signals(-code).name if -code in signal.valid_signals() else f"signal {-code}"
        why = " (a SIGKILL: often the machine ran out of memory)" if -code == signal.SIGKILL else ""
        return f"the time estimate's steps were killed by {name}{why}; its log: {logfile}"
    return f"the time estimate's steps stopped (exit {code}); its log: {logfile}"


def recorded(task_dir: Path) -> dict[str, Any] | None:
    found = read_json(task_dir / ESTIMATE_FILE)
    return found if isinstance(found, dict) else None


def against_run(estimate: dict[str, Any], summary: dict[str, Any] | None) -> dict[str, Any]:
    """The estimate as the task view shows it, with the finished run's own figures and the error when there are."""
    shown = {k: estimate.get(k) for k in ("low_s", "epoch_s", "high_s", "steps_per_epoch", "step_s", "device")}
    shown["line"] = calibration.line(estimate) if estimate.get("epoch_s") else None
    step_s, per_epoch = (summary or {}).get("step_s"), (summary or {}).get("steps_per_epoch")
    if isinstance(step_s, (int, float)) and isinstance(per_epoch, int):
        real = calibration.compare(estimate, float(step_s), per_epoch)
        if real is not None:
            shown["measured"] = real
            shown["line_measured"] = (
                f"measured {calibration.words(real['epoch_s'])} per epoch; the estimate's middle was "
                f"{abs(real['error']) * 100:.0f}% {'high' if real['error'] > 0 else 'low'}"
                f"{'' if real['within_range'] else ', outside its range'}"
            )
    return shown
