"""A memory limit per task (`resources.memory`, `--memory 8G`): chosen, set up, watched, recorded.

Three ways to hold a task to its limit, tried in this order (`choose`):

  cgroup    a cgroup v2 child made for the trainer, with memory.max (memory.swap.max = 0, so the
            limit is not just pushed into swap; memory.oom.group = 1, so torchrun's workers die
            together). The kernel enforces it; its OOM kill is counted in memory.events.
  systemd   `systemd-run [--user] --scope -p MemoryMax=...` wraps the trainer: the same kernel
            limit, in a scope systemd makes, for machines where ftstudio may not make cgroups.
  watchdog  the runner sums the resident memory (RSS) of every process tagged with the task
            every 0.5 s and SIGKILLs them all past the limit. Works anywhere, but it sees RSS
            only (shared pages count once per process) and a task can overshoot by what it
            allocates in half a second.

FTSTUDIO_MEMORY_MECHANISM=cgroup|systemd|watchdog asks for one (the tests use it to try each
for real); where it cannot work here the usual order is used and the runner's log says why.

Never RLIMIT_AS: CUDA reserves far more address space than it ever touches, so an
address-space limit breaks GPU training rather than bounding memory.

The runner stays outside the limit, so it survives the kill and writes the exit record.
"""

from __future__ import annotations

import enum
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import psutil

from ftstudio.execution.procs import tagged
from ftstudio.resources import gib, parse_memory

MECHANISM_ENV = "FTSTUDIO_MEMORY_MECHANISM"
WATCH_INTERVAL_S = 0.5
CGROUP_GONE_S = 5.0  # how long leftover processes get to die before the cgroup is left in place
PROBE_TIMEOUT_S = 15.0
NO_MEMORY_CONTROLLER = "the memory controller is not available in cgroup v2 here (a cgroup v1 hierarchy may hold it)"


class Mechanism(enum.StrEnum):
    """What enforces a task's memory limit; recorded in launch.json and exit.json."""

    CGROUP = "cgroup"
    """A cgroup v2 made by the runner, memory.max: the kernel kills the task at the limit."""
    SYSTEMD = "systemd"
    """A systemd scope with MemoryMax: the same kernel limit, in a cgroup systemd makes."""
    WATCHDOG = "watchdog"
    """The runner sums the task's resident memory every 0.5 s and kills the task past the limit."""


ORDER = (Mechanism.CGROUP, Mechanism.SYSTEMD, Mechanism.WATCHDOG)


def exceeded_reason(limit: int) -> str:
    return (
        f"memory limit of {gib(limit)} exceeded; raise --memory, or lower optim.batch_size or data.max_length, "
        "or turn on optim.auto_batch"
    )


def limit_of(spec: dict[str, Any]) -> int | None:
    """The task's memory limit in bytes from spec.json, or None for none."""
    resources = (spec.get("config") or {}).get("resources") or {}
    return parse_memory(str(resources.get("memory") or ""))


# --- the choice ---------------------------------------------------------------------------------


def choose(attempt: Callable[[Mechanism], Limit | str], override: str | None = None) -> tuple[Limit, list[str]]:
    """The first mechanism that works here: the override (when set and it works), then cgroup, systemd,
    watchdog. `attempt(m)` sets m up and returns the limit, or a one-line reason it cannot work here.
    Returns the limit and the reasons the mechanisms before it were passed over."""
    order = list(ORDER)
    passed: list[str] = []
    if override:
        try:
            wanted = Mechanism(override.strip().lower())
            order.remove(wanted)
            order.insert(0, wanted)
        except ValueError:
            passed.append(f"{MECHANISM_ENV}={override} is not one of cgroup, systemd, watchdog; ignored")
    for mechanism in order:
        got = attempt(mechanism)
        if isinstance(got, Limit):
            return got, passed
        passed.append(f"{mechanism}: {got}")
    raise AssertionError("the watchdog works everywhere")  # pragma: no cover


