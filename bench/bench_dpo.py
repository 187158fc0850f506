"""DPO throughput: ftstudio against LLaMA-Factory 0.9.5, same model, data and settings.

    PYTHONPATH=$PWD python bench/bench_dpo.py [--steps 30] [--threads 2] [--rounds 3] [--side both|ftstudio|llamafactory]

Both sides train `builtin:tiny` (the same directory, built by ftstudio) with LoRA on every
linear layer, on the same preference pairs (`ftstudio/data/preferences.jsonl`), with the
same settings (HP below): fp32 on the CPU, batch 4, no gradient accumulation, constant
learning rate, sigmoid DPO loss with beta 0.1, the adapter-less model as the reference,
no gradient checkpointing (LLaMA-Factory turns it on unless told not to; ftstudio leaves it
off), no evaluation, no checkpoint before the end, no dataloader workers, the same seed and
the same torch thread count (OMP_NUM_THREADS / MKL_NUM_THREADS).

LLaMA-Factory runs in its own virtual environment, `bench/.venv-llamafactory`, made here when
absent (about 2.5 minutes): torch==2.13.0 first (the CPU build, from this machine's disk),
then llamafactory==0.9.5 with torch held at that version, which lets pip pick its own
transformers, trl and peft (5.6.0, 0.24.0 and 0.18.1 when written). PyPI's torchvision and torchaudio are then removed from that
environment: they are built against CUDA torch (torchvision) or another torch release
(torchaudio) and fail to import next to the CPU torch, and a text-only DPO needs neither;
LLaMA-Factory imports torchaudio unconditionally (data/mm_plugin.py), so its launcher
below puts an empty module in its place.

Figures per side, from per-step timestamps (ftstudio: its events.jsonl; LLaMA-Factory: a
callback in the launcher that writes the same kinds of events):

- loop: from `train_begin` (after the model is loaded and the data tokenized) to the last
  step's log; steps/s = steps / loop seconds. The headline ratio is ftstudio's over LLaMA-Factory's,
  fastest run of each (the machine is shared: the fastest is the least disturbed), beside the
  ratio within each round (the sides take turns, the first side alternating).
- steady: seconds per step from the end of step 1 to the end of the last step (step 1 carries
  one-off work).
- process: the whole command, model load, tokenization and adapter save included; in wall
  seconds and in CPU seconds of all its threads (less moved by other programs on the cores).
- `reported_wall_s`: LLaMA-Factory's own `train_runtime` (all_results.json) and ftstudio's `wall_s`
  (train_end), as each defines it.
- the loss: first, final, and the mean of the last five steps; at equal settings they should be close.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import BENCH, PY, Figure, add_common_args, bench_env, report  # noqa: E402

LF_VERSION = "0.9.5"
LF_VENV = BENCH / ".venv-llamafactory"
TORCH = "torch==2.13.0"  # the CPU build lies on this machine's disk; anything else would pull a CUDA build
PREFERENCES = ROOT / "ftstudio" / "data" / "preferences.jsonl"
HP: dict[str, Any] = {
    "rank": 8,
    "alpha": 16,
    "max_length": 256,
    "batch_size": 4,
    "lr": 5e-5,
    "beta": 0.1,
    "loss": "sigmoid",
    "seed": 42,
}
LAST = 5  # the loss "at the end" is the mean over this many last steps

# Runs LLaMA-Factory's own entry point (`llamafactory-cli train` calls run_exp) with a callback that
# writes per-step timestamps and losses as events.jsonl-style lines. argv: config.json timeline.jsonl
LF_LAUNCHER = """
import importlib.machinery, json, sys, time, types
torchaudio = types.ModuleType("torchaudio")  # see the module docstring of bench/bench_dpo.py
torchaudio.__spec__ = importlib.machinery.ModuleSpec("torchaudio", None)
sys.modules["torchaudio"] = torchaudio
import torch
from transformers import TrainerCallback
from llamafactory.train.tuner import run_exp

config, timeline = json.loads(open(sys.argv[1]).read()), open(sys.argv[2], "w", buffering=1)

