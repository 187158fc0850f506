"""Time estimates: measuring them, keeping them, and saying how a finished run compared. One of the parts the
service is composed of (service.py); the measurement itself is training/calibration.py.

A measurement is a few real training steps in a process of its own. Its files, one set per model and settings
(`calibration.key`), in the calibration cache:

    KEY.json        the figures, or {"state": "failed", "message"}: written whole by the process
    KEY.running     {"pid", "started"} while the process runs (a marker whose process is gone is stale)
    KEY.spec.json   what it was asked: the config and the data home
    KEY.log         the trainer's lines, for whoever digs into a failure

One measurement runs at a time on the machine: two would slow each other and both be wrong.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from ftstudio.config import TrainingConfig
from ftstudio.errors import Conflict
from ftstudio.home import read_json, write_json_atomic
from ftstudio.resources import cuda_env, gpu_usage, want_of
from ftstudio.training import calibration

log = logging.getLogger("ftstudio")

ESTIMATE_FILE = "estimate.json"
"""The time estimate recorded at submit, in the task's folder, for the task view to hold the run against."""


class Estimates:
    def __init__(self, gpus: tuple[int, ...], cache: Path | None = None) -> None:
        self.gpus = gpus
        self.cache = cache or calibration.cache_dir()
        self._lock = threading.Lock()

    def where(self, cfg: TrainingConfig) -> tuple[str | None, dict[str, str]]:
        """The device the run would train on, by name (None: the CPU), and the environment that gives the
        measurement that device: the GPU with the most free memory, or none at all."""
        if want_of(cfg.to_dict()["resources"], len(self.gpus)).gpus <= 0:
            return None, cuda_env(())
        gpus = gpu_usage()
        if not gpus:
            return None, cuda_env(())
        best = max(gpus, key=lambda g: (g.get("memory_total") or 0) - (g.get("memory_used") or 0))
        return str(best.get("name") or f"GPU {best['index']}"), cuda_env((int(best["index"]),))

    def unsupported(self, cfg: TrainingConfig, executor: str) -> str | None:
        """Why this run cannot be timed here, or None."""
        if executor == "slurm":
            return "tasks run on the Slurm cluster, whose nodes this studio cannot time"
        if cfg.resources.processes > 1 or cfg.resources.nodes > 1:
            return "the estimate times one training process; this run has several"
        return None

    def key(self, cfg: TrainingConfig, files: list[Path | None]) -> str:
        device, _ = self.where(cfg)
        return calibration.key(cfg, files, device)

    def state(self, key: str) -> dict[str, Any]:
        """The measurement of `key`: done (with its figures and line), failed (with why), running, or none."""
        running = self._running(key)
        if running is not None:
            return {"state": "running", "key": key, "started": running.get("started")}
        found = read_json(self.cache / f"{key}.json")
        if not isinstance(found, dict) or found.get("state") not in ("done", "failed"):
            return {"state": "none", "key": key, "steps": calibration.WARMUP + calibration.MEASURED}
        if found["state"] == "done":
            found["line"] = calibration.line(found)
        return {**found, "key": key}

    def start(self, key: str, cfg: TrainingConfig, home: Path, busy: int, *, wait: bool = False) -> dict[str, Any]:
        """Measure `key` unless it is measured or being measured; `wait`: until it ends (the CLI). A failed
        measurement is tried again."""
        with self._lock:
            now = self.state(key)
            if now["state"] in ("done", "running"):
                if not wait or now["state"] == "done":
                    return now
            else:
                other = self._any_running()
                if other is not None:
                    raise Conflict(
                        "another time estimate is being measured on this machine; two at once would slow each "
                        "other and both be wrong: wait for it (a minute or so) and ask again"
                    )
                thread = self._launch(key, cfg, home, busy)
                if not wait:
                    return {"state": "running", "key": key, "started": time.time()}
        if now["state"] == "running":
            while self._running(key) is not None:
                time.sleep(0.5)
        else:
            thread.join()
        return self.state(key)

    def _launch(self, key: str, cfg: TrainingConfig, home: Path, busy: int) -> threading.Thread:
        self.cache.mkdir(parents=True, exist_ok=True, mode=0o700)
        spec = self.cache / f"{key}.spec.json"
        write_json_atomic(spec, {"config": cfg.to_dict(), "home": str(home), "busy": busy})
        out = self.cache / f"{key}.json"
        out.unlink(missing_ok=True)
        _, env = self.where(cfg)
        started = threading.Event()

        def measure() -> None:
            # Started and waited for by this thread alone: the process dies with the thread that started it
            # (die_with_parent's PR_SET_PDEATHSIG follows the thread), and a request's worker thread can end first.
            try:
                with (self.cache / f"{key}.log").open("wb") as logfile:
                    # Not niced: the steps are timed as the real run would take them.
                    proc = subprocess.Popen(
                        [sys.executable, "-m", "ftstudio.training.calibration", str(spec), str(out)],
                        stdin=subprocess.DEVNULL,
                        stdout=logfile,
                        stderr=subprocess.STDOUT,
                        env={**os.environ, **env},
                        start_new_session=True,
                    )
                write_json_atomic(self.cache / f"{key}.running", {"pid": proc.pid, "started": time.time()})
            except OSError as e:
                write_json_atomic(out, {"state": "failed", "message": f"the time estimate could not start: {e}"})
                return
            finally:
                started.set()
            log.info("time estimate %s: timing %s on %s (pid %d)", key[:12], cfg.model.name, cfg.data.path, proc.pid)
            code = proc.wait()
            if code != 0 and not out.exists():  # killed: nothing said why
                write_json_atomic(
                    out, {"state": "failed", "message": f"the time estimate's steps stopped (exit {code})"}
                )
            (self.cache / f"{key}.running").unlink(missing_ok=True)
            self._prune()

        thread = threading.Thread(target=measure, name=f"estimate-{key[:8]}", daemon=True)
        thread.start()
        started.wait()
        return thread

    def _running(self, key: str) -> dict[str, Any] | None:
        marker = read_json(self.cache / f"{key}.running")
        if not isinstance(marker, dict):
            return None
        try:
            proc = psutil.Process(int(marker.get("pid", 0)))
            if proc.is_running() and "ftstudio.training.calibration" in " ".join(proc.cmdline()):
                return marker
        except (psutil.Error, ValueError):
            pass
        return None  # its process is gone (a studio that stopped took it along)

    def _any_running(self) -> str | None:
        if not self.cache.is_dir():
            return None
        for marker in self.cache.glob("*.running"):
            key = marker.name.removesuffix(".running")
            if self._running(key) is not None:
                return key
        return None

    def _prune(self) -> None:
        """Keep the newest measurements; drop the rest with their files."""
        with contextlib.suppress(OSError):
            done = sorted(
                (p for p in self.cache.glob("*.json") if not p.name.endswith(".spec.json")),
                key=lambda p: p.stat().st_mtime,
            )
            for old in done[: -calibration.CACHE_KEEP]:
                stem = old.name.removesuffix(".json")
                for suffix in (".json", ".spec.json", ".log"):
                    (self.cache / f"{stem}{suffix}").unlink(missing_ok=True)


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
