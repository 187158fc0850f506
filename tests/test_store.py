import json
import threading
from pathlib import Path

import pytest

from ftstudio.errors import DamagedFile, IllegalTransition, NotFound
from ftstudio.execution import facts
from ftstudio.home import TASK_ID_RE
from ftstudio.studio import lifecycle
from ftstudio.studio.scheduler import Grant
from ftstudio.studio.store import SCHEMA_VERSION, Batch, LostRace, Refused, Store, UnstorableEvent, new_task_id
from ftstudio.studio.task import TaskStatus as S


@pytest.fixture
def store(tmp_path):
    return Store(tmp_path / "studio.db")


def make(store, tmp_path, name="t"):
    return store.create_task(
        name=name, model="builtin:tiny", dataset="builtin:sample", config={"a": 1}, tasks_root=tmp_path
    )


def test_schema_is_versioned_and_wal(store, tmp_path):
    assert store.schema_version() == SCHEMA_VERSION
    assert store._conn().execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store._conn().execute("PRAGMA foreign_keys").fetchone()[0] == 1
    Store(tmp_path / "studio.db")  # reopening migrates nothing and loses nothing
    assert store.schema_version() == SCHEMA_VERSION


def test_a_newer_schema_is_refused(tmp_path):
    s = Store(tmp_path / "x.db")
    s._conn().execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(DamagedFile, match="upgrade ftstudio"):
        Store(tmp_path / "x.db")


def test_task_ids_are_path_safe():
    ids = [new_task_id() for _ in range(500)]
    assert all(TASK_ID_RE.fullmatch(i) and "/" not in i and "." not in i for i in ids)


def test_a_colliding_id_is_drawn_again(store, tmp_path, monkeypatch):
    first = make(store, tmp_path)
    draws = iter([first.id, first.id, "20261122-0000-00000001"])
    monkeypatch.setattr("ftstudio.studio.store.new_task_id", lambda now=None: next(draws))
    second = make(store, tmp_path)
    assert second.id == "20261122-0000-00000001"
    assert store.get(first.id).name == "t"


def test_transition_is_compare_and_set_with_history(store, tmp_path):
    t = make(store, tmp_path)
    t = store.transition(t.id, S.QUEUED, S.PREPARING, reason="launching", pid=42)
    assert (t.status, t.pid, t.started_at is not None) == ("preparing", 42, True)
    with pytest.raises(LostRace, match="is preparing now, not queued"):
        store.transition(t.id, S.QUEUED, S.PREPARING)
    with pytest.raises(IllegalTransition):
        store.transition(t.id, S.PREPARING, S.QUEUED)
    store.transition(t.id, S.PREPARING, S.FAILED, reason="boom", error="boom")
    assert [h["dst"] for h in store.history(t.id)] == ["queued", "preparing", "failed"]
    assert store.get(t.id).finished_at is not None


