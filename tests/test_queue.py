"""The persistent queue with real processes: a scripted trainer under the real runner, a real
studio server that is SIGKILLed while tasks wait, and GPU leases against a fake device list
(FTSTUDIO_GPUS; these machines have no GPU)."""

from __future__ import annotations

import itertools
import signal
from pathlib import Path
from typing import Any

import pytest
from support import Studio, cli_json, run_cli, wait_for

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
def test_slots_are_remembered_and_gpus_are_leased_one_task_each(home: Path, studio_factory: Any) -> None:
    studio = studio_factory(scripted=True, FTSTUDIO_GPUS="0,1").start("--slots", "2")
    cpu = [submit(studio, f"scripted steps=40 delay=0.1 cpu{i}", gpus=0) for i in range(2)]
    gpu = [submit(studio, f"scripted steps=40 delay=0.1 gpu{i}", gpus=1) for i in range(3)]
    pinned = submit(studio, "scripted steps=2 delay=0.1 pinned", gpu_ids="1")
    for task_id in [*cpu, *gpu[:2]]:
        assert studio.task(task_id)["status"] in ("preparing", "training")
    held = {tuple(studio.task(t)["resources"]) for t in gpu[:2]}
    assert held == {("gpu:0",), ("gpu:1",)}
    third, waits_for_1 = studio.task(gpu[2]), studio.task(pinned)
    assert third["status"] == "queued" and third["queue"]["position"] == 1
    assert third["queue"]["reason"].startswith("waiting for 1 GPU (none free; GPUs 0, 1 held by tasks")
    holder_of_1 = next(t for t in gpu[:2] if studio.task(t)["resources"] == ["gpu:1"])
    assert (
        waits_for_1["queue"]["reason"] == f"waiting behind task {gpu[2]} for GPU 1"
        or waits_for_1["queue"]["reason"] == f"waiting for GPU 1, held by task {holder_of_1}"
    )

    # Each trainer sees exactly its own GPU, numbered the way nvidia-smi numbers them; CPU tasks see none.
    wait_for(lambda: all(Store(home / "studio.db").events(t, kinds=("status",)) for t in [*cpu, *gpu[:2]]))
    seen = {first_status_event(home, t)["cuda_visible_devices"] for t in gpu[:2]}
    assert seen == {"0", "1"}
    assert first_status_event(home, gpu[0])["cuda_device_order"] == "PCI_BUS_ID"
    assert {first_status_event(home, t)["cuda_visible_devices"] for t in cpu} == {""}

    for task_id in [*cpu, *gpu, pinned]:
        assert studio.wait_status(task_id, "completed", "failed", timeout=180)["status"] == "completed"
    assert first_status_event(home, pinned)["cuda_visible_devices"] == "1"
    studio.stop()
    # --slots was written into the home: the next studio and the CLI read it without the flag.
    assert cli_json(home, "queue", FTSTUDIO_GPUS="0,1")["slots"] == 2


def test_requests_this_machine_cannot_meet_are_refused_at_submit(home: Path) -> None:
    r = run_cli(home, "submit", "--preset", "cpu-demo", "--gpus", "1", scripted=True, FTSTUDIO_GPUS="none")
    assert r.returncode == 2
    assert "resources.gpus (--gpus): asks for 1 GPU(s) but this machine has no GPU" in r.stderr
    assert "leave --gpus unset or 0 to train on the CPU" in r.stderr
    r = run_cli(home, "submit", "--preset", "cpu-demo", "--gpu-ids", "0,5", scripted=True, FTSTUDIO_GPUS="0,1")
    assert r.returncode == 2 and "GPU 5 is not on this machine; it has GPUs 0, 1" in r.stderr
    r = run_cli(home, "submit", "--preset", "cpu-demo", "--memory", "lots", scripted=True)
    assert r.returncode == 2 and "resources.memory (--memory): must be a size such as 8G" in r.stderr
    r = run_cli(home, "submit", "--preset", "cpu-demo", "--nodes", "2", scripted=True)
    assert r.returncode == 2
    assert "resources.nodes (--nodes): asks for 2 machines, but this studio runs tasks on this machine" in r.stderr
    r = run_cli(home, "submit", "--preset", "cpu-demo", "--nodes", "0", scripted=True)
    assert r.returncode == 2 and "resources.nodes (--nodes)" in r.stderr
    r = run_cli(home, "studio", "start", "--slots", "0")
    assert r.returncode == 2 and "--slots: must be between 1 and 256 (got 0)" in r.stderr
    assert cli_json(home, "tasks")["total"] == 0  # nothing was recorded


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
