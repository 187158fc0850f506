"""The Slurm executor's logic around Slurm's commands, with a fake command runner: what reaches sbatch,
what the batch script holds, how squeue's answers are read, and that doubt is never a death; over ssh,
what reaches the remote shell, and the real ssh client's answer for a host that does not resolve. The
same executor against a real Slurm cluster: tests/test_slurm_jobs.py, over ssh: tests/test_slurm_ssh.py."""

from __future__ import annotations

import json
import shlex
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from support import run_cli

from ftstudio.errors import LaunchError
from ftstudio.execution.executor import Launch
from ftstudio.execution.facts import SchedulerWord
from ftstudio.execution.procs import Liveness
from ftstudio.execution.runner import NotHere, trainer_command, world_of
from ftstudio.execution.slurm import (
    RETRY_S,
    Commands,
    JobState,
    LoginUnreachable,
    SlurmError,
    SlurmExecutor,
    SlurmSettings,
    batch_script,
    carried_env,
    check_cluster,
    job_id_in,
    output_path,
    sbatch_options,
    slurm_seconds,
)
from ftstudio.home import TaskDir
from ftstudio.studio.store import Store

TASK = "20261201-0000-abcdef01"


class FakeCommands(Commands):
    """Records every command; answers from `answers` (a function of the argv), raising what it returns."""

    def __init__(self, answer: Callable[[tuple[str, ...]], str | BaseException]) -> None:
        super().__init__()
        self.calls: list[tuple[str, ...]] = []
        self.answer = answer

    def run(self, *args: str) -> str:
        self.calls.append(args)
        out = self.answer(args)
        if isinstance(out, BaseException):
            raise out
        return out


def listing(*rows: str) -> Callable[[tuple[str, ...]], str | BaseException]:
    def answer(args: tuple[str, ...]) -> str | BaseException:
        if args[0] == "squeue":
            return "".join(r + "\n" for r in rows)
        if args[0] == "sbatch":
            return "4242\n"
        return ""

    return answer


def make_task(tmp_path: Path, config: dict | None = None) -> TaskDir:
    task = TaskDir(tmp_path / TASK)
    task.path.mkdir()
    task.spec.write_text(json.dumps({"format": 1, "task_id": TASK, "name": "t", "config": config or {}}))
    return task


def executor(answer: Callable[[tuple[str, ...]], str | BaseException], **settings: str) -> SlurmExecutor:
    clock = [0.0]
    ex = SlurmExecutor(SlurmSettings(partition="debug", **settings), FakeCommands(answer), clock=lambda: clock[0])
    ex.tick = lambda s: clock.__setitem__(0, clock[0] + s)  # type: ignore[attr-defined]
    return ex


# -- settings ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("partition", "", "--partition: required"),
        ("partition", "gpu;rm -rf /", "--partition: 'gpu;rm -rf /' is not valid"),
        ("account", "$(id)", "--account:"),
        ("time", "tomorrow", "--time: 'tomorrow' is not valid; e.g. 24:00:00"),
        ("host", "-oProxyCommand=x", "--slurm-host:"),
        ("signal", "KILL@10", "--slurm-signal:"),
    ],
)
def test_settings_refuse_what_could_become_an_option_or_a_command(field: str, value: str, words: str) -> None:
    fields = {"partition": "debug", field: value}
    problems = SlurmSettings(**fields).problems()
    assert len(problems) == 1 and problems[0].startswith(words), problems
    with pytest.raises(SlurmError, match=words.split(":")[0]):
        SlurmExecutor(SlurmSettings(**fields), FakeCommands(listing()))


def test_good_settings_pass_and_round_trip() -> None:
    s = SlurmSettings("gpu", account="lab-1", qos="normal", time="2-00:00:00", host="me@login1.cluster.edu")
    assert s.problems() == []
    assert SlurmSettings.from_json(json.loads(json.dumps(s.to_json()))) == s


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("1", 60),
        ("90", 5400),
        ("1:30", 90),
        ("04:00:00", 14400),
        ("2-00:00:00", 172800),
        ("1-12", 129600),
        ("1-12:30", 131400),
        ("0", None),
        ("UNLIMITED", None),
        ("1:2:3:4", None),
    ],
)
def test_slurm_times_are_read_as_sbatch_reads_them(value: str, seconds: int | None) -> None:
    assert slurm_seconds(value) == seconds


