"""Run every benchmark one after the other (never two at once: they would measure each
other) and print one results table in the format of docs/benchmarks.md.

    PYTHONPATH=$PWD python bench/run_all.py [--only startup,supervisor,...]

Core benchmarks (issue 2): orchestration, supervisor, startup. Then the trainer's
(issue 3), which print their own results: `bench_trainer.py` (whole runs against a
hand-written Trainer + peft script, and MFU) and `bench_step.py` (step-loop A/B of the
trainer's own choices).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from common import BENCH, PY, ROOT, TABLE_HEAD, Figure, command_line, load_average

CORE = ["startup", "supervisor", "orchestration", "queue", "pause"]
OPTIONAL = ["trainer", "step", "upload", "job_memory", "gguf"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="comma-separated subset, e.g. startup,supervisor")
    args = parser.parse_args()
    names = [n for n in CORE + OPTIONAL if (BENCH / f"bench_{n}.py").is_file()]
    if args.only:
        wanted = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in wanted if n not in names]
        if unknown:
            parser.error(f"no benchmark {', '.join(unknown)}; available: {', '.join(names)}")
        names = wanted
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(":")}
    print(f"running {', '.join(names)}; load average {load_average()}", flush=True)
    figures: list[Figure] = []
    failed = []
    with tempfile.TemporaryDirectory(prefix="ftstudio-bench-all-") as tmp:
        for name in names:
            out = Path(tmp) / f"{name}.json"
            script = BENCH / f"bench_{name}.py"
            print(f"\n=== {name} ===", flush=True)
            # Each benchmark gets its own process: figures from one never include another's leftovers.
            # The trainer benchmarks have their own output format: they run as is and print their own results.
            extra = ["--json-out", str(out)] if name in CORE else []
            rc = subprocess.run([PY, str(script), *extra], cwd=ROOT, env=env).returncode
            if rc != 0:
                failed.append(name)
            if rc != 0 or not out.is_file():
                continue
            for item in json.loads(out.read_text()):
                figures.append(Figure(**item))
    print(f"\n=== all ({command_line()}) ===")
    print(TABLE_HEAD)
    for f in figures:
        print(f.row())
    if failed:
        print(f"\nfailed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
