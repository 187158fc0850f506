"""The memory a Slurm job asks for against what its trainer really takes (issue 21, item 8).

A task that names no `--memory` gets a job that asks for `ftstudio.footprint.job_memory`: an estimate
from the model's weights on disk. Here real fine-tunes run on this machine (the local executor: the
trainer is the same process a job runs) and the trainer's resident memory is sampled every 50 ms:

- builtin:tiny (the demo's model), cpu-demo preset;
- a ~50M-parameter Qwen2 model saved to a local folder (random weights, fp32: ~200 MB on disk).

Printed per run: the trainer's peak RSS, the job's ask, and the ratio ask / peak, which must stay over
1 (the job is not killed for memory) and under 4 (it does not hold memory that other jobs could use).

    PYTHONPATH=$PWD python bench/bench_job_memory.py
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil
from common import Figure, Studio, add_common_args, bench_env, report, tear_down, wait_completed

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ftstudio.footprint import GiB, MiB, job_memory  # noqa: E402


def save_model(folder: Path) -> None:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from ftstudio.training.builtin import build_tokenizer

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=len(build_tokenizer()),
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=8,
        num_attention_heads=12,
        num_key_value_heads=4,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
    )
    Qwen2ForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    build_tokenizer().save_pretrained(folder)


def peak_rss(home: Path, tid: str, stop: threading.Event, out: list[int]) -> None:
    """The largest RSS any trainer process of the task reached (`ftstudio.train` in its command line)."""
    peak = 0
    while not stop.is_set():
        for proc in psutil.process_iter():
            try:
                if proc.environ().get("FTSTUDIO_TASK_ID") == tid and "ftstudio.train" in " ".join(proc.cmdline()):
                    peak = max(peak, proc.memory_info().rss)
            except (psutil.Error, OSError):
                continue
        time.sleep(0.05)
    out.append(peak)


def run(studio: Studio, home: Path, config: dict[str, Any], label: str) -> Figure:
    r = studio.http.post("/api/tasks", json={"name": label, "config": config})
    r.raise_for_status()
    tid = r.json()["id"]
    stop, found = threading.Event(), []
    watcher = threading.Thread(target=peak_rss, args=(home, tid, stop, found))
    watcher.start()
    try:
        task = wait_completed(studio, tid, timeout=900, label=label)
    finally:
        stop.set()
        watcher.join()
    peak = found[0]
    ask = job_memory(task["config"], None)
    ratio = ask.bytes / peak if peak else float("nan")
    return Figure(
        "job memory ask vs trainer peak RSS",
        f"{label}: peak RSS **{peak / MiB:,.0f} MiB**, job asks --mem={ask.sbatch_mem} "
        f"({ask.bytes / GiB:.2f} GiB) = **{ratio:.2f}x** the peak",
        "1x < ask/peak < 4x",
        1.0 < ratio < 4.0,
        details={"peak_rss": peak, "ask": ask.bytes, "basis": ask.basis},
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="ftstudio-bench-mem-"))
    studio = Studio(home, bench_env(home, product=args.product, OMP_NUM_THREADS="2"))
    figures = []
    try:
        studio.start()
        figures.append(run(studio, home, {"preset": "cpu-demo"}, "builtin:tiny"))
        model = home / "models" / "qwen2-50m"
        save_model(model)
        config = {
            "preset": "cpu-demo",
            "model": {"name": str(model), "dtype": "float32"},
            "optim": {"max_steps": 6},
            "data": {"max_length": 256},
        }
        figures.append(run(studio, home, config, "qwen2-50m (local folder)"))
    finally:
        tear_down(studio, home, args.keep)
    report(figures, args.json_out)


if __name__ == "__main__":
    main()
