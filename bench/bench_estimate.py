"""The time per epoch estimated before a run (ftstudio.training.calibration) against the real run's.

    PYTHONPATH=$PWD python bench/bench_estimate.py [--only NAME] [--out FILE.json]

Three models and settings, each through the product's own commands under a throw-away data home and cache:
`ftstudio data inspect DATA --config C --estimate --json` times a few real training steps, then
`ftstudio submit --config C --wait` trains the same settings, and `ftstudio show TASK --json` holds the run
against the estimate it recorded. The models are builtin:tiny and two Qwen2-architecture models built here
(bench_memory.py's "small" and "medium": random weights, the built-in tokenizer). Printed per case: the estimate's
range and middle, the real time per epoch (its mean seconds per step times its steps per epoch, evaluations and
checkpoints left out on both sides), the error of the middle, whether the real figure fell inside the range,
and what the measurement cost.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_memory import SHAPES, build_model  # noqa: E402
from common import command_line, load_average, now_utc  # noqa: E402


def varied_data(path: Path, rows: int, low: int, high: int, seed: int = 0) -> None:
    """Instruction rows whose responses run from `low` to `high` words: batches of many lengths."""
    from ftstudio.training.samples import SAMPLE_PATH

    words = " ".join(json.loads(line)["output"] for line in SAMPLE_PATH.read_text().splitlines()).split()
    rng = random.Random(seed)
    with path.open("w") as f:
        for n in range(rows):
            text = " ".join(rng.choice(words) for _ in range(rng.randint(low, high)))
            f.write(json.dumps({"instruction": f"Write passage {n}.", "output": text}) + "\n")


def cases(tmp: Path) -> dict[str, dict[str, Any]]:
    varied = tmp / "varied.jsonl"
    varied_data(varied, rows=300, low=20, high=300)
    return {
        "tiny sft": {
            "model": {"name": "builtin:tiny", "dtype": "float32"},
            "data": {"path": "builtin:sample", "max_length": 256},
            "lora": {"rank": 8, "alpha": 16},
            "optim": {"epochs": 1, "batch_size": 8, "grad_accum": 1},
        },
        "small sft, lengths 20-300 words": {
            "model": {"name": "small", "dtype": "float32"},
            "data": {"path": str(varied), "max_length": 384, "group_by_length": True},
            "lora": {"rank": 16, "alpha": 32},
            "optim": {"epochs": 1, "batch_size": 4, "grad_accum": 2},
        },
        "medium dpo": {
            "model": {"name": "medium", "dtype": "float32"},
            "method": "dpo",
            "data": {"path": "builtin:preferences", "max_length": 256},
            "lora": {"rank": 8, "alpha": 16},
            "optim": {"epochs": 1, "batch_size": 4, "grad_accum": 1},
        },
    }


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([sys.executable, "-m", "ftstudio", *args], capture_output=True, text=True, env=env, cwd=ROOT)
    if r.returncode != 0:
        sys.exit(f"ftstudio {' '.join(args)} failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    return r


def run_case(name: str, config: dict[str, Any], tmp: Path) -> dict[str, Any]:
    work = tmp / f"case-{name.split()[0]}"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FTSTUDIO_HOME": str(work / "home"),
           "XDG_CACHE_HOME": str(work / "cache"), "HF_HUB_OFFLINE": "1"}  # fmt: skip
    spec = work / "config.json"
    spec.write_text(json.dumps(config))
    started = time.monotonic()
    report = json.loads(cli(env, "data", "inspect", config["data"]["path"], "--config", str(spec), "--estimate",
                            "--json", "--rows", "0").stdout)  # fmt: skip
    measuring = time.monotonic() - started
    estimate = report["time_estimate"]
    if estimate["state"] != "done":
        sys.exit(f"{name}: no estimate: {estimate}")
    started = time.monotonic()
    task = cli(env, "submit", "--config", str(spec), "--wait").stdout.strip().splitlines()[0]
    wall = time.monotonic() - started
    shown = json.loads(cli(env, "show", task, "--json").stdout)
    real = (shown.get("time_estimate") or {}).get("measured")
    if shown["status"] != "completed" or real is None:
        sys.exit(f"{name}: the run did not end with a measurement: {shown['status']} {shown.get('time_estimate')}")
    return {
        "case": name,
        "steps_per_epoch": estimate["steps_per_epoch"],
        "low_s": estimate["low_s"],
        "epoch_s": estimate["epoch_s"],
        "high_s": estimate["high_s"],
        "real_epoch_s": real["epoch_s"],
        "error": real["error"],
        "within_range": real["within_range"],
        "reference_pass_s": estimate.get("reference_pass_s"),
        "measuring_s": round(measuring, 1),
        "run_wall_s": round(wall, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help="run only the case whose name starts with this")
    parser.add_argument("--out", type=Path, default=None, help="also write the figures as JSON here")
    args = parser.parse_args()
    print(f"# {command_line()}")
    print(f"# {now_utc()}, load average {load_average()}")
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="ftstudio-bench-estimate-") as tmp_name:
        tmp = Path(tmp_name)
        for label in ("small", "medium"):
            build_model(tmp / label, SHAPES[label])
        for name, config in cases(tmp).items():
            if args.only and not name.startswith(args.only):
                continue
            if config["model"]["name"] in SHAPES:
                config["model"]["name"] = str(tmp / config["model"]["name"])
            row = run_case(name, config, tmp)
            rows.append(row)
            print(
                f"{name:32s} {row['steps_per_epoch']:4d} steps/epoch  estimate {row['low_s']:7.1f} - "
                f"{row['high_s']:7.1f} s (middle {row['epoch_s']:7.1f})  real {row['real_epoch_s']:7.1f} s  "
                f"error {row['error']:+.1%}  {'inside' if row['within_range'] else 'OUTSIDE'} the range  "
                f"(measuring took {row['measuring_s']:.0f} s, the run {row['run_wall_s']:.0f} s)"
                + (f"  reference pass ahead {row['reference_pass_s']:.1f} s" if row["reference_pass_s"] else ""),
                flush=True,
            )
    worst = max(abs(r["error"]) for r in rows)
    inside = sum(r["within_range"] for r in rows)
    print(f"worst error of the middle {worst:.1%}; {inside} of {len(rows)} real runs inside the range")
    print(f"# load average after {load_average()}")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