def start(spec: dict[str, Any], task_id: str, log: Callable[[str], None], attempt: int | None = None) -> Limit:
    """Set up the task's memory limit before its trainer starts, and say in the log what enforces it. `attempt`:
    the watchdog counts (and kills) that attempt's processes only, never a newer attempt's (fence.py)."""
    size = limit_of(spec)
    if size is None:
        return Limit()

    def make(mechanism: Mechanism) -> Limit | str:
        if mechanism is Mechanism.CGROUP:
            return CgroupLimit.make(task_id, size)
        if mechanism is Mechanism.SYSTEMD:
            return SystemdLimit.make(task_id, size)
        return WatchdogLimit(task_id, size, log, attempt)

    limit, passed = choose(make, os.environ.get(MECHANISM_ENV))
    note = f"; not used: {'; '.join(passed)}" if passed else ""
    log(f"memory limit {gib(size)}, enforced by {limit.describe()}{note}")
    return limit


# --- the limits ---------------------------------------------------------------------------------


class Limit:
    """No limit: the trainer runs as it is. The base of the three mechanisms, in the order the runner calls them."""

    size: int | None = None
    mechanism: Mechanism | None = None
    peak = 0  # the most the task was seen to use, where the mechanism can tell (exit.json only)

    def describe(self) -> str:
        return "nothing"

    def command(self, argv: list[str]) -> list[str]:
        """The trainer's command line, wrapped where the mechanism needs it."""
        return argv

    def in_child(self) -> None:
        """Runs in the trainer's process between fork and exec."""

    def started(self, pid: int) -> None:
        """The trainer runs as `pid`."""

    def finish(self) -> bool:
        """The trainer has ended: tidy up; True when the task was stopped for passing its limit."""
        return False

    def record(self) -> dict[str, Any] | None:
        """The `memory_limit` field of launch.json and exit.json."""
        if self.size is None or self.mechanism is None:
            return None
        peak = {"peak_bytes": self.peak} if self.peak else {}
        return {"bytes": self.size, "mechanism": str(self.mechanism), **peak}


class WatchdogLimit(Limit):
    mechanism = Mechanism.WATCHDOG

    def __init__(self, task_id: str, size: int, log: Callable[[str], None], attempt: int | None = None) -> None:
        self.task_id = task_id
        self.attempt = attempt
        self.size = size
        self.log = log
        self.exceeded = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="memory-watchdog", daemon=True)

    def describe(self) -> str:
        return f"the runner's watchdog (resident memory of the task's processes, checked every {WATCH_INTERVAL_S:g} s)"

    def started(self, pid: int) -> None:
        self._thread.start()

    def _watch(self) -> None:
        me, limit = os.getpid(), self.size or 0
        while not self._stop.wait(WATCH_INTERVAL_S):
            procs = [p for p in tagged(self.task_id, self.attempt) if p.pid != me]
            total = sum_rss(procs)
            self.peak = max(self.peak, total)
            if total > limit:
                self.exceeded = True
                self.log(f"the task's processes use {gib(total)}, past its memory limit of {gib(limit)}; stopping it")
                for proc in procs:
                    try:
                        proc.kill()
                    except psutil.Error:
                        pass
                return

    def finish(self) -> bool:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        return self.exceeded


def sum_rss(procs: Iterable[Any]) -> int:
    """The resident memory of these processes together; one that is gone or hidden counts nothing."""
    total = 0
    for proc in procs:
        try:
            total += proc.memory_info().rss
        except (psutil.Error, OSError):
            continue
    return total


class CgroupLimit(Limit):
    """A cgroup v2 of the trainer's own: `<parent>/ftstudio-<task>`, next to (or under) the runner's cgroup."""

    mechanism = Mechanism.CGROUP

    def __init__(self, path: Path, size: int) -> None:
        self.path = path
        self.size = size

    @classmethod
    def make(cls, task_id: str, size: int) -> CgroupLimit | str:
        parent = cgroup_parent()
        if isinstance(parent, str):
            return parent
        path = parent / f"ftstudio-{task_id}"
        try:
            if path.exists():  # left by a runner that was killed; the task lock says no other uses it
                _empty_and_remove(path)
            path.mkdir()
        except OSError as e:
            return f"cannot make a cgroup in {parent} ({e.strerror})"
        limit = cls(path, size)
        try:
            (path / "memory.max").write_text(f"{size}\n")
            if (path / "memory.swap.max").exists():
                (path / "memory.swap.max").write_text("0\n")
            if (path / "memory.oom.group").exists():
                (path / "memory.oom.group").write_text("1\n")
            # Moving a process in needs write access to this cgroup and to the common ancestor:
            # try it with a throwaway process rather than find out with the trainer.
            subprocess.run(
                [sys.executable, "-I", "-S", "-c", ""],
                preexec_fn=limit.in_child,
                check=True,
                timeout=PROBE_TIMEOUT_S,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
            )
        except (OSError, subprocess.SubprocessError) as e:
            limit.finish()
            return f"cannot limit or join a cgroup in {parent} ({getattr(e, 'strerror', None) or e})"
        return limit

    def describe(self) -> str:
        return f"cgroup v2 (memory.max in {self.path})"

    def in_child(self) -> None:
        # "0" moves the writing process: the trainer is inside before its first allocation.
        with open(self.path / "cgroup.procs", "w") as f:
            f.write("0\n")

    def oom_kills(self) -> int:
        return _events(self.path / "memory.events").get("oom_kill", 0)

    def finish(self) -> bool:
        kills = self.oom_kills()
        try:  # memory.peak is newer (Linux 5.19) than the rest
            self.peak = int((self.path / "memory.peak").read_text())
        except (OSError, ValueError):
            pass
        _empty_and_remove(self.path)
        return kills > 0


