"""The time per epoch: the range from timed steps (calibration.py), what the measurement is kept by, the studio's side
of it (estimates.py), and the whole path with real processes: the CLI times builtin:tiny, a submit with the same
settings records the estimate, the real run ends and its page says how far off the estimate was."""

from __future__ import annotations

import fcntl
import json
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from support import api_client, in_memory

from ftstudio.config import TrainingConfig
from ftstudio.errors import Conflict
from ftstudio.studio.estimates import Estimates, against_run, stopped_by
from ftstudio.training import calibration
from ftstudio.training.calibration import (
    BASE_ERROR,
    CONFIDENCE_T,
    WARMUP,
    compare,
    figures,
    interval,
    line,
    measured,
    measurement,
    timing_settings,
    words,
)


def test_steady_steps_give_the_narrowest_range_around_mean_times_steps() -> None:
    found = interval([0.5] * 8, 100)
    assert found["epoch_s"] == pytest.approx(50.0)
    assert found["half"] == BASE_ERROR
    assert (found["low_s"], found["high_s"]) == pytest.approx((50 * (1 - BASE_ERROR), 50 * (1 + BASE_ERROR)))


def test_scattered_steps_widen_the_range_by_students_t() -> None:
    steps = [1.0, 3.0, 1.0, 3.0, 1.0, 3.0, 1.0, 3.0]  # mean 2, sample standard deviation sqrt(8/7)
    found = interval(steps, 1000)
    se = math.sqrt(8 / 7) / math.sqrt(8) * math.sqrt(992 / 999)
    assert found["epoch_s"] == pytest.approx(2000.0)
    assert found["half"] == pytest.approx(CONFIDENCE_T[7] * se / 2)
    assert found["half"] > BASE_ERROR


def test_a_sample_that_is_the_whole_epoch_has_no_sampling_error() -> None:
    found = interval([1.0, 3.0, 2.0], 3)
    assert found["epoch_s"] == pytest.approx(6.0) and found["half"] == BASE_ERROR
    with pytest.raises(ValueError, match="no step was timed"):
        interval([], 10)


def test_the_warm_up_steps_are_not_counted() -> None:
    events = [
        {"kind": "train_begin", "steps_per_epoch": 23, "device": "cpu"},
        *({"kind": "progress", "step": s, "step_s": float(s)} for s in range(1, 11)),
        {"kind": "progress", "step": 11},  # no timed step in it
        {"kind": "eval", "step": 11},
    ]
    steps, begin = measured(events)
    assert steps == {s: float(s) for s in range(WARMUP + 1, 11)} and begin["steps_per_epoch"] == 23


def test_a_run_that_scores_its_reference_ahead_is_timed_without_the_steps_reference_passes() -> None:
    begin = {"steps_per_epoch": 100, "device": "cpu"}
    raw = measurement({3: 1.0, 4: 1.2, 5: 1.1}, begin, {3: 0.25, 4: 0.3, 5: 0.35}, 9.0, "m")
    dpo = TrainingConfig.from_dict({"method": "dpo", "optim": {"epochs": 2}})
    found = figures(raw, dpo)
    assert found["step_s"] == pytest.approx(0.8) and found["reference_pass_s"] == pytest.approx(30.0)
    assert found["total_steps"] == 200 and "plus 30 s scoring the reference before the first step" in line(found)
    # The same measurement for a run under an epoch (auto: no scoring ahead), SimPO (no reference) and sft: the
    # steps as timed. Which it is depends on the asking settings' length, which the key leaves out.
    for config in ({"method": "dpo", "optim": {"epochs": 0.5}}, {"method": "dpo", "preference": {"loss": "simpo"}},
                   {"method": "sft"}):  # fmt: skip
        found = figures(raw, TrainingConfig.from_dict(config))
        assert found["step_s"] == pytest.approx(1.1) and "reference_pass_s" not in found, config
    whole = TrainingConfig.from_dict({"method": "dpo", "adapter": "full"})
    assert "scores its reference over all the data first" in str(Estimates.unsupported(whole, "local"))
    assert Estimates.unsupported(dpo, "local") is None
    assert "Slurm" in str(Estimates.unsupported(dpo, "slurm"))


