"""The persistent queue. Its logic over the in-memory executor (the fast tier): GPU leases against a
fake device list (FTSTUDIO_GPUS; these machines have no GPU), why each task waits, held tasks, requests
the machine cannot meet. With real processes: a scripted trainer under the real runner, a real studio
server that is SIGKILLed while tasks wait, the GPUs each trainer sees, and the CLI running the queue
alone."""

from __future__ import annotations

import itertools
import signal
from pathlib import Path
from typing import Any

import pytest
from support import Studio, cli_json, in_memory, run_cli, wait_for

from ftstudio.cli.main import main
from ftstudio.home import read_json
from ftstudio.studio.store import Store


def submit(studio: Studio, name: str, **resources: Any) -> str:
    config: dict[str, Any] = {"preset": "cpu-demo"}
    if resources:
        config["resources"] = resources
    r = studio.http.post("/api/tasks", json={"name": name, "config": config})
    assert r.status_code == 201, r.text
    return r.json()["id"]


def process_span(home: Path, task_id: str) -> tuple[float, float]:
    """When the task's runner started and when it wrote its exit record (the processes' own clocks)."""
    tdir = home / "tasks" / task_id
    return read_json(tdir / "launch.json")["started_at"], read_json(tdir / "exit.json")["finished_at"]


def first_status_event(home: Path, task_id: str) -> dict[str, Any]:
    events = Store(home / "studio.db").events(task_id, kinds=("status",))
    return next(e for e in events if e.get("message") == "scripted")


@pytest.mark.timeout(300)
def test_one_slot_runs_tasks_one_after_another_through_a_studio_sigkill(home: Path, studio_factory: Any) -> None:
    studio = studio_factory(scripted=True).start()
    ids = [submit(studio, f"scripted steps=15 delay=0.1 q{i}") for i in range(3)]
    first = studio.task(ids[0])
    assert first["status"] in ("preparing", "training") and first["resources"] == ["slot:0"]
    waiting = [studio.task(i) for i in ids[1:]]
    assert [t["status"] for t in waiting] == ["queued", "queued"]
    assert [t["queue"]["position"] for t in waiting] == [1, 2]
    assert waiting[0]["queue"]["reason"] == f"waiting for a training slot (1 slot, held by task {ids[0]})"
    assert waiting[1]["queue"]["reason"] == f"waiting behind task {ids[1]} for a training slot"
    q = studio.http.get("/api/queue").json()
    assert [t["id"] for t in q["running"]] == ids[:1] and [t["id"] for t in q["waiting"]] == ids[1:]

    # The studio dies while one runs and two wait; the running one ends while nobody watches.
    studio.kill(signal.SIGKILL)
    wait_for(lambda: (home / "tasks" / ids[0] / "exit.json").exists(), timeout=60, what="the first task to end")
    assert not (home / "tasks" / ids[1] / "launch.json").exists()  # nobody started the next one behind its back

    again = studio_factory(scripted=True, port=studio.port).start()
    for task_id in ids:
        assert again.wait_status(task_id, "completed", "failed", timeout=120)["status"] == "completed"
    spans = [process_span(home, i) for i in ids]
    # In submission order, and never two at once: each runner started after the previous one had ended.
    assert spans == sorted(spans)
    for (_, end), (start, _) in itertools.pairwise(spans):
        assert start >= end
    store = Store(home / "studio.db")
    assert store.leases() == []
    assert [a["attempt"] for a in store.attempts(ids[2])] == [1]


@pytest.mark.timeout(300)
def test_each_trainer_sees_its_own_gpu_and_slots_are_remembered(home: Path, studio_factory: Any) -> None:
    """The real runner hands the trainer the GPUs the queue granted (the queue's choice itself, with every
    reason a task waits: test_gpus_are_leased_one_task_each_and_the_waiting_say_for_what)."""
    studio = studio_factory(scripted=True, FTSTUDIO_GPUS="0,1").start("--slots", "2")
    cpu = submit(studio, "scripted steps=3 delay=0.05 cpu", gpus=0)
    gpu = [submit(studio, f"scripted steps=3 delay=0.05 gpu{i}", gpus=1) for i in range(2)]
    for task_id in [cpu, *gpu]:
        assert studio.wait_status(task_id, "completed", "failed", timeout=180)["status"] == "completed"
    # Each trainer saw exactly its own GPU, numbered the way nvidia-smi numbers them; a CPU task sees none.
    assert {first_status_event(home, t)["cuda_visible_devices"] for t in gpu} == {"0", "1"}
    assert first_status_event(home, gpu[0])["cuda_device_order"] == "PCI_BUS_ID"
    assert first_status_event(home, cpu)["cuda_visible_devices"] == ""
    studio.stop()
    # --slots was written into the home: the next studio and the CLI read it without the flag.
    assert cli_json(home, "queue", FTSTUDIO_GPUS="0,1")["slots"] == 2