def _events(path: Path) -> dict[str, int]:
    """A flat-keyed cgroup file (memory.events, cgroup.events) as numbers; {} when unreadable."""
    try:
        text = path.read_text()
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if value.strip().isdigit():
            out[key] = int(value)
    return out


def _empty_and_remove(path: Path) -> None:
    """End what is left in one of our cgroups (the task is over) and remove it; a cgroup that will not
    empty is left in place rather than waited on forever."""
    if not path.exists():
        return
    kill = path / "cgroup.kill"
    try:
        if kill.exists():
            kill.write_text("1\n")
        else:
            for pid in (path / "cgroup.procs").read_text().split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
    except OSError:
        pass
    deadline = time.monotonic() + CGROUP_GONE_S
    while time.monotonic() < deadline:
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:  # EBUSY until the killed processes are reaped
            time.sleep(0.05)


def cgroup2_root() -> tuple[Path, str] | str:
    """Where cgroup v2 is mounted and the cgroup path its mount shows as root; or why there is none."""
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return "this system has no /proc/self/mountinfo"
    for line in lines:
        fields, _, fs = line.partition(" - ")
        parts = fields.split()
        if fs.split()[:1] == ["cgroup2"] and len(parts) > 4:
            return Path(parts[4]), parts[3]
    return "no cgroup v2 hierarchy is mounted"


def own_cgroup() -> str | None:
    """This process's cgroup v2 path ("0::/a/b" in /proc/self/cgroup)."""
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            if line.startswith("0::"):
                return line[3:]
    except OSError:
        pass
    return None


def cgroup_parent(where: tuple[Path, str, str | None] | None = None) -> Path | str:
    """A cgroup v2 directory where a child with memory.max can be made for the trainer, or why not.

    The runner's own cgroup first, then its ancestors. A cgroup hands the memory controller to its
    children only when it holds no processes itself (the root excepted): on a systemd desktop the
    runner's scope holds the shell too, so the trainer's cgroup goes next to it, in the user's
    delegated slice; where the runner is in the hierarchy's root (a host or VM without systemd)
    it goes under the root. A container whose cgroup root holds its own processes allows neither.
    `where` (mount point, mount root, own cgroup) stands in for this process's, in tests."""
    if where is None:
        root = cgroup2_root()
        if isinstance(root, str):
            return root
        where = (*root, own_cgroup())
    mount, mount_root, own = where[0].resolve(), where[1], where[2]
    if own is None:
        return "this process is in no cgroup v2"
    rel = os.path.relpath(own, mount_root)
    if rel.startswith(".."):
        return f"this process's cgroup {own} is outside the mounted cgroup v2 at {mount}"
    here = (mount / rel).resolve()
    # The reason nearest the runner's own cgroup is the one a person can act on.
    whys: list[str] = []
    while True:
        controllers = _words(here / "cgroup.controllers")
        if "memory" in controllers:
            if "memory" in _words(here / "cgroup.subtree_control"):
                if os.access(here, os.W_OK):
                    return here
                whys.append(f"{here} is not writable")
            else:
                try:  # refused (EBUSY) while this cgroup holds processes and is not the root
                    (here / "cgroup.subtree_control").write_text("+memory\n")
                    return here
                except OSError as e:
                    whys.append(f"cannot enable the memory controller in {here} ({e.strerror})")
        if here == mount or not here.is_relative_to(mount):
            return whys[0] if whys else NO_MEMORY_CONTROLLER
        here = here.parent


