"""The chaos figures of issue 12: tests/test_chaos.py, run with more rounds of its seeded random
schedule, and its figures printed for docs/benchmarks.md ("Chaos and recovery").

Every scenario of the suite runs once (real studios, runners and trainers of builtin:tiny, killed on
purpose); the random schedule runs `--rounds` rounds. The figures: scenarios run, kills delivered,
tasks lost (goal 0), duplicate runners seen (goal 0), orphans left (goal 0), steps lost per crash
(goal: at most one checkpoint interval), time from a studio's start to every task reattached or
resumed.

    PYTHONPATH=$PWD python bench/bench_chaos.py [--rounds 3] [--seed 1212] [-k random_schedule]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import PY, ROOT, command_line, load_average

ROWS = [
    ("scenarios run", "scenarios run", None),
    ("kills delivered", "kills delivered", None),
    ("tasks", "tasks", None),
    ("tasks lost", "tasks lost", "0"),
    ("duplicate runners seen", "duplicate runners seen", "0"),
    ("orphans left", "orphans left", "0"),
    ("crashes resumed", "crashes resumed", None),
    ("steps lost per crash, max / median", "steps lost per crash (max / median)", "≤ one interval"),
    (
        "steps lost per crash, newest checkpoint broken on purpose, max",
        "steps lost per crash with the newest checkpoint broken (max)",
        "≤ two intervals",
    ),
    ("checkpoint interval (steps)", "checkpoint interval", None),
    ("studio start -> every task reattached or resumed, s (median / max)", "recovery s (median / max)", None),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the random schedule (FTSTUDIO_CHAOS_ROUNDS)")
    parser.add_argument("--seed", type=int, default=1212, help="seed of the schedule (FTSTUDIO_CHAOS_SEED)")
    parser.add_argument("-k", dest="select", default="", help="only the scenarios pytest -k selects")
    parser.add_argument("--json-out", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="ftstudio-chaos-") as tmp:
        out = Path(tmp) / "figures.json"
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "FTSTUDIO_CHAOS_ROUNDS": str(args.rounds),
            "FTSTUDIO_CHAOS_SEED": str(args.seed),
            "FTSTUDIO_CHAOS_REPORT": str(out),
        }
        cmd = [PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_chaos.py"]
        if args.select:
            cmd += ["-k", args.select]
        print(f"running {' '.join(cmd[1:])}, {args.rounds} round(s), seed {args.seed}; load {load_average()}")
        t0 = time.monotonic()
        run = subprocess.run(cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, check=False)
        wall = time.monotonic() - t0
        if not out.exists():
            print("the suite wrote no figures", file=sys.stderr)
            return 1
        figures = json.loads(out.read_text())

    print()
    print(f"command: {command_line()}")
    print(f"load average now: {load_average()}; suite wall time {wall:.0f} s; pytest exit {run.returncode}")
    print("| figure | value | goal |")
    print("| --- | --- | --- |")
    for label, key, goal in ROWS:
        value = figures.get(key)
        shown = " / ".join(str(v) for v in value) if isinstance(value, list) else str(value)
        print(f"| {label} | {shown} | {goal or ''} |")
    for line in figures.get("lost", []):
        print(f"lost: {line}")
    if args.json_out:
        args.json_out.write_text(json.dumps({**figures, "command": command_line(), "wall_s": wall}, indent=1) + "\n")
    return 0 if run.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