@pytest.mark.process
def test_a_warning_signal_must_reach_the_runner_and_leave_the_job_time_to_train(tmp_path: Path) -> None:
    """The runner is the job's batch script: a signal without B: misses it (Slurm signals only the job's steps
    then), and one the runner does not turn into a checkpoint (USR2) would kill it. A warning as
    long as the time limit (Slurm sends it up to 30 s early) would stop every job as soon as it starts.
    `studio start` refuses each; a home that kept one from before still runs with it."""
    [problem] = SlurmSettings("debug", signal="USR1@120").unworkable()
    assert problem == (
        "--slurm-signal: USR1@120 would miss the studio's runner: without B: Slurm signals only the job's steps, "
        "and the runner is the job's batch script; use B:USR1@120"
    )
    [problem] = SlurmSettings("debug", signal="B:USR2@120").unworkable()
    assert problem == (
        "--slurm-signal: B:USR2@120 would end the job's runner without a checkpoint; use B:USR1, B:TERM or B:INT "
        "(e.g. B:USR1@120)"
    )
    [problem] = SlurmSettings("debug", time="1").unworkable()  # the default warning, B:USR1@120
    assert problem == (
        "--slurm-signal: B:USR1@120 would warn every job as soon as it starts (--time 1 gives it 1 minute, and "
        "Slurm sends the warning up to 30s early), so every attempt would stop at once; use a warning under 30s "
        "(e.g. B:USR1@14) or a longer --time"
    )
    assert "use no warning (B:USR1@0) or a longer --time" in SlurmSettings("debug", time="0:30").unworkable()[0]
    for kept in (SlurmSettings("debug", signal="USR1@120"), SlurmSettings("debug", time="1")):
        assert kept.problems() == []
        SlurmExecutor(kept, FakeCommands(listing()))  # as a stored setting: safe to pass on, so still used
    for fine in (
        SlurmSettings("debug", time="1", signal="B:USR1@0"),  # no warning: the time limit's SIGTERM stops the job
        SlurmSettings("debug", time="1", signal="B:USR1@29"),
        SlurmSettings("debug", time="24:00:00", signal="B:TERM@600"),
        SlurmSettings("debug", time="UNLIMITED", signal="B:INT@120"),
    ):
        assert fine.problems() == [] and fine.unworkable() == [], fine
    assert "--signal=B:USR1@0" in sbatch_options(SlurmSettings("debug", time="1", signal="B:USR1@0"), {})
    # `studio start` refuses before it asks Slurm anything, and remembers nothing.
    home = tmp_path / "home"
    r = run_cli(home, "studio", "start", "--executor", "slurm", "--partition", "debug", "--time", "1", timeout=60)
    assert r.returncode == 2 and r.stderr.startswith("error: --slurm-signal: B:USR1@120 would warn every job"), r
    assert Store(home / "studio.db").setting("executor") is None


# -- submit ------------------------------------------------------------------------------------


def test_submit_passes_checked_options_and_a_script_that_only_starts_the_runner(tmp_path: Path) -> None:
    task = make_task(tmp_path, {"resources": {"processes": 2, "gpus": 1, "memory": "8G"}})
    ex = executor(listing(), account="lab", time="04:00:00")
    launch = ex.submit(task, attempt=3, env={"HF_HOME": "/data/hf cache"})
    assert launch == Launch(pid=0, start_time=launch.start_time, boot_id="", pgid=0, job_id="4242")
    [call] = [c for c in ex.commands.calls if c[0] == "sbatch"]  # type: ignore[attr-defined]
    assert call[:2] == ("sbatch", "--parsable") and call[-1] == str(task.path / "slurm.sh")
    assert f"--job-name=ftstudio-{TASK}" in call and f"--output={task.log}" in call
    for opt in ("--partition=debug", "--account=lab", "--time=04:00:00", "--gpus-per-node=1", "--mem=8192M"):
        assert opt in call, call
    assert "--cpus-per-task=2" in call and "--requeue" in call and "--signal=B:USR1@120" in call
    script = (task.path / "slurm.sh").read_text()
    assert "export HF_HOME='/data/hf cache'" in script and f"export FTSTUDIO_TASK_ID={TASK}" in script
    last = shlex.split(script.strip().splitlines()[-1])
    assert last[:4] == ["exec", sys.executable, "-m", "ftstudio.runner"]
    assert last[4:] == [str(task.path), "--attempt", "from-file"]  # a requeued job runs the next attempt