def test_the_measurement_is_kept_per_setting_that_changes_a_step() -> None:
    base = TrainingConfig.from_dict({"data": {"path": "builtin:sample"}})
    same = TrainingConfig.from_dict(
        {"data": {"path": "builtin:sample"}, "optim": {"epochs": 7, "learning_rate": 1e-5, "seed": 3},
         "checkpoint": {"every_steps": 5}, "evaluation": {"max_new_tokens": 9}, "resources": {"priority": 4}}
    )  # fmt: skip
    assert timing_settings(base) == timing_settings(same)
    for changed in ({"optim": {"batch_size": 8}}, {"data": {"max_length": 64}}, {"lora": {"rank": 4}},
                    {"model": {"name": "other"}}, {"method": "orpo"}, {"data": {"validation": "0"}}):  # fmt: skip
        other = TrainingConfig.from_dict({"data": {"path": "builtin:sample"}} | changed)
        if "data" in changed:
            other.data.path = "builtin:sample"
        assert timing_settings(other) != timing_settings(base), changed


def test_the_key_follows_the_data_and_the_device(tmp_path: Path) -> None:
    config = TrainingConfig()
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "a"}\n')
    first = calibration.key(config, [data], None)
    assert calibration.key(config, [data], None) == first
    assert calibration.key(config, [data], "NVIDIA H100") != first
    data.write_text('{"text": "b"}\n')
    assert calibration.key(config, [data], None) != first


def test_a_finished_run_is_held_against_its_estimate() -> None:
    estimate = {"low_s": 80.0, "epoch_s": 100.0, "high_s": 120.0, "steps_per_epoch": 50, "step_s": 2.0,
                "steps_timed": 8, "device": "cpu"}  # fmt: skip
    assert compare(estimate, 2.5, 50) == {"epoch_s": 125.0, "error": -0.2, "within_range": False}
    assert compare(estimate, 1.9, 50) == {"epoch_s": 95.0, "error": 0.0526, "within_range": True}
    shown = against_run(estimate, {"step_s": 1.9, "steps_per_epoch": 50})
    assert shown["line_measured"] == "measured 1 min 35 s per epoch; the estimate's middle was 5% high"
    assert "line_measured" not in against_run(estimate, None)
    assert "line_measured" not in against_run(estimate, {"step_s": "fast", "steps_per_epoch": 50})
    assert words(1.58) == "1.6 s" and words(9.97) == "10 s" and words(42) == "42 s"
    assert words(200) == "3 min 20 s" and words(7500) == "2 h 05 min"


