"""The in-memory executor (ftstudio.execution.inmemory), the testing aid the fast tier stands on: it keeps to
the `Executor` protocol and writes what the real runner writes, so the real store and supervisor read it."""

from __future__ import annotations

import inspect
import signal
from pathlib import Path

from ftstudio.execution.executor import Executor, LocalExecutor
from ftstudio.execution.facts import Liveness
from ftstudio.execution.inmemory import InMemoryExecutor, InMemoryRunner, ManualClock
from ftstudio.home import Home, read_json
from ftstudio.studio.service import Service


def test_the_in_memory_executor_keeps_to_the_protocol() -> None:
    """It is only worth its tests while it takes and returns what the real protocol does."""
    methods = [(n, m) for n, m in vars(Executor).items() if callable(m) and not n.startswith("_")]
    assert {n for n, _ in methods} == {"submit", "poll", "signal", "kill_all", "signal_all", "stop", "word"}
    for name, member in methods:
        assert inspect.signature(getattr(InMemoryExecutor, name)) == inspect.signature(member), name
        assert inspect.signature(getattr(LocalExecutor, name)) == inspect.signature(member), name
    executor = InMemoryExecutor()
    for attribute in Executor.__annotations__:
        assert hasattr(executor, attribute), attribute
    assert isinstance(executor.name, str) and executor.cluster == "" and executor.on_exit is None


def test_a_run_is_read_by_the_real_supervisor_from_the_files_it_writes(tmp_path: Path) -> None:
    clock = ManualClock()
    started: list[InMemoryRunner] = []
    executor = InMemoryExecutor(clock, on_submit=started.append)
    service = Service(Home(tmp_path / "home"), executor=executor)  # not in a server: reads sync the task
    task = service.submit({"preset": "cpu-demo"}, "in memory")
    runner = executor.runner(task.id)
    assert started == [runner] and runner.env == {}  # no GPU here: the environment is left alone
    launch = read_json(task.dir.launch)
    assert (launch["pid"], launch["attempt"], launch["start_time"]) == (runner.pid, 1, clock())
    assert task.dir.heartbeat.stat().st_mtime == clock()
    assert service.get(task.id).status == "preparing"

    runner.train(2, total_steps=4)
    got = service.get(task.id)
    assert (got.status, got.step, got.total_steps) == ("training", 2, 4)
    runner.complete()
    got = service.get(task.id)
    assert (got.status, got.step) == ("completed", 2)
    assert service.logs(task.id)["text"] == "step 1/4\nstep 2/4\n"
    assert task.dir.adapter.is_dir() and read_json(task.dir.exit)["attempt"] == 1
    assert executor.poll(task.dir, None) == Liveness.DEAD


def test_signals_reach_the_runner_only_while_it_is_ours_and_every_end_is_told(tmp_path: Path) -> None:
    executor = InMemoryExecutor()
    ends: list[str] = []
    executor.on_exit = lambda: ends.append("ended")
    service = Service(Home(tmp_path / "home"), executor=executor, in_server=True)
    task = service.submit({"preset": "cpu-demo"}, "in memory")
    runner = executor.runner(task.id)
    launch = executor.submit(task.dir, attempt=2)  # a second runner of the task, as a retry would start
    assert executor.runner(task.id).pid == launch.pid != runner.pid
    runner.hide()  # its identity cannot be checked: no signal, but the kill of the task's processes reaches it
    assert executor.poll(task.dir, None) == Liveness.ALIVE  # launch.json names the newer runner
    assert executor.signal_all(task.id, signal.SIGSTOP, spare=launch.pid) == 2
    assert executor.runner(task.id).frozen and runner.signals == [signal.SIGSTOP]
    assert executor.kill_all(task.id) == 2 and ends == ["ended", "ended"] and executor.alive() == []
    assert executor.signal(task.dir, launch, signal.SIGTERM) is False  # dead: nothing sent