@pytest.mark.process
def test_the_script_runs_as_written_even_with_odd_characters_in_values(tmp_path: Path) -> None:
    task = make_task(tmp_path)
    text = batch_script(task, 1, "ftstudio.train", {"ODD": 'it\'s $(rm -rf ~) `x` "y"'})
    probe = text.replace("exec ", "echo ", 1) + 'echo "$ODD"\n'
    out = subprocess.run(["sh", "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.splitlines()[-1] == 'it\'s $(rm -rf ~) `x` "y"'
    with pytest.raises(LaunchError, match="not valid"):
        batch_script(task, 1, "ftstudio.train", {"BAD NAME": "x"})


def test_sbatch_refusing_is_a_launch_error_with_its_words(tmp_path: Path) -> None:
    task = make_task(tmp_path)
    refuse = SlurmError("sbatch failed: error: invalid partition specified: nope")
    ex = executor(lambda args: refuse if args[0] == "sbatch" else "")
    with pytest.raises(LaunchError, match="Slurm refused the job: sbatch failed: error: invalid partition"):
        ex.submit(task, attempt=1)
    ex = executor(lambda args: TimeoutError("sbatch did not answer within 30s"))
    with pytest.raises(LaunchError, match="could not reach Slurm"):
        ex.submit(task, attempt=1)


def test_options_follow_the_task_resources() -> None:
    plain = sbatch_options(SlurmSettings("debug"), {})
    # builtin:tiny, one process: the runtime's share alone, never the whole node (footprint.py).
    assert plain == ["--partition=debug", "--nodes=1", "--ntasks-per-node=1", "--cpus-per-task=1", "--mem=1024M",
                     "--requeue", "--signal=B:USR1@120"]  # fmt: skip
    settings = SlurmSettings("gpu", account="lab", time="2-00:00:00", extra=("--constraint=a100",))
    big = sbatch_options(settings, {"resources": {"processes": 4, "nodes": 2, "gpus": 4, "memory": "64G"}})
    # One task per node (the runner on the first, a launcher on each under srun), the node's ranks its CPUs.
    assert big == ["--partition=gpu", "--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=4", "--account=lab",
                   "--time=2-00:00:00", "--gpus-per-node=4", "--mem=65536M", "--constraint=a100", "--requeue",
                   "--signal=B:USR1@120"]  # fmt: skip


def test_a_job_asks_for_the_memory_its_model_needs_never_the_whole_node(tmp_path: Path, monkeypatch) -> None:
    from ftstudio.footprint import CUDA_RUNTIME_BYTES, RUNTIME_BYTES, UNKNOWN_BYTES, GiB, job_memory

    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"\0" * (10 << 20))
    (model / "config.json").write_text("{}")
    local = job_memory({"model": {"name": str(model)}, "resources": {"processes": 2}}, None)
    # Loading takes the weights twice, training on the CPU once more; the runtime comes on top, per process.
    assert local.bytes == 2 * (RUNTIME_BYTES + 3 * (10 << 20)) and "10 MiB of weights" in local.basis
    on_gpu = job_memory({"model": {"name": str(model)}, "resources": {"gpus": 1}}, None)
    assert on_gpu.bytes == RUNTIME_BYTES + CUDA_RUNTIME_BYTES + 2 * (10 << 20)
    # A hub id is sized from the local Hugging Face cache, never downloaded; one not there gets a fixed amount.
    cache = tmp_path / "hub"
    snapshot = cache / "models--org--name" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "model-00001-of-00002.safetensors").write_bytes(b"\0" * (1 << 20))
    (snapshot / "model-00002-of-00002.safetensors").write_bytes(b"\0" * (1 << 20))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    assert job_memory({"model": {"name": "org/name"}}, None).bytes == RUNTIME_BYTES + 3 * (2 << 20)
    unknown = job_memory({"model": {"name": "org/elsewhere"}, "resources": {"processes": 2}}, None)
    assert unknown.bytes == 2 * UNKNOWN_BYTES and "--memory" in unknown.basis
    for odd in ("../etc", "a/b/c", "/", "org/.."):
        assert job_memory({"model": {"name": odd}}, None).bytes == UNKNOWN_BYTES, odd
    # The task's own --memory wins; a person's --mem-per-cpu replaces the ask (sbatch takes one of them).
    assert job_memory({}, 3 * GiB).sbatch_mem == "3072M"
    per_cpu = sbatch_options(SlurmSettings("debug", extra=("--mem-per-cpu=2G",)), {})
    assert not any(o.startswith("--mem=") for o in per_cpu) and "--mem-per-cpu=2G" in per_cpu


