"""A lightweight stand-in for `ftstudio.train` that only emits events, for the
supervisor and start-up benchmarks (never for the orchestration one, which uses
the real trainer). The studio runs it through the real runner when started with
FTSTUDIO_TRAINER_MODULE=event_emitter and bench/ on PYTHONPATH.

Behaviour comes from the task name in spec.json, e.g. "emit rate=10 duration=120":

    rate      progress events per second (default 10)
    duration  seconds to emit for; 0 = until stopped (default 60)

Each event carries `t_wall`, the full-resolution time.time() just before the
line is written (EventWriter's own `ts` is rounded to the millisecond), so a
stream client can measure written -> delivered latency.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from ftstudio.events import EventWriter


def main() -> int:
    spec_path = Path(sys.argv[1])
    spec = json.loads(spec_path.read_text())
    opts = dict(part.split("=", 1) for part in spec["name"].split() if "=" in part)
    rate = float(opts.get("rate", 10))
    duration = float(opts.get("duration", 60))
    total = int(rate * duration) if duration > 0 else None
    with EventWriter(spec_path.parent / "events.jsonl") as ev:
        ev.emit("train_begin", total_steps=total, total_epochs=1, t_wall=time.time())
        start = time.monotonic()
        step = 0
        while total is None or step < total:
            step += 1
            # Absolute schedule: the rate stays exact however long a write takes.
            delay = start + step / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            ev.emit("progress", step=step, total_steps=total, loss=1.0, lr=1e-3, t_wall=time.time())
        ev.emit("train_end", step=step, total_steps=total, t_wall=time.time())
    return 0


if __name__ == "__main__":
    sys.exit(main())
