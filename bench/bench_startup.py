"""Start-up with 10,000 tasks in the store, 20 of them running (issue 2).

The store is seeded directly through `ftstudio.studio.store.Store`: 20 `training` tasks
whose process identity (pid, start time, boot id) is that of a real, live runner
(`python -m ftstudio.runner DIR --module event_emitter`, started here in its own
session exactly as the local executor starts one, emitting 1 event/s), plus
9,980 finished tasks with their transition history and a few thousand stored
events.

- Start-up: time from spawning `python -m ftstudio studio serve` to
  `/api/health` answering. The server reconciles every task *before* the API
  answers, so answering means all 20 are reattached; each repeat also checks
  that studio.log says "reattached to task" 20 times and that the API shows all
  20 as reattached. Median of --repeats. Goal: < 1 s. Baselines in the same run:
  the same server on an empty home, and the bare interpreter importing the
  server's modules.
- `GET /api/tasks?limit=50` at that size, 200 times: p50 / p95. Goal: p95 < 50 ms.
  Baseline: `GET /api/health`, the HTTP round-trip floor.

    PYTHONPATH=$PWD python bench/bench_startup.py [--tasks 10000] [--running 20] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import psutil
from common import (
    PY,
    Figure,
    Studio,
    add_common_args,
    bench_env,
    free_port,
    load_average,
    median,
    percentile,
    report,
    stop_process,
    sweep,
    wait_for,
)

from ftstudio.execution.procs import TASK_ENV, boot_id
from ftstudio.home import Home, write_json_atomic
from ftstudio.studio.store import Store, new_task_id
from ftstudio.studio.task import TaskStatus

START_GOAL_S = 1.0
LIST_GOAL_MS = 50.0
CONFIG = {"model": {"name": "builtin:tiny"}, "data": {"path": "builtin:sample"}}
EVENTS_PER_TASK = 30


def seed_running(store: Store, home: Home, env: dict[str, str], n: int) -> list[psutil.Process]:
    """n training tasks, each with a live runner whose identity goes into the store."""
    runners = []
    for i in range(n):
        name = f"emit rate=1 duration=0 running={i}"
        task = store.create_task(
            name=name, model="builtin:tiny", dataset="builtin:sample", config=CONFIG, tasks_root=home.tasks
        )
        tdir = task.dir
        tdir.path.mkdir(parents=True)
        write_json_atomic(
            tdir.spec, {"format": 1, "task_id": task.id, "name": name, "config": CONFIG, "home": str(home.root)}
        )
        store.transition(task.id, TaskStatus.QUEUED, TaskStatus.PREPARING, reason="launching")
        with open(tdir.log, "ab") as log:
            # Like LocalExecutor.submit: its own session, stdin from /dev/null, output to training.log, tagged.
            proc = subprocess.Popen(
                [PY, "-m", "ftstudio.runner", str(tdir.path), "--module", "event_emitter"],
                env={**env, TASK_ENV: task.id},
                cwd=tdir.path,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        ps = psutil.Process(proc.pid)
        runners.append(ps)
        store.update(task.id, pid=proc.pid, pid_start_time=ps.create_time(), boot_id=boot_id(), pgid=proc.pid)
        store.transition(task.id, TaskStatus.PREPARING, TaskStatus.TRAINING, reason="first step")
    return runners


def seed_finished(store: Store, home: Home, n: int, n_with_events: int) -> int:
    """n finished tasks in bulk (one transaction), with history rows; events for some of them."""
    rng = random.Random(2)
    now = time.time()
    outcomes = [TaskStatus.COMPLETED] * 8 + [TaskStatus.FAILED, TaskStatus.CANCELLED]
    config = json.dumps(CONFIG)
    ids: set[str] = set()
    rows, history = [], []
    for i in range(n):
        created = now - 3600 - i * 60.0  # a minute apart, older than the running ones: ids stay unique
        task_id = new_task_id(created)
        while task_id in ids:
            task_id = new_task_id(created)
        ids.add(task_id)
        status = outcomes[i % len(outcomes)]
        finished = created + 600
        rows.append(
            (task_id, f"finished task {i}", status, "builtin:tiny", "builtin:sample", config,
             str(home.tasks / task_id), created, created + 5, finished, finished,
             100, 100, 1.0, 1.0, rng.uniform(0.5, 3), "done",
             "the training process exited with code 1; see training.log" if status == TaskStatus.FAILED else None)
        )  # fmt: skip
        history += [
            (task_id, created, None, TaskStatus.QUEUED, "submitted"),
            (task_id, created + 1, TaskStatus.QUEUED, TaskStatus.PREPARING, "launching"),
            (task_id, created + 5, TaskStatus.PREPARING, TaskStatus.TRAINING, "first step"),
            (task_id, finished, TaskStatus.TRAINING, status, "finished"),
        ]
    with store.tx() as c:
        c.executemany(
            "INSERT INTO tasks (id, name, status, model, dataset, config, task_dir, created_at, started_at,"
            " finished_at, updated_at, step, total_steps, epoch, total_epochs, loss, phase, error)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            rows,
        )
        c.executemany("INSERT INTO transitions (task_id, ts, src, dst, reason) VALUES (?, ?, ?, ?, ?)", history)
    stored = 0
    for task_id in sorted(ids)[:n_with_events]:
        evs = [
            {"kind": "progress", "ts": now, "step": s, "total_steps": EVENTS_PER_TASK, "loss": 2.0 / s, "lr": 1e-3}
            for s in range(1, EVENTS_PER_TASK + 1)
        ]
        stored += len(store.ingest(task_id, evs, new_offset=EVENTS_PER_TASK * 100, expect_offset=0))
    return stored


def time_start(studio: Studio, expect_reattached: int) -> float:
    """Seconds from spawn to /api/health answering, then checks that every running task was reattached."""
    log = studio.home / "studio.log"
    log_from = log.stat().st_size if log.exists() else 0
    # A short-lived client with a short timeout: connection refused comes back at once while the port is closed.
    with httpx.Client(base_url=studio.url, timeout=5.0, headers=studio.auth) as http:
        t0 = time.monotonic()
        proc = studio.spawn()
        while True:
            try:
                if http.get("/api/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None:
                raise RuntimeError(f"the studio exited with {proc.returncode}; see {log}")
            time.sleep(0.005)
        elapsed = time.monotonic() - t0
    with open(log, "rb") as f:
        f.seek(log_from)
        reattached = f.read().decode(errors="replace").count("reattached to task")
    if reattached != expect_reattached:
        raise RuntimeError(f"studio.log says {reattached} task(s) reattached, expected {expect_reattached}")
    if expect_reattached:
        tasks = studio.http.get("/api/tasks", params={"status": "training", "limit": 1000}).json()["tasks"]
        if sum(bool(t["reattached"]) for t in tasks) != expect_reattached:
            raise RuntimeError("the API does not show every running task as reattached")
    return elapsed


def time_requests(http: httpx.Client, path: str, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        r = http.get(path)
        out.append(1000.0 * (time.perf_counter() - t0))
        r.raise_for_status()
    return out


def time_in_process(home: Home, n: int) -> list[float]:
    """The list route's service work alone (store query + task_json for 50 rows), no HTTP: how much of
    the request is the handler and how much the server and the client around it."""
    from ftstudio.studio.service import Service

    service = Service(home, in_server=True)
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        tasks, total = service.page_of_tasks(limit=50)
        json.dumps({"tasks": [service.task_json(t) for t in tasks], "total": total, "limit": 50, "offset": 0})
        out.append(1000.0 * (time.perf_counter() - t0))
    service.store.close()
    return out


def time_imports(env: dict[str, str], repeats: int) -> list[float]:
    """The interpreter starting and importing what `studio serve` imports: the floor under any start-up."""
    out = []
    for _ in range(repeats):
        t0 = time.monotonic()
        subprocess.run(
            [PY, "-c", "import uvicorn, ftstudio.web.api, ftstudio.studio.service, ftstudio.cli.main"],
            env=env,
            cwd=env["FTSTUDIO_HOME"],  # the cwd is first on sys.path: it must not shadow --product
            check=True,
        )
        out.append(time.monotonic() - t0)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=10_000, help="tasks in the store, running ones included")
    parser.add_argument("--running", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument(
        "--tasks-with-events", type=int, default=100, help=f"finished tasks with {EVENTS_PER_TASK} events"
    )
    add_common_args(parser)
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="ftstudio-bench-start-"))
    home = Home(root / "home").ensure()
    empty = Home(root / "empty").ensure()
    env = bench_env(home.root, product=args.product, trainer_module="event_emitter")
    empty_env = bench_env(empty.root, product=args.product)
    studio = Studio(home.root, env, port=free_port())
    bare = Studio(empty.root, empty_env, port=free_port())
    try:
        print(f"home {home.root}; load average {load_average()}", flush=True)
        store = Store(home.db)
        t0 = time.monotonic()
        runners = seed_running(store, home, env, args.running)
        n_events = seed_finished(store, home, args.tasks - args.running, args.tasks_with_events)
        total = store.page_of_tasks(limit=1)[1]
        store.close()
        print(f"seeded {total} tasks ({args.running} running), {n_events} events in {time.monotonic() - t0:.1f}s")
        # Every runner has started its emitter (its first event is on disk) before the first start-up.
        for p in home.tasks.iterdir():
            wait_for(lambda p=p: (p / "events.jsonl").exists(), timeout=60, interval=0.1, what=f"{p.name} to emit")

        starts, bare_starts, imports = [], [], []
        for i in range(args.repeats):
            # Interleave the baselines (imports alone, empty home) with the real one, so load drift hits all.
            imports += time_imports(env, 1)
            bare_starts.append(time_start(bare, 0))
            bare.stop()
            starts.append(time_start(studio, args.running))
            if i < args.repeats - 1:
                studio.stop()
            print(
                f"start {i}: 10k store {starts[-1]:.3f}s, empty store {bare_starts[-1]:.3f}s, "
                f"imports alone {imports[-1]:.3f}s, load {load_average()}",
                flush=True,
            )

        # The studio from the last repeat is still up: the list latency at this size.
        time_requests(studio.http, "/api/tasks?limit=50", 10)  # warm-up: first-request costs are not the p95
        health = time_requests(studio.http, "/api/health", args.requests)
        listing = time_requests(studio.http, "/api/tasks?limit=50", args.requests)
        handler = time_in_process(home, args.requests)
    finally:
        studio.close()
        bare.close()
        for r in locals().get("runners", []):
            stop_process(r)
        sweep(home.root)
        sweep(empty.root)
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)

    start_med = median(starts)
    list_p50, list_p95 = percentile(listing, 50), percentile(listing, 95)
    print(
        f"start-up (s): {', '.join(f'{s:.3f}' for s in starts)}; empty home {', '.join(f'{s:.3f}' for s in bare_starts)}"
    )
    print(f"interpreter + server imports (s): {', '.join(f'{s:.3f}' for s in imports)}")
    print(
        f"GET /api/tasks?limit=50: p50 {list_p50:.1f} ms p95 {list_p95:.1f} ms; "
        f"GET /api/health: p50 {percentile(health, 50):.1f} ms p95 {percentile(health, 95):.1f} ms; "
        f"in-process service work p50 {percentile(handler, 50):.1f} ms p95 {percentile(handler, 95):.1f} ms"
    )
    figures = [
        Figure(
            f"Start-up, {total:,} tasks ({args.running} running) → API answering, all reattached",
            f"{start_med:.3f} s median of {len(starts)} (max {max(starts):.3f} s; same server on an empty home "
            f"{median(bare_starts):.3f} s, ratio {start_med / median(bare_starts):.2f}; interpreter + imports alone "
            f"{median(imports):.3f} s)",
            f"< {START_GOAL_S:g} s",
            start_med < START_GOAL_S,
        ),
        Figure(
            f"`GET /api/tasks?limit=50` at {total:,} tasks",
            f"p95 {list_p95:.1f} ms (p50 {list_p50:.1f} ms, {len(listing)} requests; "
            f"`/api/health` p50 {percentile(health, 50):.1f} / p95 {percentile(health, 95):.1f} ms; "
            f"the route's service work in-process p50 {percentile(handler, 50):.1f} / "
            f"p95 {percentile(handler, 95):.1f} ms)",
            f"p95 < {LIST_GOAL_MS:g} ms",
            list_p95 < LIST_GOAL_MS,
        ),
    ]
    report(figures, args.json_out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
