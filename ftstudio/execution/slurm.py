"""The Slurm executor: a task's runner runs as a Slurm batch job, driven through Slurm's own
commands (`sbatch --parsable`, `squeue`, `scancel`), here or over ssh on a login node.

The job runs the same runner as a local task (`python -m ftstudio.runner DIR`), so
the task directory means what it means locally: `launch.json`, the heartbeat, `events.jsonl` and
`exit.json` are written by the runner on the compute node, and the studio reads them through the
shared filesystem. What Slurm adds is the job's state, which stands in for process identity: a
job that is PENDING, RUNNING, SUSPENDED or being requeued is alive; one that ended, or that Slurm
no longer knows, is dead, and then `exit.json` says how it ended (none: interrupted, resumed
from its checkpoint). A `squeue` that fails or times out means "cannot tell", never "dead".

Why the command line and not a library: submitit pickles callables and polls `sacct` (often off
on small clusters), pyslurm is tied to one Slurm version; the commands are the interface that is
stable across versions and that works over ssh unchanged.

No user string becomes part of the batch script or a command line without validation: the
script holds our own paths, quoted; every option is a checked value passed as its own argument.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ftstudio.errors import LaunchError, UserError
from ftstudio.execution.executor import Launch
from ftstudio.execution.facts import Liveness, SchedulerWord
from ftstudio.execution.procs import TASK_ENV
from ftstudio.footprint import Footprint, job_memory
from ftstudio.home import TaskDir, read_json
from ftstudio.resources import parse_memory

log = logging.getLogger("ftstudio.slurm")

JOB_PREFIX = "ftstudio-"
"""Job names are JOB_PREFIX + task id: `squeue --name` finds a task's job without the store."""
COMMAND_TIMEOUT_S = 30.0
"""The longest a Slurm command may take before the answer is "cannot tell" (slurmctld busy or down)."""
LOOK_S = 2.0
"""How long one `squeue` listing answers for: the supervisor asks about every task each look."""
RETRY_S = 10.0
"""After `squeue` failed (a controller that is down makes it take 9-18 s to fail), how long "cannot tell"
stands before it is asked again: the supervisor's look at local tasks must not wait on it every time."""

# States in which the job's runner is, or will be, running (squeue's %T, long form).
ALIVE_STATES = frozenset(
    {
        "PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "REQUEUE_FED",
        "REQUEUE_HOLD", "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED", "RESV_DEL_HOLD", "POWER_UP_NODE",
    }
)  # fmt: skip
# A job that ran and waits to run again: requeued by `scontrol requeue`, a preemption or a node failure.
REQUEUED_STATES = frozenset({"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED"})
# The rest (COMPLETED, CANCELLED, FAILED, TIMEOUT, NODE_FAIL, PREEMPTED, BOOT_FAIL, DEADLINE,
# OUT_OF_MEMORY, SPECIAL_EXIT, REVOKED) and a job Slurm no longer lists are ended.

# Values that reach sbatch: checked here, passed each as one argument (never through a shell locally).
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}")
TIME_RE = re.compile(r"(\d+-)?\d{1,3}(:\d{2}){0,2}|\d+-\d{1,2}|UNLIMITED|INFINITE")
HOST_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.@-]{0,127}")
SIGNAL_RE = re.compile(r"(B:)?(USR1|USR2|TERM|INT)@(\d{1,5})")
WARNING_SIGNALS = ("USR1", "TERM", "INT")
"""The signals the runner turns into a checkpoint and a clean end (USR2 would kill it)."""
TIME_LIMIT_PASS_S = 30
"""How often slurmctld looks for jobs past their time limit (its PERIODIC_TIMEOUT). It sends the warning at
the first look that finds fewer than the warning's seconds + this left: up to this much early."""
# Extra sbatch options a person may add (`studio start --sbatch-option`): where a job may run and what
# it is told, never what it runs, where its files go, or who it runs as. Each with a plain value.
SAFE_SBATCH = frozenset(
    {
        "--constraint", "--exclude", "--nodelist", "--reservation", "--gres", "--gpus", "--mem-per-cpu",
        "--mem-per-gpu", "--cpus-per-gpu", "--comment", "--mail-type", "--mail-user", "--licenses",
        "--clusters", "--wckey", "--nice", "--exclusive",
    }
)  # fmt: skip
OPTION_VALUE_RE = re.compile(r"[A-Za-z0-9_.,:@+\-\[\]|&!*%]{1,200}")


