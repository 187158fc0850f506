"""DPO with the reference scored once before training (`preference.precompute_reference`) against scoring it at
every step, the same run otherwise, over a few epochs.

    PYTHONPATH=$PWD python bench/bench_dpo_reference.py [--epochs 3] [--rounds 3]

Both variants train builtin:tiny on builtin:preferences (300 pairs) with bench_dpo.py's settings for `--epochs`
epochs, taking turns, the first alternating. Precomputing moves one no-grad forward pass per pair out of the
steps into one pass before the first step, so it shows in the whole process, not in the loop: the figures are
the process's wall and CPU seconds (the model load and the tokenization are the same in both), the loop
seconds beside them, and the final loss (it must be the same: the same reference values, computed once).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_dpo import HP, PREFERENCES, run_ftstudio
from common import Figure, add_common_args, bench_env, command_line, load_average, now_utc, report

PAIRS = 300


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=float, default=3.0, help="passes over the 300 pairs")
    parser.add_argument("--rounds", type=int, default=3, help="runs per variant, taking turns")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads")
    add_common_args(parser)
    args = parser.parse_args()

    from ftstudio.training.builtin import ensure_tiny

    tmp = Path(tempfile.mkdtemp(prefix="ftstudio-bench-dpo-ref-"))
    home = tmp / "home"
    model_dir = ensure_tiny(home)
    threads = str(args.threads)
    env = bench_env(home, product=args.product, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    steps = math.ceil(PAIRS / HP["batch_size"] * args.epochs)
    variants = {"every step": {"precompute_reference": "off"}, "precomputed": {"precompute_reference": "on"}}
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in variants}
    for r in range(args.rounds):
        order = list(variants) if r % 2 == 0 else list(reversed(variants))
        for name in order:
            work = tmp / f"{name.replace(' ', '-')}-{r}"
            work.mkdir(parents=True)
            print(f"round {r + 1}/{args.rounds}: {name} ...", flush=True)
            got = run_ftstudio(model_dir, PREFERENCES, steps, env, work, preference=variants[name])
            print(f"  {got}", flush=True)
            runs[name].append(got)

    best = {name: min(found, key=lambda g: g["process_s"]) for name, found in runs.items()}
    plain, pre = best["every step"], best["precomputed"]
    rounds = [
        round(a["process_s"] / b["process_s"], 2) for a, b in zip(runs["every step"], runs["precomputed"], strict=True)
    ]
    report(
        [
            Figure(
                "dpo reference",
                f"{args.epochs:g} epochs ({steps} steps), fastest of {args.rounds}: precomputed {pre['process_s']} s "
                f"process ({pre['process_cpu_s']} CPU s, loop {pre['loop_s']} s) against every step "
                f"{plain['process_s']} s ({plain['process_cpu_s']} CPU s, loop {plain['loop_s']} s) = "
                f"{plain['process_s'] / pre['process_s']:.2f}x (round by round {', '.join(f'{x}x' for x in rounds)}); "
                f"final loss {pre['final_loss']} and {plain['final_loss']}",
                "informational",
                None,
                command_line(),
                now_utc(),
                load_average(),
            )
        ],
        args.json_out,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