def emit(kind, **fields):
    timeline.write(json.dumps({"kind": kind, "ts": round(time.time(), 4), **fields}) + "\\n")

class Timeline(TrainerCallback):
    def on_train_begin(self, args, state, control, **kw):
        emit("train_begin", threads=torch.get_num_threads(), total_steps=state.max_steps)

    def on_log(self, args, state, control, logs=None, **kw):
        if logs and "loss" in logs:
            emit("progress", step=state.global_step, loss=logs["loss"], rewards_accuracy=logs.get("rewards/accuracies"))

run_exp(config, callbacks=[Timeline()])
"""


def ensure_llamafactory(venv: Path = LF_VENV) -> float | None:
    """Make LLaMA-Factory's virtual environment unless it is complete; the seconds it took, None if it was there.
    pip's output goes to VENV/install.log; its tail is raised with a failure."""
    if (venv / ".installed").is_file():
        return None
    started = time.monotonic()
    python = str(venv / "bin" / "python")
    if not (venv / "bin" / "python").exists():
        subprocess.run([shutil.which("python3") or "python3", "-m", "venv", str(venv)], check=True)
    print(f"making LLaMA-Factory {LF_VERSION}'s environment in {venv} (a few minutes; log in {venv / 'install.log'})")
    pip = [python, "-m", "pip", "--disable-pip-version-check"]
    with tempfile.NamedTemporaryFile("w", suffix=".txt") as pins, open(venv / "install.log", "w") as log:
        # Without the pin, torchvision/torchaudio>=... let pip replace torch with a newer CUDA build.
        pins.write(TORCH + "\n")
        pins.flush()
        for cmd in (
            [*pip, "install", TORCH],
            [*pip, "install", "-c", pins.name, f"llamafactory=={LF_VERSION}"],
            [*pip, "uninstall", "-y", "torchvision", "torchaudio"],
        ):
            print("+", " ".join(cmd), flush=True)
            log.write(f"+ {' '.join(cmd)}\n")
            log.flush()
            if subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode != 0:
                tail = (venv / "install.log").read_text(errors="replace").splitlines()[-20:]
                raise RuntimeError(f"{' '.join(cmd)} failed:\n" + "\n".join(tail))
    seconds = time.monotonic() - started
    (venv / ".installed").write_text(json.dumps({"llamafactory": LF_VERSION, "install_s": round(seconds, 1)}) + "\n")
    return seconds


def stand_in_preferences(path: Path, rows: int = 300) -> Path:
    """Preference pairs of the shipped file's shape, for a checkout from before it."""
    import random

    rng = random.Random(0)
    capitals = {"France": "Paris", "Japan": "Tokyo", "Italy": "Rome", "Spain": "Madrid", "Egypt": "Cairo"}
    with open(path, "w") as f:
        for _ in range(rows):
            country, city = rng.choice(list(capitals.items()))
            wrong = rng.choice([c for c in capitals.values() if c != city])
            row = {
                "prompt": f"What is the capital of {country}?",
                "chosen": f"The capital of {country} is {city}.",
                "rejected": rng.choice([f"The capital of {country} is {wrong}.", "I do not know."]),
            }
            f.write(json.dumps(row) + "\n")
    return path


def read_events(path: Path) -> list[dict[str, Any]]:
    """The complete JSON lines of an events file; anything else (a torn last line) is skipped."""
    events = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            events.append(record)
    return events


def run_logged(side: str, cmd: list[str], env: dict[str, str], work: Path) -> tuple[float, float]:
    """Run one side's training to its end, its output in WORK/SIDE.log; its wall and CPU seconds (all its threads).
    CPU seconds move less than wall seconds when other programs share the cores."""
    log_path = work / f"{side}.log"
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    with open(log_path, "wb") as log:
        proc = subprocess.run(cmd, env=env, cwd=work, stdout=log, stderr=subprocess.STDOUT)
    wall = time.monotonic() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        tail = log_path.read_text(errors="replace").splitlines()[-25:]
        raise RuntimeError(f"{side} exited with {proc.returncode} (log: {log_path}):\n" + "\n".join(tail))
    return wall, (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)