def slurm_seconds(value: str) -> int | None:
    """The seconds in a Slurm time as sbatch --time takes it: minutes, minutes:seconds, hours:minutes:seconds,
    days-hours, days-hours:minutes or days-hours:minutes:seconds. None: no limit (0, UNLIMITED, INFINITE) or
    not a time."""
    days, dash, rest = value.partition("-")
    if not dash:
        days, rest = "0", value
    parts = rest.split(":")
    if not days.isdigit() or not all(p.isdigit() for p in parts) or len(parts) > 3:
        return None
    numbers = [int(p) for p in parts]
    if dash:  # days-hours[:minutes[:seconds]]
        hours, minutes, seconds = [*numbers, 0, 0][:3]
    else:  # minutes, minutes:seconds or hours:minutes:seconds
        hours, minutes, seconds = numbers if len(numbers) == 3 else [0, *numbers, 0][:3]
    total = ((int(days) * 24 + hours) * 60 + minutes) * 60 + seconds
    return total or None


def duration_words(seconds: int) -> str:
    """1 minute, 1 hour 30 minutes, 2 days."""
    parts = []
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60), ("second", 1)):
        count, seconds = divmod(seconds, size)
        if count:
            parts.append(f"{count} {unit}{'' if count == 1 else 's'}")
    return " ".join(parts) or "0 seconds"


class SlurmError(UserError):
    """A Slurm command refused (its message says why) or the executor's settings are wrong."""


class LoginUnreachable(ConnectionError):
    """ssh could not get to the login node (exit 255: no route, no such host, key refused, host key
    unknown). An OSError: to a look it means "cannot tell", like a command that does not answer."""


# What the job takes from the studio's environment, written into its script. Run locally, sbatch hands
# the job the studio's whole environment anyway; over ssh the job starts from the login node's, where
# the code's path (PYTHONPATH), the studio's own settings and where models are cached would be missing.
# Never a token: the script is a file in the task directory.
CARRIED_ENV = frozenset({"PYTHONPATH", "TRANSFORMERS_OFFLINE"})
CARRIED_PREFIXES = ("FTSTUDIO_", "HF_")
NOT_CARRIED = frozenset({"FTSTUDIO_BOOT_ID", "FTSTUDIO_GPUS", "FTSTUDIO_ATTEMPT", TASK_ENV})
"""This machine's identity and GPUs are not the node's; the task and attempt are the script's to say."""


def carried_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The part of the studio's environment its Slurm jobs run with (CARRIED_ENV)."""
    return {
        key: value
        for key, value in environ.items()
        if (key in CARRIED_ENV or key.startswith(CARRIED_PREFIXES))
        and key not in NOT_CARRIED
        and not any(word in key for word in ("TOKEN", "SECRET", "PASSWORD", "KEY"))
    }


def output_path(path: Path) -> str:
    """A path as sbatch's --output takes it, so the log lands there: Slurm expands %j, %x, ... in it (%% is
    a %), and a path with a backslash is not expanded at all but loses each lone backslash (two make one)."""
    text = str(path)
    return text.replace("\\", "\\\\") if "\\" in text else text.replace("%", "%%")


def job_id_in(out: str) -> str:
    """The job id in `sbatch --parsable`'s answer ("id" or "id;cluster"), on its last line: a login
    shell may print something of its own first. SlurmError when there is none."""
    lines = out.strip().splitlines()
    job_id = lines[-1].strip().split(";")[0] if lines else ""
    if not job_id.isdigit():
        raise SlurmError(f"sbatch answered {out.strip()[-80:]!r}, not a job id")
    return job_id


