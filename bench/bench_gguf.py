"""GGUF export (issue 24): how long `ftstudio export --format gguf` takes and how large its file is per
quantization, and how fast llama.cpp answers from that file against transformers on the merged model,
both on this CPU in the same run (a ratio, since the machine is shared).

On `builtin:tiny` and on the ~20M-parameter model of bench_trainer.py (built here), each fine-tuned for
60 real steps on builtin:sample first: agreement measured on a near-uniform model would mean little.
Export time counts the whole export: merge, llama.cpp's converter, its quantizer (q4_k_m), and the
agreement check on the held-out prompts. Decoding speed: greedy, one sequence, 128 new tokens after a
short chat prompt, end-of-turn ignored so every run decodes the same count, best of 3.

    PYTHONPATH=$PWD python bench/bench_gguf.py [--models tiny,20m] [--json-out F]

Needs `make gguf` (the ftstudio[gguf] extra).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from common import Figure, add_common_args, report

from ftstudio.training.builtin import ensure_tiny
from ftstudio.training.gguf import QUANTS, export_gguf, missing_tools

NEW_TOKENS = 128
ROUNDS = 3


def fine_tune(root: Path, home: Path, model: str) -> Path:
    """A real short LoRA fine-tune; its task folder."""
    from ftstudio.train import main as train_main

    config: dict[str, Any] = {
        "model": {"name": "builtin:tiny"},
        "data": {"path": "builtin:sample", "max_length": 128, "validation": "0"},
        "lora": {"rank": 8, "alpha": 16},
        "optim": {"max_steps": 60, "batch_size": 4, "grad_accum": 1, "learning_rate": 3e-3},
        "checkpoint": {"every_steps": 100},
        "logging": {"eval_on_start": False},
    }
    if model == "20m":
        from bench_trainer import build_model

        model_dir = root / "model-20m"
        build_model(model_dir)
        config["model"] = {"name": str(model_dir), "dtype": "float32"}
    task = root / f"20261206-0000-bench{model}"
    task.mkdir(parents=True)
    spec = task / "spec.json"
    spec.write_text(json.dumps({"format": 1, "task_id": task.name, "name": model, "config": config, "home": str(home)}))
    if train_main([str(spec)]) != 0:
        raise SystemExit(f"the fine-tune of {model} failed; see {task}")
    return task


def decode_speed(folder: Path, gguf: dict[str, Path]) -> dict[str, float]:
    """Tokens per second decoding greedily: transformers on the merged model, llama.cpp on each GGUF."""
    import llama_cpp
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    threads = len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                         tokenize=False, add_generation_prompt=True)  # fmt: skip
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    out: dict[str, float] = {}
    best = float("inf")
    for _ in range(ROUNDS):
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                           do_sample=False, pad_token_id=0)  # fmt: skip
        best = min(best, time.perf_counter() - start)
    out["transformers"] = NEW_TOKENS / best
    for quant, path in gguf.items():
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=512, n_threads=threads, verbose=False)
        best = float("inf")
        for _ in range(ROUNDS):
            start = time.perf_counter()
            for n, _tok in enumerate(llm.generate(ids, top_k=1, temp=0.0, reset=True), start=1):
                if n == NEW_TOKENS:
                    break
            best = min(best, time.perf_counter() - start)
        out[quant] = NEW_TOKENS / best
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,20m")
    add_common_args(parser)
    args = parser.parse_args()
    problem = missing_tools()
    if problem:
        raise SystemExit(problem)
    figures: list[Figure] = []
    root = Path(tempfile.mkdtemp(prefix="bench-gguf-"))
    home = root / "home"
    ensure_tiny(home)
    try:
        for model in [m.strip() for m in args.models.split(",") if m.strip()]:
            task = fine_tune(root, home, model)
            rows, files = [], {}
            for quant in QUANTS:
                start = time.perf_counter()
                out = export_gguf(
                    task.name, model, task, root / f"{model}-{quant}", quant, home, progress=lambda _: None
                )
                seconds = time.perf_counter() - start
                manifest = json.loads((out / "export.json").read_text())
                files[quant] = out / manifest["file"]
                agree = manifest["agreement"]
                rows.append(f"{quant} {seconds:.1f} s, {manifest['bytes'] / 2**20:.2f} MiB, "
                            f"top-1 agreement {agree['top1_agreement'] * 100:.1f}%")  # fmt: skip
                print(f"{model} {rows[-1]}", flush=True)
            from ftstudio.training.adapters import merge

            merged = merge(task / "adapter", root / f"{model}-merged", home=home)
            speed = decode_speed(merged, files)
            hf = speed["transformers"]
            ratios = ", ".join(f"{q} {speed[q]:.0f} tok/s ({speed[q] / hf:.1f}x)" for q in QUANTS)
            print(f"{model} decoding: transformers fp32 {hf:.0f} tok/s; llama.cpp {ratios}", flush=True)
            figures.append(Figure(f"GGUF export ({model})", "; ".join(rows), "informational", None))
            figures.append(
                Figure(
                    f"GGUF decoding speed ({model})",
                    f"transformers fp32 {hf:.0f} tokens/s; llama.cpp {ratios} (greedy, {NEW_TOKENS} tokens, best of {ROUNDS})",
                    "informational",
                    None,
                )
            )
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    report(figures, args.json_out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
