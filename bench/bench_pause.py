"""Pause and resume latency (issue 11), through a real studio and the real trainer.

- Suspend: the pause request (POST /api/tasks/{id}/pause) -> every process of the task gone
  (no process in the whole table carries its tag). Goal: under one step + one checkpoint save,
  both measured in the same run from the trainer's own events: the step in flight when the pause
  came (the progress event before it -> the progress event of the step it stopped at; steps vary
  with the batch's lengths, so not a median) and the save (that progress event -> the `suspended`
  event, written once the checkpoint is complete). The median step is printed beside it.
- Resume: the resume request -> the first new step's progress event. Its baseline, from the
  same run, is the first start of the same task (submit -> first step): a resume loads the
  model and the data the same way, plus the checkpoint.

On `builtin:tiny` and on the ~20M-parameter model of bench_trainer.py (built here).

    PYTHONPATH=$PWD python bench/bench_pause.py [--rounds 3] [--models tiny,20m]
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from common import Figure, Studio, add_common_args, bench_env, median, report, tear_down, wait_for

from ftstudio.execution.procs import tagged


def progress(studio: Studio, task_id: str) -> list[dict[str, Any]]:
    events = studio.http.get(f"/api/tasks/{task_id}/metrics").json()["events"]
    return [e for e in events if e["kind"] in ("progress", "suspended")]


def measure(studio: Studio, config: dict[str, Any], rounds: int) -> dict[str, Any]:
    t_submit = time.time()
    r = studio.http.post("/api/tasks", json={"name": "pause bench", "config": config})
    r.raise_for_status()
    tid = r.json()["id"]
    first = wait_for(
        lambda: next((e for e in progress(studio, tid) if e["kind"] == "progress"), None), 600, 0.05, "a first step"
    )
    fresh_s = first["ts"] - t_submit
    out: dict[str, list[float]] = {"suspend_s": [], "step_s": [], "in_flight_s": [], "save_s": [], "resume_s": []}
    for _ in range(rounds):
        at = studio.task(tid)["step"]
        wait_for(lambda at=at: studio.task(tid)["step"] >= at + 6, 600, 0.1, "steps to time")
        steps = [e for e in progress(studio, tid) if e["kind"] == "progress"][-6:]
        out["step_s"].append(median(b["ts"] - a["ts"] for a, b in itertools.pairwise(steps)))
        t0 = time.time()
        studio.http.post(f"/api/tasks/{tid}/pause").raise_for_status()
        wait_for(lambda: not tagged(tid), 600, 0.01, "every process of the task to end")
        out["suspend_s"].append(time.time() - t0)
        wait_for(lambda: studio.task(tid)["status"] == "paused", 60, 0.05, "the task to show paused")
        evs = progress(studio, tid)
        stop = evs[-1]
        assert stop["kind"] == "suspended", stop
        last = next(e for e in reversed(evs) if e["kind"] == "progress" and e["step"] == stop["step"])
        before = next(e for e in reversed(evs) if e["kind"] == "progress" and e["step"] == stop["step"] - 1)
        out["save_s"].append(stop["ts"] - last["ts"])
        out["in_flight_s"].append(last["ts"] - before["ts"])
        t1 = time.time()
        studio.http.post(f"/api/tasks/{tid}/resume").raise_for_status()
        nxt = wait_for(
            lambda s=stop["step"]: next(
                (e for e in progress(studio, tid) if e["kind"] == "progress" and e["step"] > s), None
            ),
            600,
            0.05,
            "the first step after resume",
        )
        out["resume_s"].append(nxt["ts"] - t1)
    studio.http.post(f"/api/tasks/{tid}/cancel").raise_for_status()
    wait_for(lambda: studio.task(tid)["status"] == "cancelled", 60, 0.1, "the cancel")
    return {"fresh_s": fresh_s, **{k: median(v) for k, v in out.items()}, "rounds": out}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="pause/resume rounds per model")
    parser.add_argument("--models", default="tiny,20m", help="tiny, 20m or both")
    add_common_args(parser)
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="ftstudio-bench-pause-"))
    env = bench_env(home, product=args.product)
    studio = Studio(home, env, slots=1)
    figures = []
    try:
        studio.start()
        for name in [m.strip() for m in args.models.split(",") if m.strip()]:
            base: dict[str, Any] = {
                "preset": "cpu-demo",
                "optim": {"max_steps": 100_000, "epochs": 1000},
                "checkpoint": {"every_steps": 1_000_000},
                "data": {"validation": "0"},
            }
            if name == "20m":
                from bench_trainer import HP, build_model, make_dataset

                model_dir, data = home / "model-20m", home / "data-20m.jsonl"
                if not model_dir.exists():
                    build_model(model_dir)
                    make_dataset(data, 96)
                base["model"] = {"name": str(model_dir), "dtype": "float32"}
                base["data"] |= {"path": str(data), "max_length": HP["max_length"]}
                base["optim"] |= {"batch_size": HP["batch_size"], "grad_accum": 1}
                base["lora"] = {"rank": HP["rank"], "alpha": HP["alpha"]}
            m = measure(studio, base, args.rounds)
            rounds = m["rounds"]
            budgets = [a + b for a, b in zip(rounds["in_flight_s"], rounds["save_s"], strict=True)]
            ratios = [s / b for s, b in zip(rounds["suspend_s"], budgets, strict=True)]
            budget = median(budgets)
            print(
                f"{name}: suspend {m['suspend_s']:.2f} s (the step in flight {m['in_flight_s']:.2f} s + its checkpoint "
                f"{m['save_s']:.2f} s = {budget:.2f} s; a median step {m['step_s']:.2f} s); resume -> first step "
                f"{m['resume_s']:.2f} s (a fresh start {m['fresh_s']:.2f} s)"
            )
            figures.append(
                Figure(
                    f"suspend latency ({name})",
                    f"{m['suspend_s']:.2f} s request -> every process gone, median of {args.rounds}; the step in "
                    f"flight {m['in_flight_s']:.2f} s + its checkpoint {m['save_s']:.2f} s = {budget:.2f} s "
                    f"(ratio per round {', '.join(f'{r:.2f}' for r in ratios)}; a median step {m['step_s']:.2f} s)",
                    "< 1 step + one checkpoint save",
                    max(ratios) < 1,
                    details=m,
                )
            )
            figures.append(
                Figure(
                    f"resume latency ({name})",
                    f"{m['resume_s']:.2f} s request -> first new step, median of {args.rounds}; the task's first "
                    f"start {m['fresh_s']:.2f} s (ratio {m['resume_s'] / m['fresh_s']:.2f}; spread "
                    f"{statistics.pstdev(m['rounds']['resume_s']):.2f} s)",
                    "written down",
                    None,
                    details=m,
                )
            )
    finally:
        tear_down(studio, home, args.keep)
    report(figures, args.json_out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