@dataclass(frozen=True)
class SlurmSettings:
    """Where and how jobs are submitted: `studio start --executor slurm --partition P ...`, kept in the home."""

    partition: str
    account: str = ""
    qos: str = ""
    time: str = ""
    """Each job's time limit, as sbatch takes it (24:00:00, 2-00:00:00); empty: the partition's default."""
    host: str = ""
    """A login node to run the commands on over ssh (the user's own ssh config and keys); empty: here."""
    signal: str = "B:USR1@120"
    """What Slurm sends before a time limit or preemption, and when (sbatch --signal)."""
    extra: tuple[str, ...] = ()
    """More sbatch options, `--flag=value` (or a bare `--exclusive`), from SAFE_SBATCH only."""

    def problems(self) -> list[str]:
        out = []
        for flag, value, pattern, example in (
            ("--partition", self.partition, NAME_RE, "gpu"),
            ("--account", self.account, NAME_RE, "mylab"),
            ("--qos", self.qos, NAME_RE, "normal"),
            ("--time", self.time, TIME_RE, "24:00:00 or 2-00:00:00"),
            ("--slurm-host", self.host, HOST_RE, "login1 or me@login.cluster.edu"),
            ("--slurm-signal", self.signal, SIGNAL_RE, "B:USR1@120"),
        ):
            if flag == "--partition" and not value:
                out.append(
                    "--partition: required with --executor slurm (a partition name, e.g. gpu; `sinfo` lists them)"
                )
            elif value and not pattern.fullmatch(value):
                out.append(f"--{flag.lstrip('-')}: {value[:40]!r} is not valid; e.g. {example}")
        for option in self.extra:
            name, eq, value = option.partition("=")
            if name not in SAFE_SBATCH:
                allowed = ", ".join(sorted(SAFE_SBATCH))
                out.append(f"--sbatch-option: {name[:40]!r} is not one the studio passes on; it allows {allowed}")
            elif (eq or name != "--exclusive") and not OPTION_VALUE_RE.fullmatch(value):
                out.append(f"--sbatch-option: {option[:60]!r} needs a plain value, e.g. {name}=a100")
        return out

    def unworkable(self) -> list[str]:
        """Settings safe to pass on that could not work, which `studio start` refuses: a warning that misses the
        runner, one that kills it, or one that comes as soon as every job starts. (A home that kept such settings
        from before still uses them: `problems` is what a stored setting must pass.)"""
        found = SIGNAL_RE.fullmatch(self.signal)
        if found is None:
            return []
        batch, name, seconds = found.groups()
        if name not in WARNING_SIGNALS:
            return [
                f"--slurm-signal: {self.signal} would end the job's runner without a checkpoint; use B:USR1, B:TERM "
                f"or B:INT (e.g. B:USR1@{seconds})"
            ]
        if not batch:
            # The runner is the batch script (exec): a signal without B: goes to the job's steps only (none on one
            # node; the launchers of several, which would stop their ranks behind the runner's back).
            return [
                f"--slurm-signal: {self.signal} would miss the studio's runner: without B: Slurm signals only the "
                f"job's steps, and the runner is the job's batch script; use B:{self.signal}"
            ]
        limit = slurm_seconds(self.time) if self.time and TIME_RE.fullmatch(self.time) else None
        warn = int(seconds)
        if not limit or warn == 0 or warn + TIME_LIMIT_PASS_S < limit:
            return []
        most = limit - TIME_LIMIT_PASS_S - 1
        shorter = f"a warning under {most + 1}s (e.g. B:USR1@{most // 2})" if most >= 2 else "no warning (B:USR1@0)"
        return [
            f"--slurm-signal: {self.signal} would warn every job as soon as it starts (--time {self.time} gives "
            f"it {duration_words(limit)}, and Slurm sends the warning up to {TIME_LIMIT_PASS_S}s early), so every "
            f"attempt would stop at once; use {shorter} or a longer --time"
        ]

    def to_json(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.__dict__.items()}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SlurmSettings:
        known: dict[str, Any] = {k: str(v) for k, v in data.items() if k in cls.__dataclass_fields__ and k != "extra"}
        return cls(**known, extra=tuple(str(o) for o in data.get("extra") or ()))


