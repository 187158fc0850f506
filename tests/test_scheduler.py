"""The queue's decision (scheduler.plan) against fake device lists: these machines have no GPU."""

from __future__ import annotations

import pytest

from ftstudio.resources import Want, cuda_env, gib, machine_gpus, parse_gpu_ids, parse_memory, want_of
from ftstudio.studio.scheduler import Lease, Waiting, plan

CPU = Want()


def w(task_id: str, want: Want = CPU, priority: int = 0, at: float = 0.0) -> Waiting:
    return Waiting(task_id, want, priority, at or float(int(task_id[1:]) if task_id[1:].isdigit() else 0))


def test_one_slot_runs_one_task_and_the_rest_wait_in_submission_order() -> None:
    p = plan([w("t3"), w("t1"), w("t2")], [], slots=1, gpus=())
    assert [g.task_id for g in p.starts] == ["t1"]
    assert p.starts[0].resources == ("slot:0",)
    assert {k: v.position for k, v in p.waits.items()} == {"t2": 1, "t3": 2}
    assert p.waits["t2"].reason == "waiting for a training slot (1 slot, held by task t1)"
    assert p.waits["t3"].reason == "waiting behind task t2 for a training slot"


def test_a_held_slot_is_not_handed_out_again() -> None:
    p = plan([w("t2")], [Lease("slot:0", "t1")], slots=1, gpus=())
    assert not p.starts and p.waits["t2"].blocked_by == ("t1",)
    p = plan([w("t2"), w("t3")], [Lease("slot:0", "t1")], slots=2, gpus=())
    assert [(g.task_id, g.resources) for g in p.starts] == [("t2", ("slot:1",))]


def test_fewer_slots_than_leases_after_the_owner_lowered_them() -> None:
    held = [Lease("slot:0", "t1"), Lease("slot:3", "t2")]
    p = plan([w("t9")], held, slots=1, gpus=())
    assert not p.starts
    assert set(p.waits["t9"].blocked_by) == {"t1", "t2"}


def test_priority_first_then_submission_order() -> None:
    p = plan([w("t1"), w("t2", priority=5), w("t3", priority=5), w("t4", priority=-1)], [], slots=1, gpus=())
    assert [g.task_id for g in p.starts] == ["t2"]
    assert [k for k, _ in sorted(p.waits.items(), key=lambda kv: kv[1].position)] == ["t3", "t1", "t4"]


def test_gpus_by_count_take_the_lowest_free_ids() -> None:
    p = plan([w("t1", Want(gpus=2)), w("t2", Want(gpus=1))], [Lease("gpu:0", "t0")], slots=1, gpus=(0, 1, 2, 3))
    assert [(g.task_id, g.gpu_ids) for g in p.starts] == [("t1", (1, 2)), ("t2", (3,))]


def test_gpu_tasks_do_not_take_slots_and_cpu_tasks_do_not_take_gpus() -> None:
    p = plan([w("t1", Want(gpus=1)), w("t2")], [], slots=1, gpus=(0,))
    assert [(g.task_id, g.resources) for g in p.starts] == [("t1", ("gpu:0",)), ("t2", ("slot:0",))]


def test_explicit_ids_wait_for_their_gpu_and_name_its_holder() -> None:
    p = plan([w("t2", Want(gpu_ids=(1,)))], [Lease("gpu:1", "t1")], slots=1, gpus=(0, 1))
    assert not p.starts
    assert p.waits["t2"].reason == "waiting for GPU 1, held by task t1"
    assert p.waits["t2"].blocked_by == ("t1",)


def test_backfill_only_with_what_nobody_ahead_waits_for() -> None:
    # t2 waits for GPU 1 (held); t3 wants GPU 0, which t2 does not want: it starts ahead of t2.
    held = [Lease("gpu:1", "t1")]
    p = plan([w("t2", Want(gpu_ids=(1,))), w("t3", Want(gpu_ids=(0,)))], held, slots=1, gpus=(0, 1))
    assert [g.task_id for g in p.starts] == ["t3"]
    # t2 wants both GPUs: GPU 0 is free but kept for it, so t3 (behind it) waits instead of starving it.
    p = plan([w("t2", Want(gpu_ids=(0, 1))), w("t3", Want(gpu_ids=(0,)))], held, slots=1, gpus=(0, 1))
    assert not p.starts
    assert p.waits["t3"].reason == "waiting behind task t2 for GPU 0"