def test_a_task_over_several_nodes_runs_srun_torchrun_meeting_on_the_first_node(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    task = make_task(tmp_path, {"resources": {"processes": 2, "nodes": 3}})
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    with pytest.raises(NotHere, match="asks for 3 nodes, which only a Slurm job has"):
        trainer_command(task, "ftstudio.train", "auto", attempt=2)
    monkeypatch.setenv("SLURM_JOB_ID", "41")
    argv = trainer_command(task, "ftstudio.train", "auto", attempt=2)
    launcher = argv.index("ftstudio.node")
    assert argv[:launcher] == ["srun", "--nodes=3", "--ntasks-per-node=1", "--cpus-per-task=2", "--mem=0",
                               "--kill-on-bad-exit=1", sys.executable, "-m"]  # fmt: skip
    assert argv[launcher + 1 : launcher + 3] == [str(task.path), "--"]
    torchrun = argv[launcher + 3 :]
    host, port = next(a for a in torchrun if a.startswith("--rdzv_endpoint=")).split("=")[1].split(":")
    assert host == socket.gethostname() and 0 < int(port) < 65536  # this node: the batch step runs on the first
    assert {"--nnodes=3", "--nproc_per_node=2", "--rdzv_backend=c10d", f"--rdzv_id={TASK}-2"} <= set(torchrun)
    assert torchrun[-4:] == ["ftstudio.train", str(task.spec), "--resume", "auto"]
    assert world_of(task) == 6


# -- poll ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("state", "liveness"),
    [
        ("PENDING", Liveness.ALIVE),
        ("RUNNING", Liveness.ALIVE),
        ("COMPLETING", Liveness.ALIVE),
        ("REQUEUED", Liveness.ALIVE),
        ("SUSPENDED", Liveness.ALIVE),
        ("COMPLETED", Liveness.DEAD),
        ("CANCELLED", Liveness.DEAD),
        ("TIMEOUT", Liveness.DEAD),
        ("NODE_FAIL", Liveness.DEAD),
        ("PREEMPTED", Liveness.DEAD),
        ("OUT_OF_MEMORY", Liveness.DEAD),
    ],
)
def test_poll_reads_the_job_state(tmp_path: Path, state: str, liveness: Liveness) -> None:
    ex = executor(listing(f"4242|{state}|None|ftstudio-{TASK}", "77|RUNNING|None|someone-elses-job"))
    assert ex.poll(make_task(tmp_path), Launch(0, 0, "", 0, job_id="4242")) == liveness


def test_a_job_slurm_no_longer_lists_is_dead_but_a_failing_squeue_is_doubt(tmp_path: Path) -> None:
    task = make_task(tmp_path)
    launch = Launch(0, 0, "", 0, job_id="4242")
    assert executor(listing()).poll(task, launch) == Liveness.DEAD
    for trouble in (
        SlurmError("squeue failed: slurm_load_jobs error: Unable to contact slurm controller"),
        TimeoutError("squeue did not answer within 30s"),
        OSError("ssh: connect to host login1 port 22: Connection refused"),
    ):
        assert executor(lambda args, t=trouble: t).poll(task, launch) == Liveness.UNKNOWN


def test_one_listing_answers_every_task_for_a_look(tmp_path: Path) -> None:
    ex = executor(listing(f"1|RUNNING|None|ftstudio-{TASK}", "2|PENDING|Resources|ftstudio-other"))
    task = make_task(tmp_path)
    for job in ("1", "2", "1", "2"):
        ex.poll(task, Launch(0, 0, "", 0, job_id=job))
    assert [c[0] for c in ex.commands.calls] == ["squeue"]  # type: ignore[attr-defined]
    assert ex.state("2").reason == "Resources"  # type: ignore[union-attr]
    ex.tick(5.0)  # type: ignore[attr-defined]
    ex.poll(task, Launch(0, 0, "", 0, job_id="1"))
    assert [c[0] for c in ex.commands.calls] == ["squeue", "squeue"]  # type: ignore[attr-defined]