class Commands:
    """Runs Slurm's commands here, or on `host` over ssh (BatchMode: a password prompt fails, never hangs)."""

    def __init__(self, host: str = "", timeout: float = COMMAND_TIMEOUT_S) -> None:
        self.host = host
        self.timeout = timeout

    def argv(self, args: Sequence[str]) -> list[str]:
        if not self.host:
            return list(args)
        # The remote side runs a shell: the command is quoted for it, each argument on its own.
        return ["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10", self.host, "--", shlex.join(args)]

    def run(self, *args: str) -> str:
        """stdout of the command; SlurmError with its own message when it refused; TimeoutError or
        OSError (LoginUnreachable: ssh could not get in) when it could not be asked, which callers
        read as "cannot tell"."""
        try:
            done = subprocess.run(
                self.argv(args), capture_output=True, text=True, timeout=self.timeout, stdin=subprocess.DEVNULL
            )
        except subprocess.TimeoutExpired as e:
            where = f" on {self.host}" if self.host else ""
            raise TimeoutError(f"{args[0]}{where} did not answer within {self.timeout:g}s") from e
        if done.returncode != 0:
            lines = (done.stderr or done.stdout or "").strip().splitlines()
            last = lines[-1].strip() if lines else f"exit code {done.returncode}"
            if self.host and done.returncode == 255:  # ssh's own failure; Slurm's commands exit 1 or 2
                raise LoginUnreachable(
                    f"cannot reach the login node {self.host} over ssh ({last.rstrip('.')}): "
                    f"check that `ssh {self.host} true` works from here without a password"
                )
            raise SlurmError(f"{args[0]} failed: {last}")
        return done.stdout


@dataclass
class JobState:
    job_id: str
    state: str
    """squeue's long state (RUNNING, PENDING, CANCELLED, ...)."""
    reason: str = ""
    """Why it waits or why it ended (squeue's %r): Resources, Priority, None, ..."""
    name: str = ""

    @property
    def alive(self) -> bool:
        return self.state in ALIVE_STATES


@dataclass
class _Listing:
    at: float = 0.0
    jobs: dict[str, JobState] = field(default_factory=dict)
    ok: bool = False
    failed_at: float | None = None
    """When the last `squeue` failed; None when it answered."""


def job_name(task_id: str) -> str:
    return JOB_PREFIX + task_id


def batch_script(task: TaskDir, attempt: int, module: str, env: Mapping[str, str]) -> str:
    """The job's script: it only starts the runner, which becomes the batch step's process (exec), so
    Slurm's signals (scancel, --signal before a time limit) reach the runner as they would locally."""
    lines = [
        "#!/bin/sh",
        f"# Written by ftstudio for task {task.path.name} (attempt {attempt} first): it starts the task's runner,",
        "# as the attempt the task dir's `attempt` file names when it starts (a requeued job runs the next one).",
        f"cd {shlex.quote(str(task.path))} || exit 1",
    ]
    for key, value in sorted({**env, TASK_ENV: task.path.name}.items()):
        if not re.fullmatch(r"[A-Z_][A-Z0-9_]*", key):
            raise LaunchError(f"environment variable name {key!r} is not valid")
        lines.append(f"export {key}={shlex.quote(value)}")
    argv = [sys.executable, "-m", "ftstudio.runner", str(task.path), "--attempt", "from-file"]
    if module != "ftstudio.train":
        argv += ["--module", module]
    lines.append(f"exec {shlex.join(argv)}")
    return "\n".join(lines) + "\n"


def job_footprint(config: Mapping[str, Any]) -> Footprint:
    """The memory a task's job asks for, and how that amount was reached."""
    resources = config.get("resources", {}) if isinstance(config, Mapping) else {}
    memory = str(resources.get("memory") or "")
    return job_memory(config if isinstance(config, Mapping) else {}, parse_memory(memory) if memory else None)


