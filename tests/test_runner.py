"""The runner as a real process: lock, launch record, heartbeat, exit record, signals."""

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
from support import ROOT, SCRIPTED, own_id, wait_for

from ftstudio.execution.procs import tagged
from ftstudio.home import TaskDir, read_json


def make_task(tmp_path, name):
    tdir = TaskDir(tmp_path / own_id("20261122-0000-abcdef"))
    tdir.path.mkdir()
    tdir.spec.write_text(json.dumps({"format": 1, "task_id": tdir.path.name, "name": name, "config": {}}))
    return tdir


def start_runner(tdir, *extra):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(SCRIPTED)])}
    with open(tdir.log, "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "ftstudio.runner", str(tdir.path), "--module", "scripted_trainer", *extra],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )


@pytest.mark.process
def test_runner_records_launch_heartbeat_and_exit(tmp_path):
    tdir = make_task(tmp_path, "scripted steps=5 delay=0.01")
    runner = start_runner(tdir)
    assert runner.wait(timeout=60) == 0
    launch = read_json(tdir.launch)
    assert launch["pid"] == runner.pid and launch["pgid"] == runner.pid and launch["boot_id"]
    assert launch["trainer_pid"] != runner.pid
    assert tdir.heartbeat.exists()
    record = read_json(tdir.exit)
    assert record["outcome"] == "completed" and record["exit_code"] == 0 and record["attempt"] == 1
    assert "training completed" in tdir.log.read_text()


@pytest.mark.process
def test_a_failing_trainer_gives_its_own_reason(tmp_path):
    tdir = make_task(tmp_path, "scripted steps=2 delay=0.01 exit=1")
    assert start_runner(tdir).wait(timeout=60) == 0
    record = read_json(tdir.exit)
    assert record["outcome"] == "failed"
    assert record["reason"] == "scripted failure with exit code 1"
    assert record["exit_code"] == 1


@pytest.mark.process
def test_a_second_runner_for_the_same_task_refuses(tmp_path):
    tdir = make_task(tmp_path, "scripted steps=100 delay=0.05")
    first = start_runner(tdir)
    try:
        wait_for(tdir.launch.exists, what="the first runner's launch record")
        second = start_runner(tdir)
        assert second.wait(timeout=60) == 75
        assert "refuses to start" in tdir.log.read_text()
        assert first.poll() is None
    finally:
        first.kill()
        first.wait()


@pytest.mark.process
def test_sigterm_with_a_cancel_request_is_forwarded_and_recorded_as_cancelled(tmp_path):
    tdir = make_task(tmp_path, "scripted steps=1000 delay=0.05 child=1")
    runner = start_runner(tdir)
    wait_for(lambda: len(tagged(tdir.path.name)) >= 2, what="trainer running")
    trainer_pid = read_json(tdir.launch)["trainer_pid"]
    assert psutil.Process(trainer_pid).environ()["FTSTUDIO_TASK_ID"] == tdir.path.name
    tdir.cancel_request.write_text("{}")  # as the studio does before a cancel's SIGTERM
    runner.send_signal(signal.SIGTERM)
    assert runner.wait(timeout=30) == 0
    record = read_json(tdir.exit)
    assert record["outcome"] == "cancelled" and record["signal"] == "SIGTERM"
    for p in tagged(tdir.path.name):  # the scripted grandchild ignores nothing but was not signalled
        p.kill()


@pytest.mark.process
def test_killing_the_runner_takes_the_trainer_down(tmp_path):
    tdir = make_task(tmp_path, "scripted steps=1000 delay=0.05")
    runner = start_runner(tdir)
    wait_for(lambda: (read_json(tdir.launch) or {}).get("trainer_pid"), what="launch record")
    trainer_pid = read_json(tdir.launch)["trainer_pid"]
    runner.kill()
    runner.wait()
    wait_for(
        lambda: not psutil.pid_exists(trainer_pid) or psutil.Process(trainer_pid).status() == "zombie",
        what="trainer death",
    )
    assert not tdir.exit.exists()  # no exit record: the supervisor must call this one dead


@pytest.mark.process
def test_a_runner_of_another_attempt_refuses_to_start(tmp_path):
    tdir = make_task(tmp_path, "scripted steps=5 delay=0.01")
    tdir.attempt.write_text("2")  # the studio launched attempt 2; this is a late attempt 1
    runner = start_runner(tdir, "--attempt", "1")
    assert runner.wait(timeout=60) == 77
    assert "is at attempt 2 but this runner was started as attempt 1; it refuses to start" in tdir.log.read_text()
    assert not tdir.launch.exists() and not tdir.exit.exists() and not tdir.heartbeat.exists()
    # Its own attempt starts.
    assert start_runner(tdir, "--attempt", "2").wait(timeout=60) == 0
    assert read_json(tdir.exit)["outcome"] == "completed"


@pytest.mark.process
def test_a_stale_runner_stops_its_own_processes_and_writes_nothing(tmp_path):
    """The studio gave up on attempt 1 and launched attempt 2 while attempt 1's runner still ran: at its
    next heartbeat it finds the attempt file changed, SIGKILLs its trainer and the trainer's child, and
    exits without an exit record."""
    tdir = make_task(tmp_path, "scripted steps=1000 delay=0.05 child=1")
    tdir.attempt.write_text("1")
    runner = start_runner(tdir, "--attempt", "1")
    try:
        wait_for(lambda: len(tagged(tdir.path.name)) >= 2, what="the trainer and its child running")
        ours = [p.pid for p in tagged(tdir.path.name)]
        tdir.attempt.write_text("2")
        changed = time.monotonic()
        assert runner.wait(timeout=30) == 77
        took = time.monotonic() - changed
        beat = tdir.heartbeat.stat().st_mtime
        wait_for(
            lambda: not any(psutil.pid_exists(p) and psutil.Process(p).status() != "zombie" for p in ours),
            timeout=10,
            what="attempt 1's processes to end",
        )
        assert not tdir.exit.exists()
        time.sleep(0.5)
        assert tdir.heartbeat.stat().st_mtime == beat
        assert "this runner (attempt 1) is stale" in tdir.log.read_text()
        print(f"stale runner noticed the new attempt and stood down in {took:.2f}s")
        assert took < 2 * 2.0 + 2  # within a heartbeat or two
    finally:
        if runner.poll() is None:
            runner.kill()
            runner.wait()
        for p in tagged(tdir.path.name):
            p.kill()


@pytest.mark.process
@pytest.mark.parametrize("bad", ["os;rm", "../x", "a b"])
def test_runner_accepts_only_module_names(tmp_path, bad):
    tdir = make_task(tmp_path, "scripted")
    r = subprocess.run(
        [sys.executable, "-m", "ftstudio.runner", str(tdir.path), "--module", bad], capture_output=True, text=True
    )
    assert r.returncode == 2 and "dotted module name" in r.stderr
    time.sleep(0)


# -- torchrun's ranks: which one failed, and whether on its own ---------------------------------------


def _ranked_task(tmp_path, rank0_error=None, **others):
    """A task dir whose attempt left rank 0's error event (if any) and the other ranks' files."""
    from ftstudio.events import EventWriter

    task = TaskDir(tmp_path / "t")
    task.path.mkdir()
    writer = EventWriter(task.events)
    writer.emit("progress", step=7, total_steps=30)
    if rank0_error is not None:
        writer.emit("error", message="rank 0 says so", error_type="RuntimeError", **rank0_error)
    writer.close()
    task.ranks.mkdir()
    for name, record in others.items():
        (task.ranks / f"{name}.json").write_text(json.dumps(record))
    return task


def test_a_rank_killed_without_a_word_interrupts_the_run(tmp_path):
    from ftstudio.execution.runner import distributed_outcome

    task = _ranked_task(tmp_path, {"peer_lost": True})
    record = distributed_outcome(task, 0, 2)
    assert (record["outcome"], record["cause"]) == ("interrupted", "run")  # counted against resume.max_restarts
    assert record["reason"].startswith("training process rank 1 of 2 was killed by a signal nobody here sent")
    assert "at step 7" in record["reason"] and "starts from the beginning" in record["reason"]


def test_a_rank_that_failed_on_its_own_fails_the_run_with_its_account(tmp_path):
    from ftstudio.execution.runner import distributed_outcome

    lost = {"message": "lost its peer", "error_type": "RuntimeError", "peer_lost": True}
    own = {"message": "out of memory: lower optim.batch_size", "error_type": "OutOfMemoryError"}
    task = _ranked_task(tmp_path, {"peer_lost": True}, **{"rank-1": lost, "rank-2": own})
    record = distributed_outcome(task, 0, 3)
    assert record == {"outcome": "failed", "reason": "rank 2: out of memory: lower optim.batch_size"}


def test_every_rank_losing_the_others_is_an_interruption_and_no_rank_is_blamed(tmp_path):
    from ftstudio.execution.runner import distributed_outcome

    lost = {"message": "lost its peer", "error_type": "RuntimeError", "peer_lost": True}
    task = _ranked_task(tmp_path, {"peer_lost": True}, **{"rank-1": lost})
    record = distributed_outcome(task, 0, 2)
    assert (record["outcome"], record["cause"]) == ("interrupted", "machine")
    assert record["reason"].startswith("the 2 training processes lost contact with each other at step 7")


def test_peer_lost_knows_a_vanished_peer_from_a_real_error():
    from ftstudio.training.trainer import peer_lost

    gloo = RuntimeError("[../gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:63709: Connection reset by peer.")
    assert peer_lost(gloo)
    assert not peer_lost(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))