def figures_of(events: list[dict[str, Any]], process_s: float, cpu_s: float) -> dict[str, Any]:
    """Loop time, steps/s and losses from train_begin / progress events (key names read defensively)."""
    starts = [i for i, e in enumerate(events) if e.get("kind") == "train_begin"]
    if not starts:
        raise RuntimeError(f"no train_begin among {len(events)} events")
    begin, after = events[starts[-1]], events[starts[-1] + 1 :]  # the last attempt, were there several
    steps = [e for e in after if e.get("kind") == "progress" and isinstance(e.get("loss"), int | float)]
    end: dict[str, Any] = next((e for e in reversed(after) if e.get("kind") == "train_end"), {})
    if not steps:
        raise RuntimeError(f"no progress event with a loss after train_begin, among {len(events)} events")
    loop = steps[-1]["ts"] - begin["ts"]
    count = int(steps[-1].get("step") or len(steps))
    losses = [float(e["loss"]) for e in steps]
    steady = (steps[-1]["ts"] - steps[0]["ts"]) / (len(steps) - 1) if len(steps) > 1 else float("nan")
    return {
        "steps": count,
        "loop_s": round(loop, 2),
        "steps_per_s": round(count / loop, 3),
        "steady_s_per_step": round(steady, 3),
        "process_s": round(process_s, 2),
        "process_cpu_s": round(cpu_s, 2),
        "first_loss": round(losses[0], 4),
        "final_loss": round(float(end.get("final_loss") or losses[-1]), 4),
        f"mean_loss_last_{LAST}": round(statistics.mean(losses[-LAST:]), 4),
        "threads": begin.get("threads"),
        "reported_wall_s": end.get("wall_s"),
    }


def run_llamafactory(model_dir: Path, data: Path, steps: int, env: dict[str, str], work: Path) -> dict[str, Any]:
    """One LLaMA-Factory DPO run; its figures."""
    dataset_dir, out = work / "lf-data", work / "lf-out"
    dataset_dir.mkdir(parents=True, exist_ok=True)
    rows = [json.loads(line) for line in data.read_text().splitlines() if line.strip()]
    alpaca = [{"instruction": r["prompt"], "input": "", "chosen": r["chosen"], "rejected": r["rejected"]} for r in rows]
    (dataset_dir / "preferences.json").write_text(json.dumps(alpaca))
    info = {
        "preferences": {
            "file_name": "preferences.json",
            "ranking": True,
            "columns": {"prompt": "instruction", "query": "input", "chosen": "chosen", "rejected": "rejected"},
        }
    }
    (dataset_dir / "dataset_info.json").write_text(json.dumps(info, indent=2))
    config = {
        "model_name_or_path": str(model_dir),
        "stage": "dpo",
        "do_train": True,
        "finetuning_type": "lora",
        "lora_target": "all",
        "lora_rank": HP["rank"],
        "lora_alpha": HP["alpha"],
        "lora_dropout": 0.0,
        "pref_beta": HP["beta"],
        "pref_loss": HP["loss"],
        "dataset": "preferences",
        "dataset_dir": str(dataset_dir),
        "template": "qwen",  # ChatML, as builtin:tiny's own chat template ...
        "default_system": "",  # ... which has no default system prompt ("You are Qwen, ..." otherwise)
        "cutoff_len": HP["max_length"],
        "overwrite_cache": True,
        "output_dir": str(out),
        "overwrite_output_dir": True,
        "per_device_train_batch_size": HP["batch_size"],
        "gradient_accumulation_steps": 1,
        "max_steps": steps,
        "learning_rate": HP["lr"],
        "lr_scheduler_type": "constant",
        "warmup_ratio": 0.0,
        "seed": HP["seed"],
        "bf16": False,
        "fp16": False,
        "use_cpu": True,
        "disable_gradient_checkpointing": True,
        "logging_steps": 1,
        "save_strategy": "no",
        "eval_strategy": "no",
        "report_to": "none",
        "plot_loss": False,
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
    }
    config_path, timeline = work / "lf-config.json", work / "lf-events.jsonl"
    config_path.write_text(json.dumps(config, indent=2))
    cmd = [str(LF_VENV / "bin" / "python"), "-c", LF_LAUNCHER, str(config_path), str(timeline)]
    process_s, cpu_s = run_logged("LLaMA-Factory", cmd, env, work)
    result = figures_of(read_events(timeline), process_s, cpu_s)
    results_file = out / "all_results.json"
    lf = json.loads(results_file.read_text()) if results_file.is_file() else {}
    result["reported_wall_s"] = lf.get("train_runtime")
    result["reported_steps_per_s"] = lf.get("train_steps_per_second")
    return result