def test_concurrent_transitions_have_exactly_one_winner(store, tmp_path):
    t = make(store, tmp_path)
    results = []

    def claim():
        try:
            store.transition(t.id, S.QUEUED, S.PREPARING)
            results.append("won")
        except LostRace:
            results.append("lost")

    threads = [threading.Thread(target=claim) for _ in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert sorted(results) == ["lost"] * 7 + ["won"]


def test_ingest_is_compare_and_set_on_the_offset(store, tmp_path):
    t = make(store, tmp_path)
    evs = [
        {"kind": "progress", "step": 1, "loss": 2.0, "ts": 1.0},
        {"kind": "progress", "step": 2, "loss": 1.5, "ts": 2.0},
    ]
    stored = store.ingest(t.id, evs, new_offset=100, expect_offset=0)
    assert [e["seq"] for e in stored] == [1, 2]
    assert store.ingest(t.id, evs, new_offset=100, expect_offset=0) == []  # a second reader of the same bytes
    row = store.get(t.id)
    assert (row.step, row.loss, row.events_offset, row.events_seq) == (2, 1.5, 100, 2)
    assert [e["step"] for e in store.events(t.id)] == [1, 2]
    assert store.events(t.id, after_seq=1)[0]["seq"] == 2


def test_ingest_many_is_one_transaction_with_a_compare_and_set_per_task(store, tmp_path):
    a, b = make(store, tmp_path, "a"), make(store, tmp_path, "b")
    store.ingest(b.id, [{"kind": "progress", "step": 1}], new_offset=10, expect_offset=0)  # another reader was first
    out = store.ingest_many(
        [
            Batch(a.id, [{"kind": "progress", "step": 1, "loss": 2.0}, {"kind": "progress", "step": 2}], 50, 0),
            Batch(b.id, [{"kind": "progress", "step": 1}], 10, 0),
        ]
    )
    assert [e["seq"] for e in out[a.id]] == [1, 2]
    assert out[b.id] == []  # b's lost race stores nothing for b and costs a nothing
    assert (store.get(a.id).step, store.get(a.id).events_offset) == (2, 50)
    assert (store.get(b.id).events_seq, store.get(b.id).events_offset) == (1, 10)


def test_a_batch_leaves_the_row_as_its_events_would_one_by_one(store, tmp_path):
    t = make(store, tmp_path)
    evs = [
        {"kind": "train_begin", "total_steps": 10, "total_epochs": 1},
        {"kind": "progress", "step": 1, "loss": 2.0, "lr": 1e-4, "eta_s": 9.0},
        {"kind": "eval", "step": 1, "eval_loss": 2.5},
        {"kind": "progress", "step": 2, "loss": 1.5, "lr": 9e-5, "eta_s": 8.0, "tokens_per_s": True},
        {"kind": "status", "phase": "saving"},
        {"kind": "checkpoint", "step": 2, "loss": 99.0},  # not a progress kind: moves nothing
    ]
    store.ingest(t.id, evs, new_offset=100, expect_offset=0)
    row = store.get(t.id)
    assert (row.step, row.loss, row.lr, row.eta_s, row.eval_loss) == (2, 1.5, 9e-5, 8.0, 2.5)
    assert (row.total_steps, row.phase, row.tokens_per_s) == (10, "saving", None)  # a bool is not a number
    store.ingest(t.id, [{"kind": "train_end", "step": 10}], new_offset=120, expect_offset=100)
    assert (store.get(t.id).phase, store.get(t.id).eta_s, store.get(t.id).step) == ("done", 0, 10)


def test_lines_are_stored_as_written(store, tmp_path):
    t = make(store, tmp_path)
    line = '{"kind":"progress","step":1,"loss":1.25,"extra":{"nested":[1,2]}}'
    store.ingest_many([Batch(t.id, [json.loads(line)], len(line) + 1, 0, [line])])
    assert store._conn().execute("SELECT data FROM events").fetchone()[0] == line
    assert store.events(t.id) == [{"kind": "progress", "step": 1, "loss": 1.25, "extra": {"nested": [1, 2]}, "seq": 1}]


def test_list_is_paged_newest_first_and_filters(store, tmp_path):
    ids = [make(store, tmp_path, f"t{i}").id for i in range(5)]
    store.transition(ids[0], S.QUEUED, S.CANCELLED)
    page, total = store.page_of_tasks(limit=2, offset=0)
    assert total == 5 and [t.name for t in page] == ["t4", "t3"]
    page, _ = store.page_of_tasks(limit=2, offset=4)
    assert [t.name for t in page] == ["t0"]
    page, total = store.page_of_tasks(status="cancelled")
    assert total == 1 and page[0].id == ids[0]


def test_delete_cascades_and_respects_state(store, tmp_path):
    t = make(store, tmp_path)
    store.ingest(t.id, [{"kind": "progress", "step": 1}], 10, 0)
    store.transition(t.id, S.QUEUED, S.PREPARING)
    assert not store.delete(t.id, only_if={S.COMPLETED, S.FAILED})
    store.transition(t.id, S.PREPARING, S.FAILED, error="x")
    assert store.delete(t.id, only_if={S.COMPLETED, S.FAILED})
    with pytest.raises(NotFound):
        store.get(t.id)
    assert store._conn().execute("SELECT count(*) FROM events").fetchone()[0] == 0


def test_one_task_s_unstorable_batch_costs_that_task_alone(store, tmp_path):
    good, bad = make(store, tmp_path, "good"), make(store, tmp_path, "bad")
    out = store.ingest_many(
        [
            Batch(bad.id, [{"kind": "progress", "step": 1}, {"kind": "progress", "step": 2**70}], 80, 0),
            Batch(good.id, [{"kind": "progress", "step": 1, "loss": 2.0}, {"kind": "progress", "step": 2}], 50, 0),
        ]
    )
    assert out[bad.id] == Refused(1, "step is out of range")
    assert [e["seq"] for e in out[good.id]] == [1, 2]
    assert (store.get(good.id).step, store.get(good.id).events_offset) == (2, 50)
    # Nothing of the bad batch is stored and its offset stays, so the same bytes are not taken as read.
    assert (store.get(bad.id).events_offset, store.get(bad.id).events_seq, store.events(bad.id)) == (0, 0, [])
    # The shared transaction was rolled back and redone: nothing of the good batch is there twice.
    assert len(store.events(good.id)) == 2


def test_a_progress_field_past_64_bits_is_refused_not_raised(store, tmp_path):
    t = make(store, tmp_path)
    with pytest.raises(UnstorableEvent, match="total_steps is out of range"):
        store.ingest(t.id, [{"kind": "train_begin", "total_steps": -(2**64)}], new_offset=10, expect_offset=0)
    assert store.get(t.id).events_offset == 0


def test_values_the_row_cannot_show_are_left_out_not_fatal(store, tmp_path):
    t = make(store, tmp_path)
    evs = [
        {"kind": "progress", "step": 3, "loss": float("inf"), "lr": float("nan"), "ts": 10**400},
        {"kind": "status", "phase": "saving\ud800"},  # a lone surrogate, as json.loads reads "\ud800"
        {"kind": "odd\udcff", "step": True},
    ]
    stored = store.ingest(t.id, evs, new_offset=99, expect_offset=0)
    assert len(stored) == 3
    row = store.get(t.id)
    assert (row.step, row.loss, row.lr, row.phase) == (3, None, None, "saving?")


# -- the queue's records ---------------------------------------------------------


def test_a_claim_takes_the_task_and_its_leases_in_one_transaction(store, tmp_path):
    a, b = make(store, tmp_path, "a"), make(store, tmp_path, "b")
    store.claim(a.id, lifecycle.claim(), Grant(a.id, ("gpu:0", "gpu:1")))
    assert store.get(a.id).status == S.PREPARING and store.leases_of(a.id) == ["gpu:0", "gpu:1"]
    assert store.attempts(a.id) == [
        {"attempt": 1, "started_at": store.get(a.id).started_at, "ended_at": None, "end_reason": None,
         "end_cause": None, "resumed_from_step": None, "end_step": None}
    ]  # fmt: skip
    # The GPU went to `a` after `b`'s plan was made: b's claim changes nothing, not even its status.
    with pytest.raises(LostRace, match="gpu:1 was taken by task"):
        store.claim(b.id, lifecycle.claim(), Grant(b.id, ("gpu:1",)))
    assert store.get(b.id).status == S.QUEUED and store.leases_of(b.id) == []
    # Claimed twice: the second loses on the status.
    with pytest.raises(LostRace):
        store.claim(a.id, lifecycle.claim(), Grant(a.id, ("gpu:2",)))
    assert store.leases_of(a.id) == ["gpu:0", "gpu:1"]


def test_shared_gpus_only_among_tasks_that_share(store, tmp_path):
    a, b, c = (make(store, tmp_path, n) for n in "abc")
    store.claim(a.id, lifecycle.claim(), Grant(a.id, ("gpu:0",), shared=True))
    store.claim(b.id, lifecycle.claim(), Grant(b.id, ("gpu:0",), shared=True))
    with pytest.raises(LostRace):
        store.claim(c.id, lifecycle.claim(), Grant(c.id, ("gpu:0",)))
    assert {(lease.task_id, lease.shared) for lease in store.leases()} == {(a.id, True), (b.id, True)}


def test_a_move_off_the_machine_releases_the_leases_and_ends_the_attempt(store, tmp_path):
    a = make(store, tmp_path, "a")
    store.claim(a.id, lifecycle.claim(), Grant(a.id, ("slot:0",)))
    store.apply(a.id, lifecycle.training_began(S.PREPARING))
    assert store.leases_of(a.id) == ["slot:0"]  # still running
    freeze = lifecycle.answer(S.TRAINING, lifecycle.Action.FREEZE).move
    store.apply(a.id, freeze, frozen_at=1.0)
    assert store.leases_of(a.id) == ["slot:0"]  # frozen: its memory is still held
    assert store.release_orphans() == 0
    store.apply(a.id, lifecycle.answer(S.PAUSED, lifecycle.Action.CANCEL).move)
    assert store.leases() == []
    [attempt] = store.attempts(a.id)
    assert attempt["ended_at"] is not None and attempt["end_reason"] == "cancelled on request"


def test_orphan_leases_are_released_and_settings_are_kept(store, tmp_path):
    a = make(store, tmp_path, "a")
    store.claim(a.id, lifecycle.claim(), Grant(a.id, ("slot:0",)))
    # A task moved by an older studio, or a database copied from elsewhere: the lease outlived it.
    with store.tx() as c:
        c.execute("UPDATE tasks SET status = 'failed' WHERE id = ?", (a.id,))
    assert store.release_orphans() == 1 and store.leases() == []
    assert store.setting("slots") is None
    store.set_setting("slots", "3")
    store.set_setting("slots", "4")
    assert Store(store.path).setting("slots") == "4"


def test_a_version_1_home_is_migrated_with_its_tasks(tmp_path):
    import sqlite3

    from ftstudio.studio.store import MIGRATIONS

    conn = sqlite3.connect(tmp_path / "old.db")
    conn.executescript(MIGRATIONS[0] + "; PRAGMA user_version = 1;")
    conn.execute(
        "INSERT INTO tasks (id, name, status, model, dataset, config, task_dir, created_at, updated_at)"
        " VALUES ('20261101-0000-aaaaaaaa', 'old', 'training', 'm', 'd', '{}', '/x', 1, 1)"
    )
    conn.commit()
    conn.close()
    store = Store(tmp_path / "old.db")
    assert store.schema_version() == SCHEMA_VERSION == 5
    task = store.get("20261101-0000-aaaaaaaa")
    assert task.status == "training" and task.priority == 0 and task.frozen_at is None
    assert store.leases() == [] and store.attempts(task.id) == []


def test_a_resumed_attempt_replaces_the_steps_past_its_checkpoint(store, tmp_path):
    a = make(store, tmp_path, "a")
    store.claim(a.id, lifecycle.claim(), Grant(a.id, ("slot:0",)))
    evs = [{"kind": "progress", "step": s, "ts": float(s), "eta_s": 9.0 - s, "tokens_per_s": 50.0} for s in range(1, 8)]
    store.ingest(a.id, [{"kind": "train_begin", "ts": 0.0}, *evs], new_offset=100, expect_offset=0)
    store.apply(a.id, lifecycle.training_began(S.PREPARING))
    store.apply(a.id, lifecycle.decide(lifecycle.Facts(S.TRAINING, liveness=facts.Liveness.DEAD, step=7)))
    [ended] = store.attempts(a.id)
    assert (ended["end_step"], ended["end_cause"]) == (7, "machine")  # its runner vanished: not the run's doing
    store.apply(a.id, lifecycle.recover(S.INTERRUPTED, lifecycle.Recovery(checkpoint_step=5, end_steps=(7,))))
    store.claim(a.id, lifecycle.claim(), Grant(a.id, ("slot:0",)), resumed_from_step=5)
    # Steps 6 and 7 will be done again by attempt 2: the dead attempt's records of them are gone.
    assert [e.get("step") for e in store.events(a.id)] == [None, 1, 2, 3, 4, 5]
    assert [(x["attempt"], x["resumed_from_step"]) for x in store.attempts(a.id)] == [(1, None), (2, 5)]
    # The dead attempt's ETA and speed are not this one's.
    row = store.get(a.id)
    assert (row.step, row.eta_s, row.tokens_per_s) == (7, None, None)


# The writer for the kill test: ingests batches of progress events into one task, one transaction each,
# printing what it committed after each commit; it picks up from whatever the store holds.
_WRITER = """
import sys
from pathlib import Path
from ftstudio.studio.store import Store
store = Store(Path(sys.argv[1]))
tid = sys.argv[2]
while True:
    row = store.get(tid)
    step = row.step or 0
    events = [{"kind": "progress", "step": step + i, "loss": 1.0 / (step + i)} for i in range(1, 51)]
    store.ingest(tid, events, new_offset=row.events_offset + 5000, expect_offset=row.events_offset)
    print(step + 50, flush=True)
"""


@pytest.mark.process
@pytest.mark.slow
def test_the_store_survives_a_kill_in_the_middle_of_a_write_with_nothing_committed_lost(tmp_path):
    """SIGKILL a process while it commits batch after batch (WAL, synchronous=NORMAL): every batch it
    reported committed is there, no batch is there in part, and the database checks out whole."""
    import os
    import random
    import signal
    import subprocess
    import sys
    import time

    db = tmp_path / "studio.db"
    tid = make(Store(db), tmp_path).id
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    rng = random.Random(12)
    for _ in range(6):
        writer = subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(db), tid], stdout=subprocess.PIPE, text=True, env=env
        )
        assert writer.stdout is not None
        committed = int(writer.stdout.readline())  # it is writing now
        time.sleep(rng.uniform(0.05, 0.4))
        writer.send_signal(signal.SIGKILL)
        out, _ = writer.communicate(timeout=30)
        committed = max([committed, *map(int, out.split())])
        store = Store(db)  # a fresh connection replays the WAL, as a restarted studio's does
        assert store._conn().execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        row = store.get(tid)
        steps = [e["step"] for e in store.events(tid, limit=1_000_000)]
        assert row.step >= committed, (row.step, committed)  # nothing it reported committed is lost
        assert steps == list(range(1, row.step + 1))  # whole batches only: the row and its events agree
        assert row.events_seq == row.step and row.events_offset == row.step // 50 * 5000
        store.close()
    assert row.step >= 300, row.step  # the kills landed while it was writing, round after round