def test_a_controller_that_is_down_is_asked_again_only_after_a_pause(tmp_path: Path) -> None:
    """A failing squeue takes 9-18 s with slurmctld down: "cannot tell" stands for RETRY_S, so the
    supervisor's looks (and the local tasks they also watch) do not wait on it each time."""
    down = [True]
    ex = executor(lambda args: TimeoutError("squeue did not answer within 30s") if down[0] else listing()(args))
    task, launch = make_task(tmp_path), Launch(0, 0, "", 0, job_id="4242")
    assert ex.poll(task, launch) == Liveness.UNKNOWN
    ex.tick(RETRY_S - 1)  # type: ignore[attr-defined]
    assert ex.poll(task, launch) == Liveness.UNKNOWN
    assert len(ex.commands.calls) == 1  # type: ignore[attr-defined]
    down[0] = False
    ex.tick(1.5)  # type: ignore[attr-defined]
    assert ex.poll(task, launch) == Liveness.DEAD  # asked again, and answered
    assert len(ex.commands.calls) == 2  # type: ignore[attr-defined]


def test_what_a_request_shows_never_waits_on_squeue(tmp_path: Path) -> None:
    ex = executor(listing(f"1|PENDING|Resources|ftstudio-{TASK}"))
    assert ex.known("1") is None  # nothing looked yet: not known, and not asked
    assert ex.commands.calls == []  # type: ignore[attr-defined]
    ex.poll(make_task(tmp_path), Launch(0, 0, "", 0, job_id="1"))
    ex.tick(60.0)  # type: ignore[attr-defined]
    assert ex.known("1") == JobState("1", "PENDING", "Resources", f"ftstudio-{TASK}")  # the last look's word
    assert len(ex.commands.calls) == 1  # type: ignore[attr-defined]


# -- signals and cancel ------------------------------------------------------------------------------


def test_signal_goes_to_the_batch_step_of_a_live_job_only(tmp_path: Path) -> None:
    task = make_task(tmp_path)
    ex = executor(listing(f"4242|RUNNING|None|ftstudio-{TASK}"))
    assert ex.signal(task, Launch(0, 0, "", 0, job_id="4242"), signal.SIGUSR1)
    assert ("scancel", "--batch", "--signal=USR1", "4242") in ex.commands.calls  # type: ignore[attr-defined]
    assert not ex.signal(task, Launch(0, 0, "", 0, job_id="999"), signal.SIGUSR1)  # not listed: ended


def test_kill_all_cancels_the_task_job_by_name(tmp_path: Path) -> None:
    ex = executor(listing())
    assert ex.kill_all(TASK) == 1
    [call] = ex.commands.calls  # type: ignore[attr-defined]
    assert call[0] == "scancel" and f"--name=ftstudio-{TASK}" in call
    assert ex.signal_all(TASK, signal.SIGSTOP) == 0  # freeze is refused for Slurm tasks before this


def test_commands_over_ssh_quote_each_argument_for_the_remote_shell() -> None:
    argv = Commands("me@login1").argv(["sbatch", "--wrap=echo 'hi'; rm x", "/path with space/slurm.sh"])
    assert argv[:2] == ["ssh", "-o"] and "BatchMode=yes" in argv and argv[-3:-1] == ["me@login1", "--"]
    assert shlex.split(argv[-1]) == ["sbatch", "--wrap=echo 'hi'; rm x", "/path with space/slurm.sh"]


def test_the_slurm_executor_keeps_to_the_protocol() -> None:
    import inspect

    from ftstudio.execution.executor import Executor

    for name, member in vars(Executor).items():
        if callable(member) and not name.startswith("_"):
            assert inspect.signature(getattr(SlurmExecutor, name)) == inspect.signature(member), name