def run_ftstudio(
    model_dir: Path, data: Path, steps: int, env: dict[str, str], work: Path, preference: dict[str, Any] | None = None
) -> dict[str, Any]:
    """One ftstudio DPO run (`python -m ftstudio.train CONFIG --output DIR`); its figures. `preference`: more
    `preference.*` settings (bench_dpo_reference.py's precompute_reference)."""
    config = {
        "method": "dpo",
        "model": {"name": "builtin:tiny", "dtype": "float32", "gradient_checkpointing": False},
        "data": {"path": str(data), "max_length": HP["max_length"], "validation": "0"},
        "lora": {"rank": HP["rank"], "alpha": HP["alpha"], "dropout": 0.0},
        "optim": {
            "max_steps": steps,
            "batch_size": HP["batch_size"],
            "grad_accum": 1,
            "learning_rate": HP["lr"],
            "warmup_ratio": 0,
            "scheduler": "constant",
            "seed": HP["seed"],
        },
        "preference": {"beta": HP["beta"], "loss": HP["loss"], **(preference or {})},
        "checkpoint": {"every_steps": 10**6},
        "logging": {"every_steps": 1, "eval_on_start": False},
    }
    config_path, out = work / "ftstudio-config.json", work / "ftstudio-out"
    config_path.write_text(json.dumps(config, indent=2))
    cmd = [PY, "-m", "ftstudio.train", str(config_path), "--output", str(out)]
    process_s, cpu_s = run_logged("ftstudio", cmd, env, work)
    return figures_of(read_events(out / "events.jsonl"), process_s, cpu_s)