def test_the_studios_side_says_none_running_done_and_failed(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    estimates = Estimates((), cache)
    key = "a" * 32
    cfg = TrainingConfig()
    assert estimates.state(key, cfg)["state"] == "none"
    # A marker whose process is gone (the studio that started it stopped) is stale, not running.
    (cache / f"{key}.running").write_text(json.dumps({"pid": 2**22 + 7, "started": 1}))
    assert estimates.state(key, cfg)["state"] == "none"
    (cache / f"{key}.json").write_text(json.dumps({"state": "failed", "message": "out of memory"}))
    assert estimates.state(key, cfg) == {"state": "failed", "message": "out of memory", "key": key}
    raw = measurement({s: 0.5 for s in range(3, 11)}, {"steps_per_epoch": 20, "device": "cpu"}, {}, 9.0, "m")
    (cache / f"{key}.json").write_text(json.dumps({**raw, "busy": 1}))
    line_ = estimates.state(key, cfg)["line"]
    assert line_.startswith("time per epoch about 8.0 s - 12 s (middle 10 s, 20 steps of 0.5 s, 8 timed on cpu)")
    assert "measured while 1 other fine-tune(s) trained here" in line_
    # Asked by its key alone, it is read for the settings that asked for it; without them, measured again.
    assert estimates.state(key)["state"] == "none"
    (cache / f"{key}.spec.json").write_text(json.dumps({"config": cfg.to_dict(), "home": str(tmp_path)}))
    assert estimates.state(key)["line"] == line_


def test_what_killed_measurements_left_is_tidied(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    dead, live = cache / f"{'d' * 32}.work-{2**22 + 9}", cache / f"{'e' * 32}.work-{os.getpid()}"
    for folder in (dead, live):
        folder.mkdir()
    (cache / f"{'d' * 32}.running").write_text(json.dumps({"pid": 2**22 + 9, "started": 1}))
    Estimates((), cache)._prune()
    assert not dead.exists() and live.is_dir() and not (cache / f"{'d' * 32}.running").exists()
    assert stopped_by(-9, cache / "k.log").startswith("the time estimate's steps were killed by SIGKILL (a SIGKILL")
    assert "exit 1" in stopped_by(1, cache / "k.log")


def test_a_step_with_an_evaluation_or_a_checkpoint_before_it_is_not_timed(monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    from ftstudio.training import progress

    callback = progress.StudioCallback(None, 1, progress.LossGuard(0.0, 1), 2, 10, {})
    clock = iter([0.0, 1.0, 5.0, 6.0, 7.5])
    monkeypatch.setattr(progress, "time", SimpleNamespace(monotonic=lambda: next(clock)))  # this module's clock only
    args, state, control = object(), object(), object()
    callback.on_step_end(args, state, control)  # step 1 (at 0): nothing before it to time from
    callback.on_step_end(args, state, control)  # step 2: 1 s
    callback.on_evaluate(args, state, control)
    callback.on_step_end(args, state, control)  # step 3: 4 s, an evaluation among them: left out
    callback.on_step_end(args, state, control)  # step 4: 1 s
    callback.on_step_end(args, state, control)  # step 5: 1.5 s
    assert callback.stats.steps_timed == 3 and callback.stats.step_s() == pytest.approx(3.5 / 3)


@pytest.mark.process
def test_one_measurement_at_a_time(tmp_path: Path) -> None:
    """A second measurement while one runs is refused (they would slow each other): the measuring process holds a
    lock for as long as it lives, whoever started it; and a running measurement is told by its live process."""
    cache = tmp_path / "cache"
    cache.mkdir()
    key = "b" * 32
    holder = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)", "ftstudio.training.calibration", f"{key}.spec.json"]
    )
    lock = (cache / "measuring.lock").open("wb")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        (cache / f"{key}.running").write_text(json.dumps({"pid": holder.pid, "started": time.time()}))
        estimates = Estimates((), cache)
        assert estimates.state(key)["state"] == "running"
        cfg = TrainingConfig.from_dict(
            {"data": {"path": "builtin:sample"}, "optim": {"batch_size": 8, "grad_accum": 1}}
        )
        with pytest.raises(Conflict, match="another time estimate is being measured"):
            estimates.start("c" * 32, cfg, {}, tmp_path / "home", 0)
        # The CLI waits its turn instead: once the other ends, it measures.
        threading.Timer(2.0, lock.close).start()
        found = estimates.start("c" * 32, cfg, {"CUDA_VISIBLE_DEVICES": ""}, tmp_path / "home", 0, wait=True)
        assert found["state"] == "done" and found["steps_per_epoch"] == 45, found
    finally:
        lock.close()
        holder.kill()
        holder.wait()


@pytest.mark.process
def test_the_api_measures_then_keeps_and_a_submit_records_it(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    service = in_memory(home, in_server=True)
    config = {"preset": "cpu-demo", "optim": {"batch_size": 2}}
    with api_client(service) as client:
        r = client.post("/api/tasks/timing", json={"config": config})
        assert r.status_code == 200 and r.json()["state"] == "none", r.text
        r = client.post("/api/tasks/timing/measure", json={"config": config})
        assert r.status_code in (200, 202), r.text
        key = r.json()["key"]
        deadline = time.monotonic() + 180
        while (found := client.get(f"/api/tasks/timing/{key}").json())["state"] == "running":
            assert time.monotonic() < deadline, "the measurement did not end"
            time.sleep(0.5)
        assert found["state"] == "done", found
        assert found["steps_timed"] == calibration.MEASURED and found["device"] == "cpu"
        assert found["low_s"] < found["epoch_s"] < found["high_s"]
        # Kept: asked again, and measured again, it answers at once with the same figures.
        assert client.post("/api/tasks/timing", json={"config": config}).json() == found
        assert client.post("/api/tasks/timing/measure", json={"config": config}).status_code == 200
        # Unless asked to measure anew.
        r = client.post("/api/tasks/timing/measure", params={"again": "true"}, json={"config": config})
        assert r.status_code == 202 and r.json()["key"] == key, r.text
        while (anew := client.get(f"/api/tasks/timing/{key}").json())["state"] == "running":
            assert time.monotonic() < deadline + 180, "the measurement did not end"
            time.sleep(0.5)
        assert anew["state"] == "done" and anew["measured_at"] > found["measured_at"], anew
        found = anew
        # Other settings that change a step are another measurement; the learning rate is not.
        other = {**config, "optim": {"batch_size": 4}}
        assert client.post("/api/tasks/timing", json={"config": other}).json()["state"] == "none"
        lr = {**config, "optim": {"batch_size": 2, "learning_rate": 1e-5}}
        assert client.post("/api/tasks/timing", json={"config": lr}).json()["state"] == "done"
        r = client.post("/api/tasks", json={"config": lr})
        assert r.status_code == 201, r.text
        assert r.json()["time_estimate"]["epoch_s"] == found["epoch_s"]
        # Bad input: a clear 4xx, nothing measured.
        for body, status, words_ in [
            ({"optim": {"learning_rate": -1}}, 422, "learning_rate"),
            ({"data": {"path": "/etc/passwd"}}, 422, "/etc/passwd"),
            ({"model": {"name": "no/such-model"}}, 422, "no/such-model"),
        ]:
            bad = client.post("/api/tasks/timing/measure", json={"config": {**config, **body}})
            assert bad.status_code == status and words_ in bad.text, bad.text
        for key_ in ("nope", "../" + "a" * 30, "A" * 32):
            assert client.get(f"/api/tasks/timing/{key_}").status_code == 404


@pytest.mark.process
def test_the_cli_times_it_and_the_finished_run_says_how_far_off_it_was(home: Path, tmp_path: Path) -> None:
    env = {**os.environ, "FTSTUDIO_HOME": str(home), "HF_HUB_OFFLINE": "1", "XDG_CACHE_HOME": str(tmp_path / "c")}
    settings = ["--set", "optim.epochs=1", "--set", "optim.batch_size=2"]

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "ftstudio", *args], capture_output=True, text=True, env=env,
                              timeout=300)  # fmt: skip

    r = cli("data", "inspect", "builtin:sample", "--rows", "0", *settings)
    assert r.returncode == 0, r.stderr
    assert "time per epoch: not measured for these settings; add --estimate" in r.stdout
    r = cli("data", "inspect", "builtin:sample", "--rows", "0", "--estimate", *settings)
    assert r.returncode == 0, r.stderr
    assert "time per epoch about" in r.stdout and "8 timed on cpu" in r.stdout, r.stdout
    timed = json.loads(cli("data", "inspect", "builtin:sample", "--json", "--measure-again", *settings).stdout)[
        "time_estimate"
    ]
    assert timed["state"] == "done" and timed["steps_per_epoch"] == 45  # 360 training rows, batches of 2, 4 a step
    r = cli("submit", "--dataset", "builtin:sample", *settings, "--wait")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "estimate: time per epoch about" in r.stderr
    task = r.stdout.strip().splitlines()[0]
    view = json.loads(cli("show", task, "--json").stdout)
    assert view["status"] == "completed"
    shown = view["time_estimate"]
    summary = json.loads((home / "tasks" / task / "adapter" / "summary.json").read_text())
    # The run took exactly the steps per epoch the estimate counted, and its error is its own measure against it.
    assert summary["steps_per_epoch"] == shown["steps_per_epoch"] == 45
    assert summary["steps_timed"] >= 40
    real = summary["step_s"] * summary["steps_per_epoch"]
    assert shown["measured"]["epoch_s"] == pytest.approx(real, abs=0.01)
    assert shown["measured"]["error"] == pytest.approx(timed["epoch_s"] / real - 1, abs=0.001)
    out = cli("show", task).stdout
    assert "estimate   time per epoch about" in out and "per epoch; the estimate's middle was" in out