def sbatch_options(settings: SlurmSettings, config: Mapping[str, Any]) -> list[str]:
    """sbatch's options for one task: the studio's settings and the task's resources."""
    resources = config.get("resources", {}) if isinstance(config, Mapping) else {}
    processes = int(resources.get("processes") or 1)
    nodes = int(resources.get("nodes") or 1)
    gpus = int(resources.get("gpus") if resources.get("gpus") is not None else -1)
    # One task per node, holding the node's share: the runner on the first node, and under it (more than one
    # node) `srun` starts one launcher per node, whose torchrun starts `processes` ranks (ftstudio.node).
    opts = [
        f"--partition={settings.partition}",
        f"--nodes={nodes}",
        "--ntasks-per-node=1",
        f"--cpus-per-task={max(1, processes)}",
    ]
    if settings.account:
        opts.append(f"--account={settings.account}")
    if settings.qos:
        opts.append(f"--qos={settings.qos}")
    if settings.time:
        opts.append(f"--time={settings.time}")
    if gpus > 0:
        opts.append(f"--gpus-per-node={gpus}")
    # Slurm's --mem (per node, MiB): the task's --memory, or an estimate (footprint.py). Without one a job gets
    # the partition's default, on most clusters the whole node's memory, which no other job can then use.
    # Left to the person when they chose --mem-per-cpu or --mem-per-gpu (sbatch takes only one of the three).
    if not any(o.startswith(("--mem-per-cpu", "--mem-per-gpu")) for o in settings.extra):
        opts.append(f"--mem={job_footprint(config).sbatch_mem}")
    opts += list(settings.extra)
    # Slurm may requeue the job (scontrol requeue, a preemption, a node failure): the studio then runs
    # the task's next attempt in it (SlurmExecutor.submit adopts it), and the runner reads which one.
    opts += ["--requeue", f"--signal={settings.signal}"]
    return opts