@pytest.mark.parametrize(
    ("row", "final", "cancelled", "words"),
    [
        ("4242|RUNNING|None", False, False, ""),
        ("4242|COMPLETING|None", False, False, ""),
        ("4242|COMPLETED|None", True, False, ""),  # its runner ended it: the exit record says how
        ("4242|CANCELLED|None", True, True, "the Slurm job 4242 was cancelled outside the studio (scancel)"),
        (
            "4242|TIMEOUT|TimeLimit",
            True,
            False,
            "the Slurm job 4242 reached its time limit of 4 hours (--time 04:00:00)",
        ),
        ("4242|PREEMPTED|None", True, False, "the Slurm job 4242 was preempted by Slurm"),
        ("4242|NODE_FAIL|None", True, False, "the node running the Slurm job 4242 failed"),
        ("", True, False, "Slurm no longer knows the Slurm job 4242"),
    ],
)
def test_slurms_word_on_how_a_job_ended(tmp_path: Path, row: str, final: bool, cancelled: bool, words: str) -> None:
    ex = executor(listing(f"{row}|ftstudio-{TASK}") if row else listing(), time="04:00:00")
    word = ex.word(make_task(tmp_path), Launch(0, 0, "", 0, job_id="4242"))
    assert word is not None and (word.final, word.cancelled, word.reason) == (final, cancelled, words)


def test_an_ended_attempt_is_called_requeued_only_on_a_fresh_look(tmp_path: Path) -> None:
    """A listing taken while the new job was still PENDING, read after it ran and was cancelled within one
    look: the exit record is there, so the word is asked of Slurm again (a CI run read it as a requeue)."""
    rows = [f"4242|PENDING|None|ftstudio-{TASK}"]
    ex = executor(lambda args: "\n".join(rows) if args[0] == "squeue" else "")
    task = make_task(tmp_path)
    launch = Launch(0, 0, "", 0, job_id="4242")
    assert ex.word(task, launch).requeued  # type: ignore[union-attr]  # no exit record: still waiting to run
    rows[0] = f"4242|CANCELLED|None|ftstudio-{TASK}"
    assert ex.word(task, launch).requeued  # type: ignore[union-attr]  # the cached listing, within LOOK_S
    task.exit.write_text('{"outcome": "interrupted"}')
    word = ex.word(task, launch)
    assert word is not None and word.cancelled and not word.requeued, word


def test_a_time_limit_left_to_the_partition_says_so(tmp_path: Path) -> None:
    word = executor(listing(f"4242|TIMEOUT|TimeLimit|ftstudio-{TASK}")).word(
        make_task(tmp_path), Launch(0, 0, "", 0, job_id="4242")
    )
    assert word is not None and word.reason == "the Slurm job 4242 reached its time limit (set by the partition)"


def test_no_word_is_final_while_slurm_cannot_be_asked(tmp_path: Path) -> None:
    ex = executor(lambda args: TimeoutError("squeue did not answer within 30s"))
    assert ex.word(make_task(tmp_path), Launch(0, 0, "", 0, job_id="4242")) == SchedulerWord(final=False)


def test_extra_sbatch_options_come_from_a_safe_list_with_plain_values() -> None:
    good = SlurmSettings("gpu", extra=("--constraint=a100|h100", "--exclude=node[01-03]", "--exclusive"))
    assert good.problems() == []
    assert sbatch_options(good, {})[-5:-2] == ["--constraint=a100|h100", "--exclude=node[01-03]", "--exclusive"]
    assert SlurmSettings.from_json(json.loads(json.dumps(good.to_json()))) == good
    for bad, words in (
        ("--output=/etc/passwd", "'--output' is not one the studio passes on"),
        ("--wrap=rm -rf ~", "'--wrap' is not one the studio passes on"),
        ("--uid=0", "'--uid' is not one the studio passes on"),
        ("--constraint=a100 --wrap=x", "needs a plain value"),
        ("--comment=$(id)", "needs a plain value"),
        ("--constraint", "needs a plain value"),
    ):
        problems = SlurmSettings("gpu", extra=(bad,)).problems()
        assert len(problems) == 1 and words in problems[0], (bad, problems)


def test_a_requeued_job_of_the_task_is_adopted_by_its_next_attempt(tmp_path: Path) -> None:
    task = make_task(tmp_path)
    ex = executor(listing(f"4242|PENDING|BeginTime|ftstudio-{TASK}"))
    launch = ex.submit(task, attempt=2)
    assert launch.job_id == "4242" and not any(c[0] == "sbatch" for c in ex.commands.calls)  # type: ignore[attr-defined]
    word = ex.word(task, launch)
    assert word is not None and word.requeued and word.reason == "Slurm requeued the Slurm job 4242"


# -- over ssh: what reaches the remote shell, sbatch's file names, the job's environment ------------


