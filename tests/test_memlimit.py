"""A task's memory limit: the choice of mechanism, the RSS sum, and real tasks stopped at their
limit through `python -m ftstudio.runner` while a task without one runs on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
from support import ROOT, SCRIPTED, own_id
from trainer_fixtures import FAST, merged, read_events, shared_home

from ftstudio.execution import memlimit
from ftstudio.execution.memlimit import Mechanism
from ftstudio.execution.procs import tagged
from ftstudio.home import TaskDir, read_json
from ftstudio.resources import gib

MIB = 1 << 20

# --- the choice, with fakes -------------------------------------------------------------------


class Made(memlimit.Limit):
    def __init__(self, mechanism: Mechanism) -> None:
        self.mechanism = mechanism
        self.size = 1 << 30


def attempts(works: set[Mechanism]):
    tried: list[Mechanism] = []

    def attempt(m: Mechanism) -> memlimit.Limit | str:
        tried.append(m)
        return Made(m) if m in works else f"{m} is not here"

    return attempt, tried


@pytest.mark.parametrize(
    ("works", "override", "chosen", "tried"),
    [
        ({Mechanism.CGROUP, Mechanism.SYSTEMD, Mechanism.WATCHDOG}, None, "cgroup", ["cgroup"]),
        ({Mechanism.SYSTEMD, Mechanism.WATCHDOG}, None, "systemd", ["cgroup", "systemd"]),
        ({Mechanism.WATCHDOG}, None, "watchdog", ["cgroup", "systemd", "watchdog"]),
        ({Mechanism.CGROUP, Mechanism.WATCHDOG}, "watchdog", "watchdog", ["watchdog"]),
        ({Mechanism.CGROUP, Mechanism.SYSTEMD, Mechanism.WATCHDOG}, " Systemd ", "systemd", ["systemd"]),
        # asked for one that does not work here: the usual order, still limited
        ({Mechanism.WATCHDOG}, "cgroup", "watchdog", ["cgroup", "systemd", "watchdog"]),
    ],
)
def test_the_first_mechanism_that_works_is_chosen(works, override, chosen, tried):
    attempt, seen = attempts(works)
    limit, passed = memlimit.choose(attempt, override)
    assert limit.mechanism == chosen
    assert seen == tried
    assert passed == [f"{m}: {m} is not here" for m in tried[:-1]]


def test_an_unknown_override_is_named_and_ignored():
    attempt, _ = attempts({Mechanism.CGROUP, Mechanism.WATCHDOG})
    limit, passed = memlimit.choose(attempt, "rlimit")
    assert limit.mechanism == "cgroup"
    assert passed == ["FTSTUDIO_MEMORY_MECHANISM=rlimit is not one of cgroup, systemd, watchdog; ignored"]


def test_no_memory_setting_is_no_limit():
    lines: list[str] = []
    limit = memlimit.start({"config": {"resources": {"memory": ""}}}, "t", lines.append)
    assert limit.record() is None and limit.command(["x"]) == ["x"] and not limit.finish()
    assert lines == []
    assert memlimit.limit_of({"config": {"resources": {"memory": "1.5G"}}}) == 3 << 29


class FakeProc:
    def __init__(self, rss: int | None = None, error: type[Exception] | None = None) -> None:
        self.rss, self.error = rss, error

    def memory_info(self):
        if self.error:
            raise self.error(1)
        return SimpleNamespace(rss=self.rss)


def test_rss_of_the_task_is_summed_and_vanished_processes_count_nothing():
    procs = [FakeProc(100 * MIB), FakeProc(error=psutil.NoSuchProcess), FakeProc(error=psutil.AccessDenied)]
    assert memlimit.sum_rss([*procs, FakeProc(28 * MIB)]) == 128 * MIB
    assert memlimit.sum_rss([]) == 0


def fake_cgroup(root: Path, rel: str, controllers: str, subtree: str | None) -> Path:
    d = root / rel
    d.mkdir(parents=True, exist_ok=True)
    (d / "cgroup.controllers").write_text(controllers + "\n")
    if subtree is None:  # a directory where the file should be: writing "+memory" fails, as EBUSY would
        (d / "cgroup.subtree_control").mkdir()
    else:
        (d / "cgroup.subtree_control").write_text(subtree + "\n")
    return d


def test_the_trainer_cgroup_goes_beside_a_scope_that_holds_processes(tmp_path):
    # A systemd desktop: the runner's scope holds the shell too, the delegated slice above it has memory on.
    fake_cgroup(tmp_path, "", "cpu memory pids", "cpu memory pids")
    slice_ = fake_cgroup(tmp_path, "user.slice/app.slice", "cpu memory pids", "memory pids")
    fake_cgroup(tmp_path, "user.slice/app.slice/term.scope", "memory pids", None)
    found = memlimit.cgroup_parent((tmp_path, "/", "/user.slice/app.slice/term.scope"))
    assert found == slice_.resolve()


def test_where_no_cgroup_may_enable_memory_the_nearest_reason_is_given(tmp_path):
    # A container whose cgroup v2 root holds its processes: no level refuses more helpfully than the runner's own.
    fake_cgroup(tmp_path, "", "cpu memory pids", None)
    fake_cgroup(tmp_path, "init", "cpu memory pids", None)
    found = memlimit.cgroup_parent((tmp_path, "/", "/init"))
    assert found == f"cannot enable the memory controller in {tmp_path / 'init'} (Is a directory)"


def test_no_memory_controller_in_cgroup_v2_says_so(tmp_path):
    # This container: cgroup v2 is mounted beside cgroup v1, which holds the memory controller.
    fake_cgroup(tmp_path, "", "hugetlb", "")
    found = memlimit.cgroup_parent((tmp_path, "/", "/"))
    assert isinstance(found, str) and "memory controller is not available" in found


def test_a_cgroup_outside_the_mount_is_refused(tmp_path):
    fake_cgroup(tmp_path, "", "memory", "memory")
    found = memlimit.cgroup_parent((tmp_path, "/container", "/elsewhere"))
    assert isinstance(found, str) and "outside the mounted cgroup v2" in found


def test_systemd_wraps_the_trainer_in_a_scope_with_the_limit():
    limit = memlimit.SystemdLimit(["/usr/bin/systemd-run", "--user"], "20260101-0000-abcdef", 2 << 30)
    assert limit.command(["python", "-m", "ftstudio.train", "spec.json"]) == [
        "/usr/bin/systemd-run", "--user", "--scope", "--quiet", "--unit=ftstudio-20260101-0000-abcdef.scope",
        "-p", f"MemoryMax={2 << 30}", "-p", "MemorySwapMax=0", "--", "python", "-m", "ftstudio.train", "spec.json",
    ]  # fmt: skip
    assert limit.record() == {"bytes": 2 << 30, "mechanism": "systemd"}


# --- real tasks through the runner --------------------------------------------------------------


def make_task(tmp_path: Path, task_id: str, name: str, config: dict | None = None) -> TaskDir:
    task_id = own_id(task_id)
    tdir = TaskDir(tmp_path / task_id)
    tdir.path.mkdir()
    spec = {"format": 1, "task_id": task_id, "name": name, "config": config or {}, "home": str(shared_home())}
    tdir.spec.write_text(json.dumps(spec))
    return tdir


def start_runner(tdir: TaskDir, module: str, **env: str) -> subprocess.Popen[bytes]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("FTSTUDIO_")}
    full.update(PYTHONPATH=os.pathsep.join([str(ROOT), str(SCRIPTED)]), HF_HUB_OFFLINE="1", **env)
    with open(tdir.log, "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "ftstudio.runner", str(tdir.path), "--module", module],
            env=full,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )


def stop_all(runners: list[subprocess.Popen[bytes]], tasks: list[TaskDir]) -> None:
    for r in runners:
        if r.poll() is None:
            r.kill()
            r.wait()
    for t in tasks:
        for p in tagged(t.path.name):
            p.kill()


def unavailable(mechanism: Mechanism) -> str | None:
    """Why this machine cannot enforce a limit this way, or None."""
    if mechanism is Mechanism.CGROUP:
        found = memlimit.cgroup_parent()
        return found if isinstance(found, str) else None
    if mechanism is Mechanism.SYSTEMD:
        made = memlimit.SystemdLimit.make(f"probe-{os.getpid()}", 256 * MIB)
        return made if isinstance(made, str) else None
    return None


@pytest.mark.process
@pytest.mark.slow
@pytest.mark.parametrize("mechanism", list(Mechanism))
def test_a_task_past_its_limit_fails_and_a_task_beside_it_completes(tmp_path, mechanism):
    why = unavailable(mechanism)
    if why:
        print(f"\n{mechanism}: not available on this machine: {why}")
        pytest.skip(f"{mechanism} cannot limit memory here: {why}")
    limit = 160 * MIB
    # Trainer and grandchild each grow 8 MiB every 50 ms: the pair needs ~1.3 GiB, 8x the limit, and
    # only their sum crosses it early (each alone stays under it for a while).
    hog = make_task(
        tmp_path, "20260101-0000-hoghog", "memory grow=8 steps=80 delay=0.05 child=1", {"resources": {"memory": "160M"}}
    )
    calm = make_task(tmp_path, "20260101-0000-calmcalm", "memory grow=4 steps=40 delay=0.05")
    runners = [
        # tagged as the executor tags it: the watchdog must not count (or kill) the runner
        start_runner(hog, "memory_trainer", FTSTUDIO_MEMORY_MECHANISM=str(mechanism), FTSTUDIO_TASK_ID=hog.path.name),
        start_runner(calm, "memory_trainer"),
    ]
    try:
        assert [r.wait(timeout=60) for r in runners] == [0, 0]
        record = read_json(hog.exit)
        assert record["outcome"] == "failed", hog.log.read_text()
        assert record["reason"].startswith(f"memory limit of {gib(limit)} exceeded")
        assert record["memory_limit"]["mechanism"] == mechanism and record["memory_limit"]["bytes"] == limit
        assert read_json(hog.launch)["memory_limit"] == {"bytes": limit, "mechanism": str(mechanism)}
        steps = [e for e in read_events(hog.path) if e["kind"] == "progress"]
        assert len(steps) < 40  # stopped well before the end
        assert f"enforced by {'the runner' if mechanism == 'watchdog' else mechanism}" in hog.log.read_text()

        assert read_json(calm.exit)["outcome"] == "completed"
        assert read_json(calm.exit)["memory_limit"] is None

        # The figure for the docs: from the first step the task was seen past its limit to the exit record.
        over = [e for e in steps if e["rss"] > limit]
        peak = record["memory_limit"].get("peak_bytes")
        took = f"{record['finished_at'] - over[0]['ts']:.2f} s" if over else "(no step saw it)"
        print(f"\n{mechanism}: {len(steps)} steps, stopped {took} after crossing, peak {gib(peak) if peak else '?'}")
        if mechanism is Mechanism.CGROUP:
            assert not any(p.name.startswith(f"ftstudio-{hog.path.name}") for p in memlimit_dirs())
        assert not tagged(hog.path.name), "every process of the stopped task is gone"
    finally:
        stop_all(runners, [hog, calm])


def memlimit_dirs() -> list[Path]:
    found = memlimit.cgroup_parent()
    return [] if isinstance(found, str) else [p for p in found.iterdir() if p.is_dir()]


@pytest.mark.process
@pytest.mark.slow
def test_the_real_trainer_completes_within_a_generous_limit(tmp_path):
    config = merged(FAST, {"optim": {"max_steps": 2}, "resources": {"memory": "6G"}})
    tdir = make_task(tmp_path, "20260101-0000-tinytiny", "t", config)
    runner = start_runner(tdir, "ftstudio.train", OMP_NUM_THREADS="1")
    started = time.monotonic()
    try:
        assert runner.wait(timeout=240) == 0
        record = read_json(tdir.exit)
        assert record["outcome"] == "completed", tdir.log.read_text()[-3000:]
        chosen = read_json(tdir.launch)["memory_limit"]
        assert chosen["bytes"] == 6 << 30 and chosen["mechanism"] in set(Mechanism)
        assert record["memory_limit"]["mechanism"] == chosen["mechanism"]
        assert "memory limit 6 GiB, enforced by" in tdir.log.read_text()
        print(
            f"\nreal trainer under {chosen['mechanism']}: {time.monotonic() - started:.1f} s, {record['memory_limit']}"
        )
    finally:
        stop_all([runner], [tdir])


@pytest.mark.process
def test_the_watchdog_counts_and_kills_only_its_own_attempt() -> None:
    """A stale runner's watchdog (attempt 1) must not count, nor kill, the processes of the newer attempt
    the studio launched for the same task; its own attempt's it does."""
    from ftstudio.execution.procs import TASK_ENV
    from ftstudio.fence import ATTEMPT_ENV

    task_id = f"20260101-0000-fence{os.getpid()}"

    def sleeper(attempt: int) -> subprocess.Popen[bytes]:
        env = {**os.environ, TASK_ENV: task_id, ATTEMPT_ENV: str(attempt)}
        return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], env=env)

    newer = sleeper(2)
    lines: list[str] = []
    watchdog = memlimit.WatchdogLimit(task_id, 1, lines.append, attempt=1)  # any process of attempt 1 is over
    try:
        watchdog.started(0)
        time.sleep(4 * memlimit.WATCH_INTERVAL_S)
        assert newer.poll() is None and not watchdog.exceeded, lines
        own = sleeper(1)
        assert own.wait(timeout=10) == -9  # SIGKILLed, past its limit
        assert watchdog.finish() and newer.poll() is None
    finally:
        watchdog.finish()
        newer.kill()
        newer.wait()
