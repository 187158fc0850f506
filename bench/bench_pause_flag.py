"""What agreeing on a pause costs a multi-process run: one all-reduce of one int per step.

    PYTHONPATH=$PWD python bench/bench_pause_flag.py [--iterations 2000]

Starts 2 gloo ranks on the CPU (as `resources.processes = 2` does without GPUs) and times
`PauseCallback.agreed`, the collective each rank runs at every step end, against the
median step of builtin:tiny measured by the pause tests (about 0.1-0.25 s on a 2-core
machine). Prints one JSON line from rank 0.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def rank_main(iterations: int) -> None:
    import torch.distributed as dist
    from transformers import TrainingArguments

    from ftstudio.pause import PauseRequest
    from ftstudio.training.progress import PauseCallback

    args = TrainingArguments(output_dir="/tmp/unused", use_cpu=True, ddp_backend="gloo", report_to="none")
    callback = PauseCallback(PauseRequest())
    assert args.world_size == 2 and dist.is_initialized()
    for _ in range(50):  # warm-up: connections, first-call allocations
        callback.agreed(args)
    times = []
    for _ in range(iterations):
        t = time.perf_counter()
        callback.agreed(args)
        times.append(time.perf_counter() - t)
    if dist.get_rank() == 0:
        times.sort()
        print(
            json.dumps(
                {
                    "iterations": iterations,
                    "median_us": round(statistics.median(times) * 1e6, 1),
                    "p99_us": round(times[int(len(times) * 0.99)] * 1e6, 1),
                    "load_average": os.getloadavg()[0],
                }
            )
        )
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=2000)
    parser.add_argument("--rank", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank:
        rank_main(args.iterations)
        return
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max-restarts=0"]
    subprocess.run([*cmd, __file__, "--rank", "--iterations", str(args.iterations)], env=env, check=True)


if __name__ == "__main__":
    main()