@pytest.mark.process
def test_a_measurement_outlives_the_request_thread_that_started_it(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The measuring process dies with the thread that started it (PR_SET_PDEATHSIG follows the thread), and a
    web server's worker thread may end long before the steps do: the studio starts it from a thread of its own."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    service = in_memory(home)
    answers: list[dict[str, object]] = []

    def ask() -> None:
        answers.append(service.time_estimate({"preset": "cpu-demo"}, start=True, trusted=True))
        time.sleep(3)  # a worker thread idles a while, then ends: by then the process has asked to die with its parent

    asking = threading.Thread(target=ask)
    asking.start()
    asking.join()
    (answer,) = answers
    assert answer["state"] == "running"
    deadline = time.monotonic() + 180
    while (found := service.time_estimate_of(str(answer["key"])))["state"] == "running":
        assert time.monotonic() < deadline, "the measurement did not end"
        time.sleep(0.5)
    assert found["state"] == "done", found


@pytest.mark.process
def test_dpos_reference_pass_is_timed_apart(home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Against TRL's own DPO trainer: its reference pass (the adapter switched off) is found and timed, and a run of an
    epoch or more, which scores the reference ahead, is estimated without it."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    service = in_memory(home)
    config = {"preset": "cpu-demo", "method": "dpo", "data": {"path": "builtin:preferences"}, "optim": {"epochs": 1}}
    found = service.time_estimate(config, start=True, wait=True, trusted=True)
    assert found["state"] == "done", found
    assert found["reference_pass_s"] > 0 and "scoring the reference before the first step" in found["line"]