def test_a_big_request_at_the_head_keeps_the_free_gpus() -> None:
    held = [Lease("gpu:0", "t0")]
    p = plan([w("t1", Want(gpus=2)), w("t2", Want(gpus=1))], held, slots=1, gpus=(0, 1))
    assert not p.starts
    assert p.waits["t1"].reason == "waiting for 2 GPUs (1 free; GPU 0 held by task t0)"
    assert p.waits["t2"].position == 2


def test_sharing_only_with_tasks_that_share() -> None:
    shared = [Lease("gpu:0", "t1", shared=True)]
    assert plan([w("t2", Want(gpus=1, share=True))], shared, slots=1, gpus=(0,)).starts[0].shared
    assert not plan([w("t2", Want(gpus=1))], shared, slots=1, gpus=(0,)).starts
    exclusive = [Lease("gpu:0", "t1", shared=False)]
    assert not plan([w("t2", Want(gpus=1, share=True))], exclusive, slots=1, gpus=(0,)).starts
    # Two sharing tasks in one plan may land on the same GPU.
    p = plan([w("t1", Want(gpus=1, share=True)), w("t2", Want(gpus=1, share=True))], [], slots=1, gpus=(0,))
    assert [g.task_id for g in p.starts] == ["t1"]  # in one plan a GPU is handed out once; t2 joins next look


def test_requests_the_machine_cannot_meet_say_so() -> None:
    p = plan([w("t1", Want(gpu_ids=(3,))), w("t2", Want(gpus=4))], [], slots=1, gpus=(0, 1))
    assert not p.starts
    assert p.waits["t1"].reason == "waiting for GPU 3, which this machine does not have (GPUs 0, 1)"
    assert p.waits["t2"].reason == "waiting for 4 GPUs; this machine has GPUs 0, 1"


def test_want_of_reads_the_resources_section() -> None:
    assert want_of({"gpus": -1, "processes": 2}, machine_gpus=4) == Want(gpus=2)
    assert want_of({"gpus": -1, "processes": 2}, machine_gpus=0) == Want(gpus=0)
    assert want_of({"gpus": 0}, machine_gpus=4) == Want()
    assert want_of({"gpu_ids": "2,0", "share_gpu": True}, machine_gpus=4) == Want(gpu_ids=(2, 0), share=True)


@pytest.mark.parametrize(
    ("text", "size"),
    [("8G", 8 << 30), ("512M", 512 << 20), ("1.5GiB", 3 << 29), ("2048m", 2 << 30), ("", None), (" 64M ", 64 << 20)],
)
def test_memory_sizes(text: str, size: int | None) -> None:
    assert parse_memory(text) == size


@pytest.mark.parametrize("text", ["lots", "8X", "-1G", "1G2", "63M", "0"])
def test_memory_sizes_refused(text: str) -> None:
    with pytest.raises(ValueError, match=r"must be"):
        parse_memory(text)


def test_gpu_id_lists() -> None:
    assert parse_gpu_ids("0, 2") == (0, 2)
    for bad in ("a", "0,,1", "-1", "1,1", "99999", "0x1"):
        with pytest.raises(ValueError):
            parse_gpu_ids(bad)
    assert gib(8 << 30) == "8 GiB" and gib(512 << 20) == "512 MiB"


def test_machine_gpus_override_and_visible_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FTSTUDIO_GPUS", "0,1,2")
    assert machine_gpus() == (0, 1, 2)
    monkeypatch.setenv("FTSTUDIO_GPUS", "none")
    assert machine_gpus() == ()
    assert cuda_env((1, 3)) == {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": "1,3"}
    assert cuda_env(())["CUDA_VISIBLE_DEVICES"] == ""  # a CPU task sees no GPU