@pytest.mark.process
def test_each_argument_reaches_the_command_on_the_login_node_as_it_was(tmp_path: Path) -> None:
    """ssh hands the remote shell one string; a real sh parses it back into the same arguments."""
    odd = tmp_path / "lab's home $HOME `id` 100%j"
    args = [
        "squeue",
        "--noheader",
        "--format=%i|%T|%r|%j",  # a `|` the remote shell must not take for a pipe
        f"--wrap=cat {shlex.quote(str(odd / 'a.probe'))} > {shlex.quote(str(odd / 'a.seen'))} && hostname",
        f"--output={odd / 'training.log'}",
        "two\nlines; rm -rf ~",
    ]
    remote = Commands("me@login1").argv(args)[-1]
    echo = 'squeue() { for a; do printf "%s\\0" "$a"; done; }\n'
    out = subprocess.run(["sh", "-c", echo + remote], capture_output=True, text=True, check=True).stdout
    assert out.split("\0")[:-1] == args[1:]


def test_a_log_path_reaches_sbatch_literally(tmp_path: Path) -> None:
    """sbatch expands %j, %x, ... in --output (a home with `100%j` in its name: the job fails to launch)."""
    assert output_path(Path("/home/me/.ftstudio/tasks/t/training.log")) == "/home/me/.ftstudio/tasks/t/training.log"
    assert output_path(Path("/data/100%j done/%%/training.log")) == "/data/100%%j done/%%%%/training.log"
    # With a backslash in it Slurm expands nothing, and takes a doubled backslash for one.
    assert output_path(Path("/data/a\\b 100%j/training.log")) == "/data/a\\\\b 100%j/training.log"
    home = tmp_path / "100%j"
    home.mkdir()
    task = make_task(home)
    ex = executor(listing())
    ex.submit(task, attempt=1)
    [call] = [c for c in ex.commands.calls if c[0] == "sbatch"]  # type: ignore[attr-defined]
    assert f"--output={tmp_path}/100%%j/{TASK}/training.log" in call and f"--chdir={task.path}" in call