def fastest(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the shortest loop: on a shared machine, the one least slowed by others (a real run, not a mix)."""
    return min(runs, key=lambda r: r["loop_s"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per run (max_steps)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads, both sides")
    parser.add_argument("--rounds", type=int, default=3, help="runs per side, taking turns; the fastest is reported")
    parser.add_argument("--side", choices=("both", "ftstudio", "llamafactory"), default="both")
    parser.add_argument("--data", type=Path, default=None, help=f"preference JSONL (default: {PREFERENCES})")
    parser.add_argument("--out", type=Path, default=None, help="also write every run's figures here (JSON)")
    parser.add_argument(
        "--precompute",
        action="store_true",
        help="ftstudio scores the reference once before training (preference.precompute_reference): compare the "
        "whole process then, since that pass lies outside the loop",
    )
    add_common_args(parser)
    args = parser.parse_args()
    sides = ["llamafactory", "ftstudio"] if args.side == "both" else [args.side]
    install_s = ensure_llamafactory() if "llamafactory" in sides else None

    from ftstudio.training.builtin import ensure_tiny

    tmp = Path(tempfile.mkdtemp(prefix="ftstudio-bench-dpo-"))
    home = tmp / "home"
    threads = str(args.threads)
    common_env = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "HF_HOME": str(tmp / "hf")}
    env = {
        "ftstudio": bench_env(home, product=args.product, **common_env),
        # Nothing of this checkout on LLaMA-Factory's path; its datasets cache in the temporary folder.
        "llamafactory": {
            **{k: v for k, v in os.environ.items() if not k.startswith(("FTSTUDIO_", "PYTHON"))},
            **common_env,
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "DISABLE_VERSION_CHECK": "1",
        },
    }
    runs: dict[str, list[dict[str, Any]]] = {side: [] for side in sides}
    failed: dict[str, str] = {}
    try:
        model_dir = ensure_tiny(home)
        data = args.data or (PREFERENCES if PREFERENCES.is_file() else stand_in_preferences(tmp / "preferences.jsonl"))
        for rnd in range(args.rounds):
            # Turns alternate, so a slow minute on the shared machine does not always fall on the same side.
            for side in sides if rnd % 2 == 0 else sides[::-1]:
                if side in failed:
                    continue
                work = tmp / f"{side}-{rnd}"
                work.mkdir()
                print(f"round {rnd + 1}/{args.rounds}: {side} ...", flush=True)
                try:
                    if side == "llamafactory":
                        got = run_llamafactory(model_dir, data, args.steps, env[side], work)
                    else:
                        # Each measured as asked: `auto` would decide by the steps (on from one epoch).
                        extra = {"precompute_reference": "on" if args.precompute else "off"}
                        got = run_ftstudio(model_dir, data, args.steps, env[side], work, preference=extra)
                    runs[side].append(got)
                except RuntimeError as e:
                    failed[side] = str(e)
                    print(f"{side} failed: {e}", file=sys.stderr, flush=True)
                    continue
                print(f"  {json.dumps(runs[side][-1])}", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"kept {tmp}")

    best = {side: fastest(r) for side, r in runs.items() if r}
    details: dict[str, Any] = {
        "hp": {**HP, "steps": args.steps, "threads": args.threads, "rounds": args.rounds},
        "data": str(data),
        "llamafactory_install_s": None if install_s is None else round(install_s, 1),
        "runs": runs,
        "failed": failed,
    }
    figures = []
    for side, r in best.items():
        figures.append(
            Figure(
                "dpo",
                f"{side}: {r['steps_per_s']} steps/s ({r['loop_s']} s loop, {r['steady_s_per_step']} s/step steady, "
                f"{r['process_s']} s process, {r['process_cpu_s']} CPU s), loss {r['first_loss']} -> {r['final_loss']} "
                f"(mean of last {LAST}: {r[f'mean_loss_last_{LAST}']})",
                "informational",
                None,
                details=details,
            )
        )
    if len(best) == 2:
        ratio = best["ftstudio"]["steps_per_s"] / best["llamafactory"]["steps_per_s"]
        steady = best["llamafactory"]["steady_s_per_step"] / best["ftstudio"]["steady_s_per_step"]
        # Each round's own ratio too: the two runs of a round were minutes apart, under about the same load.
        paired = [
            round(f["steps_per_s"] / lf["steps_per_s"], 2)
            for f, lf in zip(runs["ftstudio"], runs["llamafactory"], strict=False)
        ]
        details["ratio"], details["ratio_steady"], details["ratio_by_round"] = round(ratio, 3), round(steady, 3), paired
        if args.precompute:
            # The reference pass happens before train_begin: only the whole process compares fairly.
            whole = best["llamafactory"]["process_s"] / best["ftstudio"]["process_s"]
            by_round = [
                round(lf["process_s"] / f["process_s"], 2)
                for f, lf in zip(runs["ftstudio"], runs["llamafactory"], strict=False)
            ]
            figures.append(
                Figure(
                    "dpo",
                    f"whole process, ftstudio with precompute_reference against LLaMA-Factory {LF_VERSION}, fastest "
                    f"of each: {whole:.2f}x (round by round {', '.join(f'{x:.2f}x' for x in by_round)})",
                    "≥ 1.3x",
                    whole >= 1.3,
                    details=details,
                )
            )
        figures.append(
            Figure(
                "dpo",
                f"ftstudio / LLaMA-Factory {LF_VERSION} steps/s, fastest run of each: {ratio:.2f}x "
                f"(steady {steady:.2f}x; round by round {', '.join(f'{x:.2f}x' for x in paired)})",
                "≥ 1.3x",
                ratio >= 1.3,
                details=details,
            )
        )
    if install_s is not None:
        print(f"LLaMA-Factory {LF_VERSION} environment made in {install_s:.0f} s ({LF_VENV})")
    report(figures, args.json_out)
    if args.out:
        args.out.write_text(json.dumps(details, indent=2) + "\n")
    for side, message in failed.items():
        print(f"\n{side} failed:\n{message}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
