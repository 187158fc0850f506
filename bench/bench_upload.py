"""Dataset uploads to a real studio: peak memory and throughput (issue 10).

Two generated files are uploaded through `POST /api/datasets` (multipart, streamed
by httpx from disk) to a real `python -m ftstudio studio serve` under a throw-away
home:

- a ~480 MB JSON-lines file of alpaca rows (~500 bytes each), just under the
  default 512 MB upload limit;
- a ~50 MB file of tiny rows (`{"text": "a"}`, about 4 million of them), the
  shape that used to take the studio to 2.6 GB.

For each: the studio's peak RSS growth over its RSS just before the upload
(psutil, sampled every 10 ms in a thread), goal < 200 MB for the big file; and
the upload's throughput (receive + row-by-row check + move in), set against a
baseline measured in the same run: the same file copied with `shutil.copyfile`
onto the same disk (the floor for writing those bytes once), and the same file
read line by line with `json.loads` of each in the benchmark's own process (the
floor for checking every row in Python), both reported as ratios.

`--product DIR` runs another checkout's studio (e.g. main before this change,
`--files tiny`) for a before/after on the same machine.

    PYTHONPATH=$PWD python bench/bench_upload.py [--mb 480] [--tiny-mb 50]

The generated files live in a temporary directory next to the home and are
removed at the end (with --keep, kept).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psutil
from common import Figure, Studio, add_common_args, bench_env, load_average, report, sweep

RSS_GOAL_MB = 200.0


def write_alpaca(path: Path, mb: int) -> int:
    """About `mb` MB of ~500-byte alpaca rows; returns the row count."""
    rows, size, target = 0, 0, mb << 20
    with open(path, "w") as f:
        while size < target:
            line = json.dumps(
                {
                    "instruction": f"Summarise report {rows} in one sentence. " + "context " * 20,
                    "input": "The quarterly figures rose by three percent. " * 4,
                    "output": f"Report {rows}: figures up three percent.",
                }
            )
            f.write(line + "\n")
            size += len(line) + 1
            rows += 1
    return rows


def write_tiny(path: Path, mb: int) -> int:
    line = b'{"text": "a"}\n'
    n = (mb << 20) // len(line)
    with open(path, "wb") as f:
        for _ in range(n // 10000):
            f.write(line * 10000)
    return n // 10000 * 10000


class PeakRss:
    """The highest RSS of one process, sampled in a thread while a `with` block runs."""

    def __init__(self, pid: int, interval: float = 0.01) -> None:
        self.proc = psutil.Process(pid)
        self.interval = interval
        self.start = self.proc.memory_info().rss
        self.peak = self.start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, self.proc.memory_info().rss)
            except psutil.Error:
                return
            time.sleep(self.interval)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def growth_mb(self) -> float:
        return (self.peak - self.start) / (1 << 20)


def copy_mb_s(src: Path, scratch: Path) -> float:
    """Baseline: the same bytes written once with a plain file copy onto the same disk."""
    t0 = time.perf_counter()
    shutil.copyfile(src, scratch)
    elapsed = time.perf_counter() - t0
    scratch.unlink()
    return src.stat().st_size / (1 << 20) / elapsed


def parse_mb_s(src: Path) -> float:
    """Second baseline: reading the file line by line and `json.loads` of each, in this process:
    the floor for checking every row in Python."""
    t0 = time.perf_counter()
    with open(src, "rb") as f:
        for line in f:
            json.loads(line)
    return src.stat().st_size / (1 << 20) / (time.perf_counter() - t0)


def upload(studio: Studio, path: Path) -> tuple[float, float, dict]:
    """(seconds, peak RSS growth in MB, response) for one upload of `path`."""
    assert studio.proc is not None
    with PeakRss(studio.proc.pid) as rss, open(path, "rb") as f:
        t0 = time.perf_counter()
        r = studio.http.post(
            "/api/datasets", files={"file": (path.name, f, "application/jsonl")}, timeout=httpx.Timeout(1800)
        )
        elapsed = time.perf_counter() - t0
    r.raise_for_status()
    return elapsed, rss.growth_mb, r.json()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=480, help="size of the big alpaca file (under the 512 MB limit)")
    parser.add_argument("--tiny-mb", type=int, default=50, help="size of the many-tiny-rows file")
    parser.add_argument("--files", default="big,tiny", help="which uploads to measure: big, tiny or both")
    add_common_args(parser)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="ftstudio-bench-upload-"))
    home = work / "home"
    home.mkdir()
    studio = Studio(home, bench_env(home, product=args.product))
    figures: list[Figure] = []
    try:
        print(f"work dir {work}; free there: {shutil.disk_usage(work).free >> 30} GB; load {load_average()}")
        big, tiny = work / "big.jsonl", work / "tiny.jsonl"
        wanted = {w.strip() for w in args.files.split(",")}
        todo = []
        if "big" in wanted:
            todo.append((big, write_alpaca(big, args.mb), True))
        if "tiny" in wanted:
            todo.append((tiny, write_tiny(tiny, args.tiny_mb), False))
        studio.start()
        time.sleep(1.0)
        for path, rows, goal in todo:
            mb = path.stat().st_size / (1 << 20)
            base = copy_mb_s(path, work / "copy.tmp")
            floor = parse_mb_s(path)
            seconds, growth, body = upload(studio, path)
            assert body["rows"] == rows, (body["rows"], rows)
            rate = mb / seconds
            print(
                f"{path.name}: {mb:.0f} MB, {rows} rows: upload {seconds:.1f} s ({rate:.0f} MB/s), "
                f"plain copy {base:.0f} MB/s, json.loads per line {floor:.0f} MB/s; "
                f"studio peak RSS growth {growth:.0f} MB",
                flush=True,
            )
            label = f"upload {mb:.0f} MB, {rows:,} rows"
            figures.append(
                Figure(
                    label,
                    f"peak studio RSS growth {growth:.0f} MB",
                    f"< {RSS_GOAL_MB:.0f} MB" if goal else "bounded (informational)",
                    growth < RSS_GOAL_MB if goal else None,
                    details={"rows": rows, "mb": mb, "rss_growth_mb": growth},
                )
            )
            figures.append(
                Figure(
                    label,
                    f"{rate:.0f} MB/s ({seconds:.1f} s) = {rate / floor:.2f}x of json.loads per line "
                    f"({floor:.0f} MB/s), {rate / base:.3f}x of a plain copy ({base:.0f} MB/s), same run",
                    "—",
                    None,
                    details={"seconds": seconds, "mb_s": rate, "copy_mb_s": base, "parse_mb_s": floor},
                )
            )
            (home / "datasets" / body["name"]).unlink()  # keep the disk small for the next file
    finally:
        studio.close()
        sweep(home)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    report(figures, args.json_out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
