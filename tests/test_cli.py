"""The `ftstudio` command as a user runs it (subprocesses, scripted trainer); what it refuses, in this
process (the fast tier: the conftest guard fails a test here that starts anything)."""

import json
import os
import subprocess
import sys

import pytest
from support import cli_json, home_env, run_cli, wait_for

from ftstudio.cli.main import main
from ftstudio.home import Home


@pytest.mark.process
def test_submit_show_tasks_logs_with_the_studio_down(home):
    r = run_cli(home, "submit", "--preset", "cpu-demo", "--name", "scripted steps=8 delay=0.02", scripted=True)
    assert r.returncode == 0, r.stderr
    task_id = r.stdout.strip()
    # No studio is running: read commands bring the record up to date themselves.
    shown = wait_for(lambda: (t := cli_json(home, "show", task_id))["status"] == "completed" and t, what="completed")
    assert shown["step"] == 8 and shown["total_steps"] == 8
    listing = cli_json(home, "tasks")
    assert [t["id"] for t in listing["tasks"]] == [task_id]
    logs = run_cli(home, "logs", task_id)
    assert "step 8/8" in logs.stdout and "training completed" in logs.stdout
    human = run_cli(home, "tasks")
    assert task_id in human.stdout and "completed" in human.stdout


@pytest.mark.process
def test_logs_follow_ends_with_the_task(home):
    task_id = run_cli(home, "submit", "--name", "scripted steps=20 delay=0.05", scripted=True).stdout.strip()
    r = run_cli(home, "logs", "-f", task_id, timeout=60)
    assert r.returncode == 0 and "training completed" in r.stdout


@pytest.mark.process
def test_submit_wait_returns_the_outcome(home):
    r = run_cli(home, "submit", "--name", "scripted steps=3 delay=0.01 exit=1", "--wait", scripted=True)
    assert r.returncode == 1
    assert "failed: scripted failure with exit code 1" in r.stderr


@pytest.mark.process
def test_set_and_flags_reach_the_recorded_config(home):
    r = run_cli(
        home, "submit", "--preset", "cpu-demo", "--lr", "5e-4", "--lora-rank", "4", "--set", "lora.alpha=8",
        "--set", "lora.target_modules=q_proj,v_proj", "--name", "scripted steps=1", "--json", scripted=True,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    cfg = json.loads(r.stdout)["config"]
    assert cfg["optim"]["learning_rate"] == 5e-4 and cfg["lora"]["rank"] == 4 and cfg["lora"]["alpha"] == 8
    assert cfg["lora"]["target_modules"] == ["q_proj", "v_proj"] and cfg["preset"] == "cpu-demo"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["show", "20990101-0000-ffffff"], "no task '20990101-0000-ffffff'"),
        (["show", "../../etc/passwd"], "no task '../../etc/passwd'"),
        (["cancel", "nope"], "no task 'nope'"),
        (["submit", "--lr", "-0.1"], "optim.learning_rate (--lr): must be positive"),
        (["submit", "--lora-rank", "0", "--epochs", "-1"], "lora.rank (--lora-rank): must be at least 1"),
        (["submit", "--set", "optim.nonsense=1"], "optim.nonsense: unknown setting"),
        (["submit", "--set", "noequals"], "--set: expected section.field=value"),
        (["submit", "--config", "/nonexistent.json"], "--config: cannot read"),
        (["submit", "--eval-prompts", "/no/such/prompts.jsonl"], "evaluation.prompts (--eval-prompts): no dataset"),
        (["submit", "--lr", "nan"], "optim.learning_rate (--lr): must be a finite number"),
        (["submit", "--set", "optim.epochs=inf"], "optim.epochs (--epochs): must be a finite number"),
        (["submit", "--max-steps", str(2**70)], "optim.max_steps (--max-steps): must be at most 1,000,000,000"),
        (["submit", "--method", "dance"], "method (--method): must be one of sft, pretrain"),
        (["submit", "--method", "pretrain", "--set", "data.format=alpaca"], "method pretrain trains on raw text"),
    ],
)
def test_bad_input_is_one_clear_line_and_changes_nothing(home, args, message, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert main(["tasks", "--json"]) == 0 and json.loads(capsys.readouterr().out)["total"] == 0


@pytest.mark.process
def test_bad_input_from_the_real_command_is_exit_2_and_one_line(home):
    """The same through `python -m ftstudio`, as a person runs it (every case in this process above)."""
    r = run_cli(home, "submit", "--lr", "-0.1", scripted=True)
    assert r.returncode == 2
    assert r.stderr.startswith("error: ") and "optim.learning_rate (--lr): must be positive" in r.stderr
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert cli_json(home, "tasks")["total"] == 0


@pytest.mark.process
def test_studio_lifecycle_commands(home):
    assert run_cli(home, "studio", "status").returncode == 3
    r = run_cli(home, "studio", "start", "--port", "0")
    assert r.returncode == 0 and "studio running at http://127.0.0.1:" in r.stdout, r.stdout + r.stderr
    st = cli_json(home, "studio", "status")
    assert st["running"] and st["url"].startswith("http://127.0.0.1:")
    again = run_cli(home, "studio", "start")
    assert "already running" in again.stdout
    assert "studio stopped" in run_cli(home, "studio", "stop").stdout
    assert run_cli(home, "studio", "stop").stdout.strip() == "studio is not running"


@pytest.mark.process
def test_a_reader_that_stops_early_ends_the_command_quietly(home):
    task_id = run_cli(home, "submit", "--name", "scripted steps=1", scripted=True).stdout.strip()
    wait_for(lambda: cli_json(home, "show", task_id)["status"] == "completed", what="completed")
    command = [sys.executable, "-m", "ftstudio"]
    for args in (["tasks", "--json"], ["show", task_id, "--json"]):
        # The reader is gone before the command writes a byte (`| head -c0`).
        read, write = os.pipe()
        p = subprocess.Popen([*command, *args], stdout=write, stderr=subprocess.PIPE, env=home_env(home), text=True)
        os.close(write)
        os.close(read)
        _, err = p.communicate(timeout=60)
        assert (p.returncode, err) == (141, ""), args
    # A reader that stops mid-stream (`| head -n1`), the log far longer than a pipe holds.
    with Home(home).task(task_id).log.open("a") as f:
        f.write("a line of the log\n" * 100_000)
    p = subprocess.Popen(
        [*command, "logs", task_id], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=home_env(home)
    )
    assert p.stdout is not None and p.stdout.readline()
    p.stdout.close()
    _, err = p.communicate(timeout=60)
    assert (p.returncode, err) == (141, b"")