def _words(path: Path) -> set[str]:
    try:
        return set(path.read_text().split())
    except OSError:
        return set()


class SystemdLimit(Limit):
    """A transient scope `ftstudio-<task>.scope` with MemoryMax, made by systemd-run around the trainer."""

    mechanism = Mechanism.SYSTEMD

    def __init__(self, prefix: list[str], task_id: str, size: int) -> None:
        self.prefix = prefix  # systemd-run, with --user unless root
        self.user = "--user" in prefix
        self.unit = f"ftstudio-{task_id}.scope"
        self.size = size
        self.oom_seen = 0
        self._cgroup: Path | None = None

    @classmethod
    def make(cls, task_id: str, size: int) -> SystemdLimit | str:
        exe = shutil.which("systemd-run")
        if exe is None:
            return "systemd-run is not installed"
        if os.geteuid() == 0:
            if not Path("/run/systemd/system").is_dir():
                return "systemd is not running here"
            prefix = [exe]
        else:
            runtime = os.environ.get("XDG_RUNTIME_DIR")
            if not runtime or not (Path(runtime) / "systemd").is_dir():
                return "no systemd user manager is running for this user"
            prefix = [exe, "--user"]
        limit = cls(prefix, task_id, size)
        limit._reset()
        try:  # the same properties on a throwaway command: an old systemd or an undelegated memory controller fails here
            probe = subprocess.run(
                [*prefix, "--scope", "--quiet", *limit._properties(), "--", "true"],
                capture_output=True,
                text=True,
                timeout=PROBE_TIMEOUT_S,
                stdin=subprocess.DEVNULL,
            )
        except (OSError, subprocess.SubprocessError) as e:
            return f"systemd-run failed ({e})"
        if probe.returncode != 0:
            lines = (probe.stderr or "").strip().splitlines()
            return f"systemd-run failed ({lines[-1] if lines else f'exit code {probe.returncode}'})"
        return limit

    def _properties(self) -> list[str]:
        return ["-p", f"MemoryMax={self.size}", "-p", "MemorySwapMax=0"]

    def _systemctl(self, *args: str) -> subprocess.CompletedProcess[str] | None:
        exe = shutil.which("systemctl")
        if exe is None:
            return None
        try:
            return subprocess.run(
                [exe, *(["--user"] if self.user else []), *args],
                capture_output=True,
                text=True,
                timeout=PROBE_TIMEOUT_S,
                stdin=subprocess.DEVNULL,
            )
        except (OSError, subprocess.SubprocessError):
            return None

    def _reset(self) -> None:
        # A scope that failed (an earlier attempt's OOM kill) stays loaded and would block the name.
        self._systemctl("reset-failed", self.unit)

    def describe(self) -> str:
        return f"systemd (systemd-run{' --user' if self.user else ''} --scope, MemoryMax)"

    def command(self, argv: list[str]) -> list[str]:
        return [*self.prefix, "--scope", "--quiet", f"--unit={self.unit}", *self._properties(), "--", *argv]

    def started(self, pid: int) -> None:
        # The scope's cgroup disappears with its last process, so its OOM count is read while it lives.
        threading.Thread(target=self._watch, args=(pid,), name="memory-scope", daemon=True).start()

    def _watch(self, pid: int) -> None:
        mount = cgroup2_root()
        while psutil.pid_exists(pid) and not isinstance(mount, str):
            try:
                line = next(x for x in Path(f"/proc/{pid}/cgroup").read_text().splitlines() if x.startswith("0::"))
            except (OSError, StopIteration):
                return
            if line.endswith("/" + self.unit):
                rel = os.path.relpath(line[3:], mount[1])
                self.oom_seen = max(self.oom_seen, _events(mount[0] / rel / "memory.events").get("oom_kill", 0))
            time.sleep(WATCH_INTERVAL_S / 5)

    def finish(self) -> bool:
        shown = self._systemctl("show", "--property=Result", "--value", self.unit)
        result = shown.stdout.strip() if shown is not None else ""
        self._reset()
        return result == "oom-kill" or self.oom_seen > 0
