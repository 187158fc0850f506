"""Supervisor cost and event latency (issue 2).

A real studio supervises 20 running tasks (real runners; the trainer replaced by
`bench/event_emitter.py`, which writes 10 progress events/s each, so 200 events/s
flow through events.jsonl -> supervisor -> SQLite -> server-sent events).

- Cost: CPU seconds (user + system) of the studio server process over a window
  of >= 60 s that starts after all 20 tasks are `training` (start-up excluded),
  with no client connected. Reported as CPU-s per minute and % of one core, with
  the window cut into 10 s slices (median / max) and an idle baseline of the same
  server before any task was submitted. Goal: < 1 % of one core.
- Latency: a few clients read `/api/tasks/{id}/stream`; for every progress event,
  delivered time (time.time() when the client parsed it) minus written time
  (`t_wall`, set by the emitter just before it writes the line). p50 / p95 / max.
  Goal: p95 < 250 ms.

    PYTHONPATH=$PWD python bench/bench_supervisor.py [--tasks 20] [--rate 10] [--window 60] [--latency-window 30]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import psutil
from common import (
    Figure,
    Studio,
    add_common_args,
    bench_env,
    load_average,
    median,
    percentile,
    report,
    tear_down,
    wait_for,
)

COST_GOAL_PCT = 1.0
LATENCY_GOAL_MS = 250.0
SLICE_S = 10.0
CONFIG = {"model": {"name": "builtin:tiny"}, "data": {"path": "builtin:sample"}}


def cpu_seconds(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return t.user + t.system


def measure_cpu(proc: psutil.Process, seconds: float) -> tuple[float, list[float]]:
    """CPU seconds over `seconds` of wall time, and the % of one core in each 10 s slice."""
    slices: list[float] = []
    start_cpu = cpu_seconds(proc)
    start = time.monotonic()
    last_cpu, last = start_cpu, start
    while (elapsed := time.monotonic() - start) < seconds:
        time.sleep(min(SLICE_S, seconds - elapsed))
        cpu, now = cpu_seconds(proc), time.monotonic()
        slices.append(100.0 * (cpu - last_cpu) / (now - last))
        last_cpu, last = cpu, now
    return cpu_seconds(proc) - start_cpu, slices


def total_steps(studio: Studio) -> int:
    tasks = studio.http.get("/api/tasks", params={"status": "training", "limit": 1000}).json()["tasks"]
    return sum(t["step"] or 0 for t in tasks)


class StreamClient(threading.Thread):
    """Reads one task's SSE stream and records delivered - written for each progress event."""

    def __init__(self, url: str, task_id: str, after: int, stop: threading.Event, headers: dict[str, str]) -> None:
        super().__init__(daemon=True, name=f"stream-{task_id}")
        self.url, self.task_id, self.after, self.stop = url, task_id, after, stop
        self.headers = headers
        self.latencies_ms: list[float] = []
        self.error: str | None = None

    def run(self) -> None:
        try:
            with (
                httpx.Client(base_url=self.url, timeout=httpx.Timeout(10.0, read=30.0), headers=self.headers) as http,
                http.stream("GET", f"/api/tasks/{self.task_id}/stream", params={"after": self.after}) as r,
            ):
                kind = ""
                for line in r.iter_lines():
                    if self.stop.is_set():
                        return
                    if line.startswith("event: "):
                        kind = line[7:]
                    elif line.startswith("data: ") and kind == "progress":
                        delivered = time.time()  # first thing after the line is parsed: as close to arrival as we get
                        ev: dict[str, Any] = json.loads(line[6:])
                        if "t_wall" in ev:
                            self.latencies_ms.append(1000.0 * (delivered - ev["t_wall"]))
        except Exception as e:  # reported, not raised: the other clients' figures still count
            if not self.stop.is_set():
                self.error = f"{type(e).__name__}: {e}"


