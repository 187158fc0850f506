"""Chat beside training (issue 14): does a person chatting with a finished fine-tune slow a task that
is training? The same fixed fine-tune of builtin:tiny runs, in rotating order in one run:

- `alone`;
- `asks`: a person sends a message every PACE seconds, as the page does by default. While the task
  trains in the machine's one training slot, the chat has no place of its own and each message is
  refused at once (409, "the chat waits for training"); the one answered before the task started is
  stopped by the task's launch;
- `beside paced`: the same person, having pressed "Answer beside training" (`beside_training`):
  answered with the CPU time training leaves idle (one thread, SCHED_IDLE);
- `beside nonstop`: beside training, message after message with no pause (the worst case).

Each message goes through the studio's real POST /api/tasks/{id}/chat (64 new tokens, sampled). The
figure is the trainer's own wall time (launch.json `started_at` -> exit.json `finished_at`) over the
alone runs' median; the noise is the spread of the alone runs: a slowdown within it cannot be told
from the machine's own variation.

    PYTHONPATH=$PWD python bench/bench_chat.py [--rounds 2] [--pace 3]
"""

from __future__ import annotations

import argparse
import json
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
    """Sends message after message to `task` until stopped, PACE seconds after each answer or refusal;
    counts the replies, their tokens, the refusals (the chat waits for training) and the replies that
    a task's start stopped."""

    def __init__(self, studio: Studio, task: str, pace: float = 0.0, *, beside: bool = False) -> None:
        super().__init__(daemon=True)
        self.studio, self.task, self.pace = studio, task, pace
        self.message = {**MESSAGE, "beside_training": beside}
        self.stop = threading.Event()
        self.replies = self.tokens = self.refused = self.stopped = 0

    def run(self) -> None:
        """At least one message; more until stopped."""
        while True:
            with httpx.stream(
                "POST", f"{self.studio.url}/api/tasks/{self.task}/chat", json=self.message,
                headers=self.studio.auth, timeout=300,
            ) as r:  # fmt: skip
                if r.status_code == 409 and json.loads(r.read()).get("code") == "chat_waits_for_training":
                    self.refused += 1
                else:
                    r.raise_for_status()
                    for line in r.iter_lines():
                        if line == "event: token":
                            self.tokens += 1
                        elif line == "event: end":
                            self.replies += 1
                        elif line == "event: error":
                            self.stopped += 1
            if self.stop.wait(self.pace):
                return


SIDES = ("alone", "asks", "beside paced", "beside nonstop")


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
                for side in SIDES[i % len(SIDES) :] + SIDES[: i % len(SIDES)]:
                    pace = 0 if side == "beside nonstop" else args.pace
                    chatter = None if side == "alone" else Chatter(studio, target, pace, beside=side != "asks")
                    if chatter:
                        chatter.start()
                    _, wall = finish(studio, CONFIG, f"bench {side}")
                    run: dict[str, Any] = {"side": side, "trainer_s": round(wall, 3)}
                    if chatter:
                        chatter.stop.set()
                        chatter.join(timeout=120)
                        run.update(
                            replies=chatter.replies, tokens=chatter.tokens, refused=chatter.refused,
                            stopped=chatter.stopped,
                        )  # fmt: skip
                    runs.append(run)
                    print(f"round {i + 1} {side:14}: trainer {wall:.2f}s {run}  (load {load_average()})", flush=True)
        finally:
            tear_down(studio, home, args.keep)
    by = {side: [r["trainer_s"] for r in runs if r["side"] == side] for side in SIDES}
    alone = median(by["alone"])
    noise = (max(by["alone"]) - min(by["alone"])) / alone if len(by["alone"]) > 1 else float("nan")

    def said(side: str) -> str:
        mine = [r for r in runs if r["side"] == side]
        counts = ", ".join(f"{sum(r[k] for r in mine)} {k}" for k in ("replies", "refused", "stopped"))
        return f"{side} {median(by[side]) / alone:.3f} ({counts})"

    figures = [
        Figure(
            "Chat beside training",
            f"trainer wall with chat / alone ({alone:.2f} s, median of {args.rounds}): "
            f"{'; '.join(said(side) for side in SIDES[1:])}; a message {args.pace:g} s after each answer or "
            f"refusal, none between for nonstop; noise (spread of the alone runs): {noise:.1%}",
            "informational",
            None,
            details={"runs": runs},
        )
    ]
    report(figures, args.json_out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
