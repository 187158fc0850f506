"""The dataset inspector on a large file (issue 25): wall time and peak resident memory of
`ftstudio data inspect FILE --json` on generated alpaca files of 100,000 and 1,000,000 rows, the smaller
one the baseline in the same run: memory that stays near the baseline's at ten times the rows is bounded.

    PYTHONPATH=$PWD python bench/bench_inspect.py [--rows 100000,1000000] [--json-out F]

Rows are 5 to 30 random words (bench_trainer.WORDS) of instruction and 5 to 60 of output (about 250 bytes of JSON a row);
builtin:tiny's tokenizer, max_length 256. The peak is the kernel's high-water mark for the process (wait4).
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

from bench_trainer import WORDS
from common import Figure, add_common_args, report


def make(path: Path, rows: int) -> None:
    rng = random.Random(0)
    with path.open("w") as f:
        for _ in range(rows):
            instruction = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 30)))
            output = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 60)))
            f.write(json.dumps({"instruction": instruction, "output": output}) + "\n")


def measure(path: Path, home: Path, cache: Path) -> tuple[float, float, dict[str, object]]:
    env = {**os.environ, "FTSTUDIO_HOME": str(home), "XDG_CACHE_HOME": str(cache), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "ftstudio", "data", "inspect", str(path), "--max-length", "256", "--json"]
    start = time.perf_counter()
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.DEVNULL, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        if status != 0:
            raise SystemExit(f"{' '.join(cmd)} failed ({status})")
        out.seek(0)
        result = json.loads(out.read())
    return seconds, usage.ru_maxrss / 1024, result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="100000,1000000")
    add_common_args(parser)
    args = parser.parse_args()
    figures = []
    root = Path(tempfile.mkdtemp(prefix="bench-inspect-"))
    base = None
    for rows in [int(r) for r in args.rows.split(",")]:
        path = root / f"rows-{rows}.jsonl"
        make(path, rows)
        seconds, rss, result = measure(path, root / "home", root / f"cache-{rows}")
        base = base or (rows, rss)
        line = (
            f"{rows:,} rows ({path.stat().st_size / 2**20:.0f} MiB): {seconds:.0f} s ({seconds / rows * 1e6:.0f} µs a row), "
            f"peak RSS {rss:.0f} MiB ({rss / base[1]:.2f}x the {base[0]:,}-row run); "
            f"{result['duplicates']['exact']:,} exact duplicates, {result['truncation']['rows']:,} rows cut"  # type: ignore[index]
        )
        print(line, flush=True)
        figures.append(Figure(f"data inspect, {rows:,} rows", line, "bounded memory", rss < 4 * base[1]))
    if not args.keep:
        import shutil

        shutil.rmtree(root, ignore_errors=True)
    report(figures, args.json_out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