def test_gpus_are_leased_one_task_each_and_the_waiting_say_for_what(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FTSTUDIO_GPUS", "0,1")
    service = in_memory(home)
    service.set_slots(2)

    def queued(name: str, **resources: Any) -> str:
        return service.submit({"preset": "cpu-demo", "resources": resources}, name).id

    cpu = [queued(f"cpu{i}", gpus=0) for i in range(2)]
    gpu = [queued(f"gpu{i}", gpus=1) for i in range(3)]
    pinned = queued("pinned", gpu_ids="1")
    view = {t: service.task_json(service.get(t)) for t in [*cpu, *gpu, pinned]}
    for task_id in [*cpu, *gpu[:2]]:
        assert view[task_id]["status"] == "preparing"
    assert {tuple(view[t]["resources"]) for t in cpu} == {("slot:0",), ("slot:1",)}
    assert {tuple(view[t]["resources"]) for t in gpu[:2]} == {("gpu:0",), ("gpu:1",)}
    third, waits_for_1 = view[gpu[2]], view[pinned]
    assert third["status"] == "queued" and third["queue"]["position"] == 1
    assert third["queue"]["reason"] == f"waiting for 1 GPU (none free; GPUs 0, 1 held by tasks {gpu[0]}, {gpu[1]})"
    assert waits_for_1["queue"]["reason"] == f"waiting for GPU 1, held by task {gpu[1]}"
    # What each runner was handed: its own GPU, numbered the way nvidia-smi numbers them; CPU tasks none.
    runner = service.executor.runner
    assert [runner(t).env for t in gpu[:2]] == [
        {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": "0"},
        {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": "1"},
    ]
    assert {runner(t).env["CUDA_VISIBLE_DEVICES"] for t in cpu} == {""}

    # GPU 1 frees: the next GPU task takes it, and the pinned one waits on behind it for GPU 1 alone.
    runner(gpu[1]).complete(steps=2)
    assert service.get(gpu[1]).status == "completed"
    assert service.get(gpu[2]).status == "preparing" and runner(gpu[2]).env["CUDA_VISIBLE_DEVICES"] == "1"
    assert service.task_json(service.get(pinned))["queue"]["reason"] == f"waiting for GPU 1, held by task {gpu[2]}"
    runner(gpu[0]).complete(steps=2)  # GPU 0 frees: the pinned task still waits for GPU 1
    assert service.get(pinned).status == "queued"
    runner(gpu[2]).complete(steps=2)
    assert service.get(pinned).status == "preparing" and runner(pinned).env["CUDA_VISIBLE_DEVICES"] == "1"
    for task_id in [*cpu, pinned]:
        runner(task_id).complete(steps=2)
        assert service.get(task_id).status == "completed"
    assert service.store.leases() == []
    assert service.queue()["slots"] == 2


def test_one_slot_starts_the_next_task_when_the_one_before_ends(home: Path) -> None:
    service = in_memory(home)
    ids = [service.submit({"preset": "cpu-demo"}, f"q{i}").id for i in range(3)]
    runner = service.executor.runner
    for i, task_id in enumerate(ids):
        assert [service.get(t).status for t in ids[i:]] == ["preparing"] + ["queued"] * (len(ids) - i - 1)
        assert [r.task_id for r in service.executor.alive()] == [task_id]  # never two at once
        runner(task_id).complete(steps=1)
    assert [service.get(t).status for t in ids] == ["completed"] * 3 and service.store.leases() == []


def test_requests_this_machine_cannot_meet_are_refused_at_submit(
    home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The command in this process (its exit code as a process: test_cli.py)."""

    def refused(*args: str, gpus: str | None = None) -> str:
        if gpus is None:
            monkeypatch.delenv("FTSTUDIO_GPUS", raising=False)
        else:
            monkeypatch.setenv("FTSTUDIO_GPUS", gpus)
        assert main(list(args)) == 2
        return capsys.readouterr().err

    err = refused("submit", "--preset", "cpu-demo", "--gpus", "1", gpus="none")
    assert "resources.gpus (--gpus): asks for 1 GPU(s) but this machine has no GPU" in err
    assert "leave --gpus unset or 0 to train on the CPU" in err
    err = refused("submit", "--preset", "cpu-demo", "--gpu-ids", "0,5", gpus="0,1")
    assert "GPU 5 is not on this machine; it has GPUs 0, 1" in err
    err = refused("submit", "--preset", "cpu-demo", "--memory", "lots")
    assert "resources.memory (--memory): must be a size such as 8G" in err
    err = refused("submit", "--preset", "cpu-demo", "--nodes", "2")
    assert "resources.nodes (--nodes): asks for 2 machines, but this studio runs tasks on this machine" in err
    assert "resources.nodes (--nodes)" in refused("submit", "--preset", "cpu-demo", "--nodes", "0")
    assert "--slots: must be between 1 and 256 (got 0)" in refused("studio", "start", "--slots", "0")
    assert main(["tasks", "--json"]) == 0 and '"total": 0' in capsys.readouterr().out  # nothing was recorded


@pytest.mark.process
@pytest.mark.timeout(300)
def test_the_cli_alone_runs_the_queue_when_no_studio_is_up(home: Path) -> None:
    """No studio: `submit` starts what fits, and the commands that read (here `show`) start the
    next task once the one before it has ended."""
    first = run_cli(home, "submit", "--preset", "cpu-demo", "--name", "scripted steps=5 delay=0.05", scripted=True)
    second = run_cli(home, "submit", "--preset", "cpu-demo", "--name", "scripted steps=5 delay=0.05", scripted=True)
    a, b = first.stdout.strip(), second.stdout.strip()
    shown = cli_json(home, "show", b, scripted=True)
    assert shown["status"] == "queued" or (home / "tasks" / a / "exit.json").exists()
    text = run_cli(home, "queue", scripted=True).stdout
    assert "training slots 1" in text
    done = wait_for(
        lambda: (t := cli_json(home, "show", b, scripted=True))["status"] == "completed" and t,
        timeout=120,
        what="the second task to be started by the CLI and finish",
    )
    assert done["queue"] is None
    assert cli_json(home, "show", a, scripted=True)["status"] == "completed"
    assert (
        read_json(home / "tasks" / b / "launch.json")["started_at"]
        >= read_json(home / "tasks" / a / "exit.json")["finished_at"]
    )