def profile(pid: int, out: Path, seconds: int = 20) -> None:
    """Where the server's CPU goes: py-spy samples (outside the measured window: sampling costs CPU too)."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    subprocess.run(
        [spy, "record", "-p", str(pid), "-d", str(seconds), "-r", "200", "-f", "raw", "-o", str(out), "--nonblocking"],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    own: Counter[str] = Counter()
    total = 0
    for line in out.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        n = int(count)
        total += n
        # Count each function once per sample (inclusive time), however deep it recurses.
        for frame in set(stack.split(";")):
            own[frame] += n
    print(f"py-spy: {total} samples in {seconds}s; inclusive share of the busiest frames:")
    for frame, n in own.most_common(40):
        print(f"  {100.0 * n / total:5.1f} %  {frame}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=20)
    parser.add_argument("--rate", type=float, default=10.0, help="events per second per task")
    parser.add_argument("--window", type=float, default=60.0, help="CPU measurement window, seconds (>= 60)")
    parser.add_argument("--latency-window", type=float, default=30.0, help="seconds of stream latency sampling")
    parser.add_argument("--clients", type=int, default=4, help="tasks whose stream is read during the latency window")
    parser.add_argument("--idle", type=float, default=10.0, help="idle baseline before submitting, seconds")
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="after the CPU window, sample the server with py-spy for 20 s into this file (collapsed stacks); "
        "needs `pip install py-spy`",
    )
    add_common_args(parser)
    args = parser.parse_args()

    home = Path(tempfile.mkdtemp(prefix="ftstudio-bench-sup-"))
    env = bench_env(home, product=args.product, trainer_module="event_emitter")
    studio = Studio(home, env, max_running=args.tasks, slots=args.tasks)
    ramp_limit = 120.0
    # The emitters outlive every window; the sweep at the end stops them.
    duration = int(args.idle + ramp_limit + args.window + args.latency_window + 60)
    try:
        print(f"home {home}; load average {load_average()}", flush=True)
        studio.start()
        assert studio.proc is not None
        server = psutil.Process(studio.proc.pid)
        time.sleep(2.0)  # let the server finish its own start-up before the idle baseline
        idle_cpu, _ = measure_cpu(server, args.idle)
        idle_pct = 100.0 * idle_cpu / args.idle
        print(f"idle baseline: {idle_pct:.2f} % of one core over {args.idle:.0f}s", flush=True)

        t0 = time.monotonic()
        ids = []
        for i in range(args.tasks):
            r = studio.http.post(
                "/api/tasks", json={"name": f"emit rate={args.rate:g} duration={duration} n={i}", "config": CONFIG}
            )
            r.raise_for_status()
            ids.append(r.json()["id"])

        def all_training() -> bool:
            body = studio.http.get("/api/tasks", params={"status": "training", "limit": 1000}).json()
            return body["total"] == args.tasks

        wait_for(all_training, timeout=ramp_limit, interval=0.5, what=f"{args.tasks} tasks to be training")
        print(f"{args.tasks} tasks training {time.monotonic() - t0:.1f}s after the first submit", flush=True)
        time.sleep(3.0)  # start-up transients (first syncs, runner imports) out of the window

        steps0 = total_steps(studio)
        load_before = load_average()
        cpu, slices = measure_cpu(server, args.window)
        steps1 = total_steps(studio)
        per_min = cpu * 60.0 / args.window
        pct = 100.0 * cpu / args.window
        ingested = (steps1 - steps0) / args.window
        print(
            f"supervising {args.tasks} tasks: {cpu:.2f} CPU-s in {args.window:.0f}s = {per_min:.2f} CPU-s/min "
            f"= {pct:.2f} % of one core; 10 s slices median {median(slices):.2f} % max {max(slices):.2f} %; "
            f"events reaching the store {ingested:.0f}/s (emitted {args.tasks * args.rate:.0f}/s)",
            flush=True,
        )

        if args.profile:
            profile(server.pid, args.profile)

        stop = threading.Event()
        clients = []
        for task_id in ids[: args.clients]:
            after = studio.task(task_id)["events_seq"]
            clients.append(StreamClient(studio.url, task_id, after, stop, studio.auth))
        cpu_lat0 = cpu_seconds(server)
        for c in clients:
            c.start()
        time.sleep(args.latency_window)
        cpu_lat = cpu_seconds(server) - cpu_lat0
        stop.set()
        for c in clients:
            c.join(timeout=35)
        errors = [c.error for c in clients if c.error]
        lat = sorted(x for c in clients for x in c.latencies_ms)
        if not lat:
            raise RuntimeError(f"no events arrived on the streams: {errors}")
        p50, p95, worst = percentile(lat, 50), percentile(lat, 95), lat[-1]
        print(
            f"latency over {len(lat)} events on {len(clients)} streams: p50 {p50:.0f} ms, p95 {p95:.0f} ms, "
            f"max {worst:.0f} ms; server CPU with the streams open {100.0 * cpu_lat / args.latency_window:.2f} % "
            f"of one core; errors {errors or 'none'}",
            flush=True,
        )
    finally:
        tear_down(studio, home, args.keep)

    figures = [
        Figure(
            f"Supervisor cost ({args.tasks} tasks × {args.rate:g} events/s)",
            f"{per_min:.2f} CPU-s/min = {pct:.2f} % of one core over {args.window:.0f}s "
            f"(10 s slices: median {median(slices):.2f} %, max {max(slices):.2f} %; idle server {idle_pct:.2f} %; "
            f"{ingested:.0f} events/s stored; load at window start {load_before})",
            f"< {COST_GOAL_PCT:g} % of one core",
            pct < COST_GOAL_PCT,
        ),
        Figure(
            "Event latency, written → delivered on the stream",
            f"p95 {p95:.0f} ms (p50 {p50:.0f} ms, max {worst:.0f} ms; {len(lat)} events on {len(clients)} streams "
            f"over {args.latency_window:.0f}s while supervising {args.tasks} tasks)",
            f"p95 < {LATENCY_GOAL_MS:.0f} ms",
            p95 < LATENCY_GOAL_MS,
        ),
    ]
    report(figures, args.json_out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