@pytest.mark.process
def test_a_runner_reads_its_attempt_from_the_task_dir_and_refuses_one_that_has_ended(tmp_path):
    """A Slurm job's runner takes the attempt the task dir names (a requeued job runs the next one); started
    again before the studio named the next attempt, it refuses to run the ended one again."""
    tdir = make_task(tmp_path, "scripted steps=3 delay=0.01")
    tdir.attempt.write_text("2")
    tdir.exit.write_text(json.dumps({"outcome": "interrupted", "attempt": 2}))
    assert start_runner(tdir, "--attempt", "from-file").wait(timeout=60) == 77
    assert f"attempt 2 of task {tdir.path.name} has ended (interrupted); this run refuses" in tdir.log.read_text()
    tdir.attempt.write_text("3")  # the studio named the next attempt: it runs, as attempt 3
    assert start_runner(tdir, "--attempt", "from-file").wait(timeout=60) == 0
    assert read_json(tdir.exit)["outcome"] == "completed" and read_json(tdir.exit)["attempt"] == 3


def test_slurms_warning_is_named_as_such_and_a_shutdown_as_before(tmp_path, monkeypatch):
    """In a Slurm job a SIGUSR1 the studio did not send is Slurm's warning (sbatch --signal=B:USR1), never a
    shutdown or `docker stop`; a SIGTERM keeps the general words (the studio adds Slurm's own reason)."""
    from ftstudio.execution.runner import interrupted_record

    task = make_task(tmp_path, "scripted")
    suspended = {"step": 9, "total_steps": 30, "checkpoint": "checkpoint-9"}
    monkeypatch.setenv("SLURM_JOB_ID", "17")
    warned = interrupted_record(signal.SIGUSR1, task, suspended, None)["reason"]
    assert warned == (
        "stopped by SIGUSR1 from outside the studio (Slurm's warning before the job's time limit or a preemption) "
        "at step 9/30 after saving checkpoint-9; it resumes from there"
    )
    assert interrupted_record(signal.SIGTERM, task, suspended, None)["cause"] == "machine"
    termed = interrupted_record(signal.SIGTERM, task, suspended, None)["reason"]
    assert termed.startswith("stopped by SIGTERM from outside the studio (a shutdown, docker stop or a scheduler)")
    monkeypatch.delenv("SLURM_JOB_ID")
    assert (
        "(a shutdown, docker stop or a scheduler)"
        in interrupted_record(signal.SIGUSR1, task, suspended, None)["reason"]
    )
