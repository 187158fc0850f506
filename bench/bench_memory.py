"""The memory estimate before launch (ftstudio.training.estimate) against the measured peak of real runs.

    PYTHONPATH=$PWD python bench/bench_memory.py [--max-length 256] [--batches 2 8] [--out FILE.json]

Three Qwen2-architecture models of different sizes are built here (random weights, float32, saved to a local
folder with the built-in tokenizer) and each fine-tuned for 2 steps at two batch sizes by the real trainer
(`python -m ftstudio.train`), on data whose every row fills max_length (so the batch the estimate speaks of is
the one that runs). The trainer's peak resident memory comes from the kernel (`wait4`'s ru_maxrss: the true
high-water mark, not a sample). Printed per run: the estimate, the peak, and estimate / peak, which the goal
holds within 15 % either way.
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

from common import command_line, load_average  # noqa: E402

from ftstudio.config import TrainingConfig  # noqa: E402
from ftstudio.training.estimate import MiB, estimate, read_shape  # noqa: E402

SHAPES: dict[str, dict[str, Any]] = {
    "small": dict(
        hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=8192, tie_word_embeddings=True,
    ),
    "medium": dict(
        hidden_size=512, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=4,
        vocab_size=32000, tie_word_embeddings=False,
    ),
    "large": dict(
        hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4,
        vocab_size=32000, tie_word_embeddings=True,
    ),
}  # fmt: skip


def build_model(folder: Path, shape: dict[str, Any]) -> None:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from ftstudio.training.builtin import build_tokenizer

    torch.manual_seed(0)
    Qwen2ForCausalLM(Qwen2Config(max_position_embeddings=4096, **shape)).save_pretrained(folder)
    build_tokenizer().save_pretrained(folder)


def write_data(path: Path, rows: int, words_per_row: int) -> None:
    """Instruction rows whose responses run past max_length: every batch is max_length long."""
    from ftstudio.training.samples import SAMPLE_PATH

    words = " ".join(json.loads(line)["output"] for line in SAMPLE_PATH.read_text().splitlines()).split()
    rng = random.Random(0)
    with path.open("w") as f:
        for n in range(rows):
            text = " ".join(rng.choice(words) for _ in range(words_per_row))
            f.write(json.dumps({"instruction": f"Write passage {n}.", "output": text}) + "\n")


def peak_of(config: dict[str, Any], work: Path) -> tuple[int, float]:
    """Train `config` in a process of its own; its peak RSS in bytes (from the kernel) and its wall time."""
    spec = work / "config.json"
    spec.write_text(json.dumps(config))
    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "ftstudio.train", str(spec), "--output", str(work / "out")],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "FTSTUDIO_HOME": str(work / "home")},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    assert proc.stdout is not None
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        sys.exit(f"training failed ({proc.returncode}):\n{output.decode(errors='replace')[-3000:]}")
    return usage.ru_maxrss * 1024, time.monotonic() - started  # ru_maxrss is in KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--batches", type=int, nargs="+", default=[2, 8])
    parser.add_argument("--out", type=Path, default=None, help="also write the figures as JSON here")
    args = parser.parse_args()
    print(f"# {command_line()}")
    print(f"# load average {load_average()}")
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="ftstudio-bench-memory-") as tmp:
        data = Path(tmp) / "long.jsonl"
        write_data(data, rows=32, words_per_row=args.max_length * 2)
        for label, shape in SHAPES.items():
            folder = Path(tmp) / label.split()[0]
            build_model(folder, shape)
            found = read_shape(folder)
            assert found is not None
            for batch in args.batches:
                config = {
                    "model": {"name": str(folder), "dtype": "float32"},
                    "data": {"path": str(data), "max_length": args.max_length, "validation": "0"},
                    "optim": {"max_steps": 2, "batch_size": batch, "grad_accum": 1},
                    "checkpoint": {"every_steps": 1000},
                    "logging": {"eval_on_start": False},
                }
                cfg = TrainingConfig.from_dict(config)
                guess = estimate(cfg, found, on_gpu=False)
                work = Path(tmp) / f"{label.split()[0]}-{batch}"
                work.mkdir()
                peak, wall = peak_of(config, work)
                ratio = guess.bytes / peak
                within = abs(ratio - 1) <= 0.15
                print(
                    f"{label:7s} {found.params / 1e6:5.1f}M params  batch {batch:2d} x {args.max_length}: "
                    f"estimate {guess.bytes / MiB:7,.0f} MiB  peak RSS {peak / MiB:7,.0f} MiB  "
                    f"estimate/peak {ratio:.2f}  {'ok' if within else 'OUTSIDE 15%'}  ({wall:.0f} s)  "
                    + " ".join(f"{k}={v / MiB:,.0f}" for k, v in guess.parts.items()),
                    flush=True,
                )
                rows.append(
                    {"model": label, "params": found.params, "batch": batch, "length": args.max_length,
                     "estimate": guess.bytes, "peak_rss": peak, "ratio": round(ratio, 3), "within_15pct": within,
                     "parts": guess.parts}
                )  # fmt: skip
    worst = max(abs(r["ratio"] - 1) for r in rows)
    print(f"worst error {worst:.1%} over {len(rows)} runs (goal: within 15 %)")
    if args.out:
        args.out.write_text(json.dumps({"command": command_line(), "runs": rows, "worst": worst}, indent=2))


if __name__ == "__main__":
    main()
