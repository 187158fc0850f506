"""Orchestration overhead on Slurm (issue 13): the same fixed fine-tune of builtin:tiny submitted to a
studio whose executor is Slurm and to one that runs tasks on this machine, alternating, in the same run.

Per run:
- submit -> first step: from the POST to the trainer's first `progress` event (its own timestamp): what
  a person waits before the curve moves (Slurm adds sbatch, scheduling and the job's start-up);
- studio wall / trainer wall: POST -> the client sees `completed`, over the runner's own record of the
  trainer (launch.json `started_at` -> exit.json `finished_at`); the trainer's noise cancels inside a run.

Needs a Slurm cluster whose nodes see this machine's files (scripts/slurm-dev-cluster up).

    SLURM_CONF=/var/lib/ftstudio-slurm/slurm.conf PYTHONPATH=$PWD python bench/bench_slurm.py [--pairs 2]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import (
    Figure,
    Studio,
    add_common_args,
    bench_env,
    load_average,
    median,
    report,
    tear_down,
    trainer_seconds,
    wait_completed,
)

CONFIG: dict[str, Any] = {
    "preset": "cpu-demo",
    "data": {"validation": "0", "max_length": 64},
    "optim": {"max_steps": 20, "batch_size": 4, "seed": 3},
    "checkpoint": {"every_steps": 100},
    "logging": {"eval_on_start": False},
}


@dataclass
class Run:
    side: str
    first_step_s: float
    wall_s: float
    trainer_s: float

    @property
    def ratio(self) -> float:
        return self.wall_s / self.trainer_s


def one(studio: Studio, side: str) -> Run:
    t0 = time.time()
    r = studio.http.post("/api/tasks", json={"name": f"bench {side}", "config": CONFIG})
    r.raise_for_status()
    tid = r.json()["id"]
    wait_completed(studio, tid, timeout=600, label=f"{side} task")
    wall = time.time() - t0
    events = studio.http.get(f"/api/tasks/{tid}/metrics").json()["events"]
    first = next(e["ts"] for e in events if e["kind"] == "progress")
    return Run(side, first - t0, wall, trainer_seconds(studio.home, tid))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--partition", default="debug")
    add_common_args(parser)
    args = parser.parse_args()
    slurm_conf = {"SLURM_CONF": os.environ["SLURM_CONF"]} if os.environ.get("SLURM_CONF") else {}
    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="ftstudio-bench-slurm-") as tmp:
        homes = {side: Path(tmp) / side for side in ("local", "slurm")}
        studios: dict[str, Studio] = {}
        try:
            flags = {"local": (), "slurm": ("--executor", "slurm", "--partition", args.partition)}
            for side, home in homes.items():
                home.mkdir()
                env = bench_env(home, product=args.product, **slurm_conf)
                studios[side] = Studio(home, env, flags=flags[side]).start(timeout=180)  # Slurm's: a check job first
            for i in range(args.pairs):
                order = ("local", "slurm") if i % 2 == 0 else ("slurm", "local")
                for side in order:
                    runs.append(one(studios[side], side))
                    r = runs[-1]
                    print(
                        f"pair {i + 1} {side:5}: first step after {r.first_step_s:.2f}s, wall {r.wall_s:.2f}s, "
                        f"trainer {r.trainer_s:.2f}s, ratio {r.ratio:.3f}  (load {load_average()})",
                        flush=True,
                    )
        finally:
            for side, studio in studios.items():
                tear_down(studio, homes[side], args.keep)
    by = {side: [r for r in runs if r.side == side] for side in ("local", "slurm")}
    first = {side: median(r.first_step_s for r in rs) for side, rs in by.items()}
    ratio = {side: median(r.ratio for r in rs) for side, rs in by.items()}
    figures = [
        Figure(
            "Slurm orchestration",
            f"submit -> first step: Slurm {first['slurm']:.2f} s, local {first['local']:.2f} s "
            f"(+{first['slurm'] - first['local']:.2f} s), median of {args.pairs}",
            "informational",
            None,
            details={"runs": [r.__dict__ for r in runs]},
        ),
        Figure(
            "Slurm orchestration",
            f"studio wall / trainer wall: Slurm {ratio['slurm']:.3f}, local {ratio['local']:.3f} "
            f"(Slurm / local {ratio['slurm'] / ratio['local']:.3f})",
            "informational",
            None,
        ),
    ]
    report(figures, args.json_out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
