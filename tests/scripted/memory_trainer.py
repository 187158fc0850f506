"""A scripted stand-in for `ftstudio.train` that allocates memory steadily, for the
memory-limit tests. Its behaviour is read from the task name in spec.json, e.g.
"memory grow=16 steps=40 delay=0.05 child=1":

    grow   MiB allocated (and written, so it is resident) each step (default 16)
    steps  steps before it finishes (default 20)
    delay  seconds between steps (default 0.05)
    child  1: a grandchild allocates as much as the trainer, so only a limit on
           the whole task (not one process) stops it in time

Every step writes a `progress` event with `rss` (the resident bytes of this process
and its children) and `ts`, so a test can tell when the task crossed its limit.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import psutil

from ftstudio.events import EventWriter
from ftstudio.execution import memlimit

MIB = 1 << 20


def grow(mib: int, steps: int, delay: float) -> list[bytearray]:
    held = []
    for _ in range(steps):
        time.sleep(delay)
        held.append(bytearray(b"\x01") * (mib * MIB))  # filled, so every page is touched
    return held


def main() -> int:
    spec_path = Path(sys.argv[1])
    opts = dict(part.split("=", 1) for part in json.loads(spec_path.read_text())["name"].split() if "=" in part)
    mib = int(opts.get("grow", 16))
    steps = int(opts.get("steps", 20))
    delay = float(opts.get("delay", 0.05))
    if opts.get("child") == "1":
        code = f"import sys; sys.path[:0] = {sys.path!r}; import memory_trainer as m; m.grow({mib}, {steps}, {delay})"
        subprocess.Popen([sys.executable, "-c", code])
    me = psutil.Process()
    held = []
    with EventWriter(spec_path.parent / "events.jsonl") as ev:
        ev.emit("train_begin", total_steps=steps, total_epochs=1)
        for step in range(1, steps + 1):
            held += grow(mib, 1, delay)
            ev.emit("progress", step=step, total_steps=steps, rss=memlimit.sum_rss([me, *me.children(recursive=True)]))
        ev.emit("train_end", step=steps, total_steps=steps)
    (spec_path.parent / "adapter").mkdir(exist_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