def test_the_job_takes_the_studios_code_path_and_settings_but_no_token(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Over ssh the job starts from the login node's environment: its script sets what the runner needs."""
    environ = {
        "PYTHONPATH": "/srv/ftstudio:/srv/extra",
        "HF_HOME": "/shared/hf",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "FTSTUDIO_SHUTDOWN_GRACE_S": "20",
        "HF_TOKEN": "hf_secret",
        "HUGGING_FACE_HUB_TOKEN": "hf_secret",
        "FTSTUDIO_BOOT_ID": "this-machine",
        "FTSTUDIO_GPUS": "0,1",
        "FTSTUDIO_TASK_ID": "another-task",
        "PATH": "/usr/bin",
        "SLURM_CONF": "/etc/slurm/slurm.conf",
    }
    assert carried_env(environ) == {
        "PYTHONPATH": "/srv/ftstudio:/srv/extra",
        "HF_HOME": "/shared/hf",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "FTSTUDIO_SHUTDOWN_GRACE_S": "20",
    }
    monkeypatch.setenv("PYTHONPATH", "/srv/with space")
    monkeypatch.setenv("HF_HOME", "/shared/hf")
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    task = make_task(tmp_path)
    executor(listing()).submit(task, attempt=1, env={"HF_HOME": "/data/hf cache"})  # what it is given wins
    script = (task.path / "slurm.sh").read_text()
    assert "export PYTHONPATH='/srv/with space'" in script and "export HF_HOME='/data/hf cache'" in script
    assert "hf_secret" not in script


def test_the_job_id_is_the_last_line_sbatch_printed() -> None:
    assert job_id_in("4242\n") == "4242" and job_id_in("4242;cluster2\n") == "4242"
    assert job_id_in("Welcome to the login node\n4242\n") == "4242"  # a login shell's own words first
    for bad in ("", "sbatch: error: nope\n"):
        with pytest.raises(SlurmError, match="not a job id"):
            job_id_in(bad)


@pytest.mark.process
@pytest.mark.skipif(shutil.which("ssh") is None, reason="no ssh client here")
def test_a_login_node_ssh_cannot_reach_is_doubt_for_a_look_and_a_launch_error_for_a_submit(tmp_path: Path) -> None:
    """The real ssh client, against a host that does not resolve: exit 255 is ssh's own failure."""
    ex = SlurmExecutor(SlurmSettings("debug", host="no-such-host.invalid"))
    task = make_task(tmp_path)
    assert ex.poll(task, Launch(0, 0, "", 0, job_id="4242")) == Liveness.UNKNOWN  # never "dead"
    with pytest.raises(LaunchError, match="could not reach Slurm to submit the job: cannot reach the login node"):
        ex.submit(task, attempt=1)
    with pytest.raises(SlurmError) as refused:
        check_cluster(ex, tmp_path / "home")
    said = str(refused.value)  # the resolver's own words in the middle differ from machine to machine
    assert said.startswith("cannot reach the login node no-such-host.invalid over ssh (ssh: Could not resolve")
    assert said.endswith("): check that `ssh no-such-host.invalid true` works from here without a password")


def test_slurm_commands_that_fail_on_the_login_node_are_named_at_the_check(tmp_path: Path) -> None:
    missing = SlurmError("sinfo failed: bash: line 1: sinfo: command not found")
    ex = executor(lambda args: missing, host="login1")
    with pytest.raises(SlurmError, match=r"^cannot run Slurm's commands on login1 \(sinfo failed: bash: line 1: "):
        check_cluster(ex, tmp_path)
    ex = executor(lambda args: LoginUnreachable("cannot reach the login node login1 over ssh (...)"), host="login1")
    with pytest.raises(SlurmError, match=r"^cannot reach the login node login1 over ssh \(\.\.\.\)$"):
        check_cluster(ex, tmp_path)


def test_changed_settings_are_checked_while_the_studio_serves_and_unchanged_ones_not_again(tmp_path, monkeypatch):
    """Issue 21: after a crash, `studio start --executor slurm --partition P` again must not wait for a check
    job behind the task's own job; changed settings are checked by the serving studio, and new fine-tunes keep
    the executor they had (or wait, on their way from this machine to Slurm) until the check passes."""
    from ftstudio.execution import slurm as slurm_mod
    from ftstudio.execution.inmemory import InMemoryExecutor
    from ftstudio.home import Home
    from ftstudio.studio.service import Service

    jobs: list[str] = []
    verdict = {"debug": "ok", "gpu": "ok", "broken": "the home is not shared"}

    def check_job(ex, home, **kw):
        jobs.append(ex.settings.partition)
        if verdict[ex.settings.partition] != "ok":
            raise SlurmError(verdict[ex.settings.partition])
        return f"checked {ex.settings.partition}"

    monkeypatch.setattr(slurm_mod, "check_commands", lambda ex: None)
    monkeypatch.setattr(slurm_mod, "check_job", check_job)
    service = Service(Home(tmp_path / "home"), executor=InMemoryExecutor(), in_server=True)
    said = service.use_executor("slurm", {"partition": "debug"})
    assert "runs a check job" in said and "new fine-tunes wait in the queue" in said, said
    assert jobs == [] and service.store.setting("executor") in (None, "local")  # nothing changed yet
    queued = service.submit({"preset": "cpu-demo"}, "waits for the check", trusted=True)
    assert service.store.get(queued.id).status == "queued"
    assert "waits for the check of Slurm partition debug" in service.launcher.plan().waits[queued.id].reason
    assert service.executor_state()["pending"]["partition"] == "debug"
    assert service.check_pending_executor() == (True, "checked debug")
    assert service.executor.name == "slurm" and service.launcher.executor is service.executor
    assert service.launcher.held() is None and service.executor_state()["last_check"]["passed"] is True
    again = service.use_executor("slurm", {"partition": "debug"})
    assert "unchanged; not checked again" in again and service.launcher.pending() is None, again
    # Changed settings: the old ones serve until the new pass; a failed check changes nothing.
    said = service.use_executor("slurm", {"partition": "broken"})
    assert "go to Slurm with the settings checked before" in said and service.launcher.held() is None
    assert service.check_pending_executor() == (False, "the home is not shared")
    state = service.executor_state()
    assert state["partition"] == "debug" and "pending" not in state and state["last_check"]["passed"] is False
    service.use_executor("slurm", {"partition": "gpu"})
    assert service.check_pending_executor() == (True, "checked gpu")
    assert service.executor_state()["partition"] == "gpu" and jobs == ["debug", "broken", "gpu"]
    assert "not checked again" in service.use_executor("slurm", {"partition": "gpu"})
    assert service.check_pending_executor() is None  # nothing pending: no job