class SlurmExecutor:
    """Starts runners as Slurm batch jobs; their state comes from `squeue`, their outcome from exit.json."""

    name = "slurm"
    cluster = "slurm"

    def __init__(
        self,
        settings: SlurmSettings,
        commands: Commands | None = None,
        trainer_module: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        problems = settings.problems()
        if problems:
            raise SlurmError("; ".join(problems))
        self.settings = settings
        self.commands = commands or Commands(settings.host)
        self.trainer_module = trainer_module or os.environ.get("FTSTUDIO_TRAINER_MODULE") or "ftstudio.train"
        self.on_exit: Callable[[], None] | None = None  # Slurm does not tell us; the supervisor looks
        self.clock = clock
        self._listing = _Listing()
        self._lock = threading.Lock()

    # -- what Slurm says -----------------------------------------------------

    def jobs(self, *, fresh: bool = False) -> dict[str, JobState] | None:
        """Every job of ours Slurm still lists, by id (one `squeue` per LOOK_S); None when it cannot tell.
        `--me`: the user Slurm sees, the remote one over ssh (Slurm 20.11+)."""
        with self._lock:
            if not fresh and self._listing.ok and self.clock() - self._listing.at < LOOK_S:
                return self._listing.jobs
            failed = self._listing.failed_at
            if not fresh and failed is not None and self.clock() - failed < RETRY_S:
                return None
            try:
                out = self.commands.run("squeue", "--noheader", "--states=all", "--me", "--format=%i|%T|%r|%j")
            except (SlurmError, TimeoutError, OSError) as e:
                log.warning(
                    "cannot ask Slurm about its jobs (%s); leaving every Slurm task as it is, asking again in %gs",
                    e,
                    RETRY_S,
                )
                self._listing = _Listing(failed_at=self.clock())
                return None
            jobs = {}
            for line in out.splitlines():
                parts = line.strip().split("|")
                if len(parts) >= 4 and parts[3].startswith(JOB_PREFIX):
                    jobs[parts[0]] = JobState(parts[0], parts[1], "" if parts[2] == "None" else parts[2], parts[3])
            self._listing = _Listing(self.clock(), jobs, True)
            return jobs

    def requeued(self, task_id: str) -> str | None:
        """The task's job, if Slurm holds it for another run (requeued, waiting to start again)."""
        jobs = self.jobs(fresh=True)
        name = job_name(task_id)
        for job in (jobs or {}).values():
            if job.name == name and job.state in REQUEUED_STATES:
                return job.job_id
        return None

    def state_fresh(self, job_id: str) -> JobState | None:
        """As `state`, from a new listing."""
        jobs = self.jobs(fresh=True)
        return None if jobs is None else jobs.get(job_id) or JobState(job_id, "GONE")

    def known(self, job_id: str) -> JobState | None:
        """The job's state in the last listing, without asking Slurm (for a request, which must not wait on
        `squeue`: the supervisor's looks keep the listing current); None when the last ask failed."""
        with self._lock:
            if not self._listing.ok:
                return None
            return self._listing.jobs.get(job_id) or JobState(job_id, "GONE")

    def state(self, job_id: str) -> JobState | None:
        """The job's state; JobState(state="GONE") when Slurm no longer lists it; None when it cannot tell."""
        jobs = self.jobs()
        if jobs is None:
            return None
        return jobs.get(job_id) or JobState(job_id, "GONE")

    # -- the Executor protocol ----------------------------------------------

    def submit(self, task: TaskDir, *, attempt: int, env: Mapping[str, str] | None = None) -> Launch:
        waiting = self.requeued(task.path.name)
        if waiting is not None:
            # Slurm requeued the task's job (the attempt before this one ended in it): this attempt runs in
            # it when Slurm starts it again, and its runner reads the attempt from the task dir.
            log.info("task %s: attempt %s runs in its requeued Slurm job %s", task.path.name, attempt, waiting)
            return Launch(pid=0, start_time=time.time(), boot_id="", pgid=0, job_id=waiting)
        spec = read_json(task.spec) or {}
        script = task.path / "slurm.sh"
        try:
            script.write_text(
                batch_script(task, attempt, self.trainer_module, {**carried_env(os.environ), **(env or {})})
            )
            script.chmod(0o700)
        except OSError as e:
            raise LaunchError(f"could not write the Slurm job script {script}: {e}") from e
        args = [
            "sbatch",
            "--parsable",
            f"--job-name={job_name(task.path.name)}",
            f"--chdir={task.path}",
            f"--output={output_path(task.log)}",
            "--open-mode=append",
            *sbatch_options(self.settings, spec.get("config", {})),
            str(script),
        ]
        try:
            out = self.commands.run(*args)
        except SlurmError as e:
            raise LaunchError(f"Slurm refused the job: {e}") from e
        except (TimeoutError, OSError) as e:
            raise LaunchError(f"could not reach Slurm to submit the job: {e}") from e
        try:
            job_id = job_id_in(out)
        except SlurmError as e:
            raise LaunchError(str(e)) from e
        ask = job_footprint(spec.get("config", {}))
        log.info(
            "task %s submitted to Slurm as job %s (attempt %s), asking --mem=%s: %s",
            task.path.name, job_id, attempt, ask.sbatch_mem, ask.basis,
        )  # fmt: skip
        with self._lock:
            self._listing.ok = False  # the next look must see the new job
        return Launch(pid=0, start_time=time.time(), boot_id="", pgid=0, job_id=job_id)

    def poll(self, task: TaskDir, launch: Launch | None) -> Liveness:
        if launch is None or not launch.job_id:
            return Liveness.UNKNOWN
        state = self.state(launch.job_id)
        if state is None:
            return Liveness.UNKNOWN
        return Liveness.ALIVE if state.alive else Liveness.DEAD

    def word(self, task: TaskDir, launch: Launch) -> SchedulerWord | None:
        """How Slurm says the job ended: final once it no longer runs, a cancel told from the rest."""
        if not launch.job_id:
            return None
        state = self.state(launch.job_id)
        if state is not None and state.state in REQUEUED_STATES and task.exit.exists():
            # The attempt ran and ended, and the listing says the job waits to run: either Slurm requeued it, or
            # the listing is older than the run (taken while the new job was still PENDING; a job that ran and
            # was cancelled within one LOOK_S). Only a fresh look may call it a requeue.
            state = self.state_fresh(launch.job_id)
        if state is None:
            return SchedulerWord(final=False)
        if state.state in REQUEUED_STATES:
            # Alive, but for a run to come: whatever ended in it (its exit record) has ended.
            return SchedulerWord(final=False, requeued=True, reason=f"Slurm requeued the Slurm job {launch.job_id}")
        if state.alive:
            return SchedulerWord(final=False)
        job = f"the Slurm job {launch.job_id}"
        if state.state == "CANCELLED":
            return SchedulerWord(True, cancelled=True, reason=f"{job} was cancelled outside the studio (scancel)")
        reasons = {
            "TIMEOUT": f"{job} reached its time limit{self._limit_words()}",
            "PREEMPTED": f"{job} was preempted by Slurm",
            "NODE_FAIL": f"the node running {job} failed",
            "BOOT_FAIL": f"the node for {job} failed to boot",
            "OUT_OF_MEMORY": f"Slurm stopped {job}: it used more memory than it asked for (--memory)",
            "DEADLINE": f"{job} reached its deadline",
            "GONE": f"Slurm no longer knows {job}",
        }
        if state.state in ("COMPLETED", "FAILED"):
            return SchedulerWord(True)  # its runner ended it: the exit record, or its absence, says how
        return SchedulerWord(True, reason=reasons.get(state.state, f"Slurm ended {job} ({state.state})"))

    def _limit_words(self) -> str:
        limit = slurm_seconds(self.settings.time) if self.settings.time else None
        if limit is None:
            return " (set by the partition)"
        return f" of {duration_words(limit)} (--time {self.settings.time})"

    def signal(self, task: TaskDir, launch: Launch | None, sig: int) -> bool:
        """Send `sig` to the job's runner (the batch step: the runner is its process)."""
        if launch is None or not launch.job_id or self.poll(task, launch) != Liveness.ALIVE:
            return False
        name = signal.Signals(sig).name.removeprefix("SIG")
        try:
            self.commands.run("scancel", "--batch", f"--signal={name}", launch.job_id)
            return True
        except (SlurmError, TimeoutError, OSError) as e:
            log.warning("could not signal Slurm job %s of task %s: %s", launch.job_id, task.path.name, e)
            return False

    def kill_all(self, task_id: str) -> int:
        """End the task's job, whatever it runs (scancel by name: no job id needed)."""
        try:
            self.commands.run("scancel", f"--name={job_name(task_id)}", "--me")
        except (SlurmError, TimeoutError, OSError) as e:
            log.warning("could not cancel the Slurm job of task %s: %s", task_id, e)
            return 0
        with self._lock:
            self._listing.ok = False
        return 1

    def signal_all(self, task_id: str, sig: int, *, spare: int | None = None) -> int:
        """Freeze and thaw stop processes where they stand; on a cluster that is the operator's `scontrol
        suspend`, not a user's. The studio refuses freeze for Slurm tasks before it gets here."""
        return 0

    def stop(self, task: TaskDir, launch: Launch | None, task_id: str, *, grace: float) -> int:
        """Cancel: `scancel` (SIGTERM to the runner and the trainer, then Slurm's SIGKILL after its KillWait),
        then up to `grace` seconds for the job to end. Returns 1 when a job was cancelled."""
        job = launch.job_id if launch is not None else None
        try:
            if job:
                self.commands.run("scancel", job)
            else:
                self.commands.run("scancel", f"--name={job_name(task_id)}", "--me")
        except (SlurmError, TimeoutError, OSError) as e:
            log.warning("could not cancel the Slurm job of task %s: %s", task_id, e)
            return 0
        deadline = time.monotonic() + grace
        while job and time.monotonic() < deadline:
            state = self.jobs(fresh=True)
            if state is not None and (job not in state or not state[job].alive):
                break
            time.sleep(0.5)
        return 1


CHECK_S = 120.0
CHECK_MEM = "64M"
BACKGROUND_CHECK_S = 3600.0
"""How long a serving studio waits for the check job of changed settings: the old executor serves meanwhile,
so there is no hurry, and a partition full of the person's own jobs may take a while to run it."""
"""How long `studio start --executor slurm` waits for its check job to run."""


def check_cluster(executor: SlurmExecutor, home: Path, *, wait_s: float | None = None) -> str:
    """Before the studio submits to Slurm: its commands answer, the partition exists, and a tiny job on a
    compute node sees a file the studio wrote in the home (the task directories must be shared). Returns
    a line for the person; raises SlurmError naming the problem and the fix."""
    check_commands(executor)
    return check_job(executor, home, wait_s=wait_s)


def check_commands(executor: SlurmExecutor) -> None:
    """Slurm's commands answer (here or on the login node) and the partition exists: seconds, at most."""
    settings = executor.settings
    try:
        out = executor.commands.run("sinfo", "--noheader", f"--partition={settings.partition}", "--format=%P|%a")
    except LoginUnreachable as e:
        raise SlurmError(str(e)) from e
    except (SlurmError, TimeoutError, OSError) as e:
        where = f" on {settings.host}" if settings.host else ""
        raise SlurmError(f"cannot run Slurm's commands{where} ({e}); is Slurm installed and slurmctld up?") from e
    if not out.strip():
        raise SlurmError(f"Slurm has no partition {settings.partition!r}; `sinfo` lists the partitions you can use")


def check_job(
    executor: SlurmExecutor, home: Path, *, wait_s: float | None = None, stop: threading.Event | None = None
) -> str:
    """A tiny job on a compute node sees a file the studio just wrote in the home. Waits for Slurm to run it
    (up to `wait_s`, CHECK_S by default, or until `stop` is set); the job is cancelled whatever happens."""
    settings = executor.settings
    probe_dir = home / "slurm-check"
    probe_dir.mkdir(parents=True, exist_ok=True)
    token = secrets.token_hex(8)
    probe, seen = probe_dir / f"{token}.probe", probe_dir / f"{token}.seen"
    probe.write_text(token + "\n")  # a line of its own: the node's name follows it in the answer
    command = f"cat {shlex.quote(str(probe))} > {shlex.quote(str(seen))} && hostname >> {shlex.quote(str(seen))}"
    # The check job only reads a file: it asks for little memory, so it can start beside a running task's job.
    opts = [o for o in sbatch_options(settings, {}) if not o.startswith(("--signal", "--mem="))]
    if not any(o.startswith("--mem") for o in opts):
        opts.append(f"--mem={CHECK_MEM}")
    try:
        job = job_id_in(
            executor.commands.run(
                "sbatch", "--parsable", "--job-name=ftstudio-check", "--output=/dev/null", *opts, f"--wrap={command}"
            )
        )
    except (TimeoutError, OSError) as e:
        raise SlurmError(f"could not submit the check job: {e}") from e
    limit = CHECK_S if wait_s is None else wait_s
    deadline = time.monotonic() + limit
    try:
        while time.monotonic() < deadline:
            if stop is not None and stop.is_set():
                raise SlurmError(f"the studio stopped before check job {job} ran; it is checked at the next start")
            if seen.exists() and seen.read_text().startswith(token):
                node = seen.read_text().splitlines()[-1].strip()
                return f"Slurm partition {settings.partition} is ready: job {job} on {node} sees the home {home}"
            state = executor.state_fresh(job)
            if state is not None and not state.alive:
                time.sleep(2.0)  # the file may be on its way through the shared filesystem's caches
                if seen.exists() and seen.read_text().startswith(token):
                    continue
                raise SlurmError(
                    f"the home {home} is not shared with the compute nodes: Slurm's check job {job} did not see a "
                    f"file the studio had just written there (the job ended {state.state}); put the home "
                    "(FTSTUDIO_HOME) on a filesystem the studio and the nodes both see, at the same path, and start "
                    "again. Nothing was changed: new fine-tunes still run where they did"
                )
            time.sleep(0.5)
        state = executor.state_fresh(job)
        why = f" (reason: {state.reason})" if state is not None and state.reason else ""
        raise SlurmError(
            f"check job {job} did not run within {limit:g}s{why}, so the shared home could not be confirmed; "
            "start again when the partition has room"
        )
    finally:
        with contextlib.suppress(SlurmError, TimeoutError, OSError):
            executor.commands.run("scancel", job)
        for path in (probe, seen):
            path.unlink(missing_ok=True)
