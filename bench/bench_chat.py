"""Chat beside training (issue 14): does a person chatting with a finished fine-tune slow a task that
is training? The same fixed fine-tune of builtin:tiny runs alone, while the page's chat answers a
message every PACE seconds (a person reading the reply and typing the next: `paced`), and while it
answers message after message with no pause (`nonstop`, the worst case), in rotating order in the
same run (POST /api/tasks/{id}/chat, 64 new tokens each, sampled); the trainer's own wall time
(launch.json `started_at` -> exit.json `finished_at`) is compared.

The noise is how far apart the runs of one kind are (the larger spread of the two kinds): a slowdown
within it cannot be told from the machine's own variation. The chat worker runs at nice 19, so on the
CPU it takes what training leaves.

    PYTHONPATH=$PWD python bench/bench_chat.py [--rounds 2] [--pace 3]
"""

from __future__ import annotations

import argparse
import tempfile
import threading
from pathlib import Path
from typing import Any

import httpx
from common import (
    Figure,
    Studio,
    add_common_args,
    bench_env,
    load_average,
    median,
    report,
    tear_down,
    trainer_seconds,
    wait_completed,
)

CONFIG: dict[str, Any] = {
    "preset": "cpu-demo",
    "data": {"validation": "0", "max_length": 64},
    "optim": {"max_steps": 80, "batch_size": 4, "seed": 3},
    "checkpoint": {"every_steps": 1000},
    "logging": {"eval_on_start": False},
}
MESSAGE = {
    "messages": [{"role": "user", "content": "Tell me about rivers and stones."}],
    "max_new_tokens": 64,
    "temperature": 1.0,
}


def finish(studio: Studio, config: dict[str, Any], name: str) -> tuple[str, float]:
    """Submit and wait; (task id, the trainer's wall seconds)."""
    r = studio.http.post("/api/tasks", json={"name": name, "config": config})
    r.raise_for_status()
    tid = r.json()["id"]
    wait_completed(studio, tid, timeout=900)
    return tid, trainer_seconds(studio.home, tid)


class Chatter(threading.Thread):
    """Sends message after message to `task` until stopped; counts the replies and their tokens."""

    def __init__(self, studio: Studio, task: str, pace: float = 0.0) -> None:
        super().__init__(daemon=True)
        self.studio, self.task, self.pace = studio, task, pace
        self.stop = threading.Event()
        self.replies = self.tokens = 0

    def run(self) -> None:
        """At least one message; more until stopped."""
        while True:
            with httpx.stream(
                "POST", f"{self.studio.url}/api/tasks/{self.task}/chat", json=MESSAGE, headers=self.studio.auth,
                timeout=300,
            ) as r:  # fmt: skip
                r.raise_for_status()
                for line in r.iter_lines():
                    if line == "event: token":
                        self.tokens += 1
                    elif line == "event: end":
                        self.replies += 1
            if self.stop.wait(self.pace):
                return


SIDES = ("alone", "paced", "nonstop")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--pace", type=float, default=3.0, help="seconds between a reply and the next message")
    add_common_args(parser)
    args = parser.parse_args()
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="ftstudio-bench-chat-") as tmp:
        home = Path(tmp) / "home"
        home.mkdir()
        studio = Studio(home, bench_env(home, product=args.product)).start(timeout=120)
        try:
            target, _ = finish(studio, {**CONFIG, "optim": {**CONFIG["optim"], "max_steps": 4}}, "chat target")
            warm = Chatter(studio, target)  # one message: the worker has the model loaded before any run
            warm.stop.set()
            warm.run()
            for i in range(args.rounds):
                for side in SIDES[i % 3 :] + SIDES[: i % 3]:
                    chatter = None if side == "alone" else Chatter(studio, target, args.pace if side == "paced" else 0)
                    if chatter:
                        chatter.start()
                    _, wall = finish(studio, CONFIG, f"bench {side}")
                    run: dict[str, Any] = {"side": side, "trainer_s": round(wall, 3)}
                    if chatter:
                        chatter.stop.set()
                        chatter.join(timeout=120)
                        run.update(replies=chatter.replies, tokens=chatter.tokens)
                    runs.append(run)
                    print(f"round {i + 1} {side:7}: trainer {wall:.2f}s {run}  (load {load_average()})", flush=True)
        finally:
            tear_down(studio, home, args.keep)
    by = {side: [r["trainer_s"] for r in runs if r["side"] == side] for side in SIDES}
    alone = median(by["alone"])
    noise = (max(by["alone"]) - min(by["alone"])) / alone if len(by["alone"]) > 1 else float("nan")
    words = "; ".join(
        f"{side} {median(by[side]) / alone:.3f} ({sum(r.get('replies', 0) for r in runs if r['side'] == side)} replies)"
        for side in ("paced", "nonstop")
    )
    figures = [
        Figure(
            "Chat beside training",
            f"trainer wall with chat / alone ({alone:.2f} s, median of {args.rounds}): {words}; a message every "
            f"{args.pace:g} s after each reply for paced; noise (spread of the alone runs): {noise:.1%}",
            "informational",
            None,
            details={"runs": runs},
        )
    ]
    report(figures, args.json_out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
