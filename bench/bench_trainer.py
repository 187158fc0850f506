"""Trainer throughput: ftstudio vs a hand-written transformers Trainer + peft script, and MFU.

    PYTHONPATH=. python bench/bench_trainer.py [--rows 96] [--epochs 1] [--out FILE.json]

One run, same ~20M-parameter Qwen2-architecture model (random weights, built here),
same data (instruction rows whose responses run from ~10 to ~400 tokens), same
hyperparameters (LoRA r=16 on all linear layers, batch 8, max_length 512, fp32).

- baseline: what a person writes by hand: chat template, prompt tokens masked,
  `DataCollatorForSeq2Seq` dynamic padding, the Trainer's default random order.
- ftstudio with length grouping off / on (the default) / packing on.

Throughput is real (non-pad) tokens per second from the first step's start to the
last step's end. MFU: achieved FLOPs (4 x non-embedding params per token for LoRA,
the frozen weights get no weight gradient, plus 12 x layers x d x causal context per
token for attention) over this machine's fp32 matmul peak, measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ftstudio.builtin import build_tokenizer  # noqa: E402

SHAPE = {
    "hidden_size": 512,
    "intermediate_size": 1536,
    "num_hidden_layers": 6,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
}
SIZES = (1024, 2048, 4096)  # square fp32 matmuls for the peak
HP = {"rank": 16, "alpha": 32, "dropout": 0.05, "batch_size": 8, "max_length": 512, "lr": 2e-4, "seed": 7}
WORDS = [
    "the",
    "a",
    "of",
    "to",
    "and",
    "in",
    "is",
    "it",
    "that",
    "for",
    "on",
    "with",
    "as",
    "was",
    "by",
    "at",
    "be",
    "this",
    "from",
    "or",
    "an",
    "are",
    "have",
    "not",
    "but",
]
WORDS += [
    "model",
    "data",
    "train",
    "token",
    "batch",
    "layer",
    "loss",
    "river",
    "stone",
    "light",
    "cloud",
    "green",
    "quick",
    "lazy",
    "fox",
    "bright",
]


def make_dataset(path: Path, rows: int, seed: int = 0) -> None:
    """Alpaca rows; response lengths spread log-uniformly from ~10 to ~400 tokens."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(rows):
            prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 40)))
            n = int(math.exp(rng.uniform(math.log(5), math.log(200))))  # about 2 tokens a word
            answer = " ".join(rng.choice(WORDS) for _ in range(n))
            f.write(json.dumps({"instruction": prompt, "input": "", "output": answer}) + "\n")


def build_model(out: Path) -> int:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = build_tokenizer()
    config = Qwen2Config(
        vocab_size=len(tok),  # type: ignore[arg-type]
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),  # type: ignore[attr-defined]
        pad_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),  # type: ignore[attr-defined]
        **SHAPE,
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    model.save_pretrained(out)
    tok.save_pretrained(out)  # type: ignore[attr-defined]
    return sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n)


def matmul_peak(seconds: float = 6.0) -> tuple[float, float]:
    """Best fp32 GFLOP/s of large square matmuls here, per wall second and per CPU second of this process."""
    best_wall = best_cpu = 0.0
    for n in SIZES:
        a, b = torch.randn(n, n), torch.randn(n, n)
        torch.mm(a, b)
        reps, t0, c0 = 0, time.perf_counter(), time.process_time()
        while time.perf_counter() - t0 < seconds / 3:
            torch.mm(a, b)
            reps += 1
        flop = 2 * n**3 * reps / 1e9
        best_wall = max(best_wall, flop / (time.perf_counter() - t0))
        best_cpu = max(best_cpu, flop / (time.process_time() - c0))
    return best_wall, best_cpu


class Clock:
    """Wall and CPU time from the first step's start to the last step's end."""

    def __init__(self) -> None:
        self.t0 = self.t1 = self.c0 = self.c1 = 0.0
        self.batches: list[list[int]] = []  # real lengths of each batch collated, in order

    def count(self, lengths: list[int]) -> None:
        self.batches.append(lengths)


def timer(clock: Clock) -> Any:
    """A TrainerCallback that starts the clock at the first step and stops it after each step."""
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if not clock.t0:
                clock.t0, clock.c0 = time.perf_counter(), time.process_time()

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            clock.t1, clock.c1 = time.perf_counter(), time.process_time()

    return Timer()


def run_baseline(model_dir: Path, data: Path, epochs: float, clock: Clock) -> None:
    """The hand-written script."""
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainingArguments,
    )

    tok = AutoTokenizer.from_pretrained(model_dir)
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    features = []
    for r in rows:
        msgs = [{"role": "user", "content": r["instruction"]}, {"role": "assistant", "content": r["output"]}]
        prompt = tok.apply_chat_template(msgs[:1], add_generation_prompt=True, tokenize=True, return_dict=False)
        full = tok.apply_chat_template(msgs, tokenize=True, return_dict=False)[: HP["max_length"]]
        features.append({"input_ids": full, "labels": [-100] * len(prompt) + full[len(prompt) :]})
    torch.manual_seed(HP["seed"])
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = get_peft_model(
        model,
        LoraConfig(
            r=HP["rank"],
            lora_alpha=HP["alpha"],
            lora_dropout=HP["dropout"],
            target_modules="all-linear",
            task_type="CAUSAL_LM",
        ),
    )
    base_collate = DataCollatorForSeq2Seq(tok, padding=True)

    def collate(batch: list[dict[str, Any]]) -> dict[str, Any]:
        clock.count([len(f["input_ids"]) for f in batch])
        return base_collate(batch)

    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out,
            per_device_train_batch_size=HP["batch_size"],
            num_train_epochs=epochs,
            learning_rate=HP["lr"],
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            logging_steps=10**6,
            seed=HP["seed"],
            use_cpu=True,
            dataloader_num_workers=0,
        )
        Trainer(model=model, args=args, train_dataset=features, data_collator=collate, callbacks=[timer(clock)]).train()


def run_ftstudio(model_dir: Path, data: Path, epochs: float, home: Path, **data_opts: Any) -> dict[str, Any]:
    from ftstudio.config import TrainingConfig
    from ftstudio.events import EventWriter
    from ftstudio.recipe import run

    config = TrainingConfig.from_dict(
        {
            "model": {"name": str(model_dir), "dtype": "float32"},
            "data": {"path": str(data), "validation": "0", "max_length": HP["max_length"], **data_opts},
            "lora": {"rank": HP["rank"], "alpha": HP["alpha"], "dropout": HP["dropout"]},
            "optim": {
                "epochs": epochs,
                "batch_size": HP["batch_size"],
                "grad_accum": 1,
                "learning_rate": HP["lr"],
                "seed": HP["seed"],
            },
            "checkpoint": {"every_steps": 10**6},
            "logging": {"every_steps": 1, "eval_on_start": False},
        }
    )
    clock = Clock()
    with tempfile.TemporaryDirectory() as out:
        with EventWriter(Path(out) / "events.jsonl") as events:
            run(config, Path(out), home, events, callbacks=[timer(clock)])
        summary = json.loads((Path(out) / "adapter" / "summary.json").read_text())
    return {"tokens": summary["tokens"], "seconds": clock.t1 - clock.t0, "cpu_seconds": clock.c1 - clock.c0}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--rows", type=int, default=96)
    parser.add_argument("--dropout", type=float, default=HP["dropout"], help="LoRA dropout for every run")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    HP["dropout"] = args.dropout
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    results: dict[str, Any] = {
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "rows": args.rows,
        "epochs": args.epochs,
        **HP,
    }
    with tempfile.TemporaryDirectory() as tmp:
        tmpdir = Path(tmp)
        model_dir = tmpdir / "model"
        non_embed = build_model(model_dir)
        data = tmpdir / "data.jsonl"
        make_dataset(data, args.rows)
        results["non_embedding_params"] = non_embed
        peak_wall, peak_cpu = matmul_peak()
        results["peak_gflops"] = round(peak_wall, 1)
        results["peak_gflops_per_cpu_s"] = round(peak_cpu, 1)
        print(f"fp32 matmul peak {peak_wall:.1f} GFLOP/s; {non_embed / 1e6:.1f}M non-embedding params", flush=True)

        clock = Clock()
        run_baseline(model_dir, data, args.epochs, clock)
        lengths = [n for b in clock.batches for n in b]
        base = {"tokens": sum(lengths), "seconds": clock.t1 - clock.t0, "cpu_seconds": clock.c1 - clock.c0}
        print("baseline", base, flush=True)
        runs = {"baseline (Trainer + peft, dynamic padding)": base}
        for name, opts in [
            ("ftstudio, grouping off, packing off", {"group_by_length": False}),
            ("ftstudio, length grouping (default)", {"group_by_length": True}),
            ("ftstudio, packing", {"packing": True}),
        ]:
            runs[name] = run_ftstudio(model_dir, data, args.epochs, tmpdir / "home", **opts)
            print(name, runs[name], flush=True)

    d, layers = SHAPE["hidden_size"], SHAPE["num_hidden_layers"]
    # average causal context per real token, from the data (identical for every run)
    avg_ctx = sum(n * (n + 1) / 2 for n in lengths) / max(1, sum(lengths))
    flops_per_token = 4 * non_embed + 12 * layers * d * avg_ctx
    base_tps = base["tokens"] / base["seconds"]
    base_cps = base["tokens"] / base["cpu_seconds"]
    table = []
    for name, r in runs.items():
        tps, cps = r["tokens"] / r["seconds"], r["tokens"] / r["cpu_seconds"]
        table.append(
            {
                "run": name,
                "tokens": r["tokens"],
                "tokens_per_s": round(tps, 1),
                "vs_baseline": round(tps / base_tps, 2),
                "tokens_per_cpu_s": round(cps, 1),
                "vs_baseline_cpu": round(cps / base_cps, 2),
                "mfu": round(flops_per_token * tps / (peak_wall * 1e9), 3),
                "mfu_cpu_time": round(flops_per_token * cps / (peak_cpu * 1e9), 3),
            }
        )
    results["avg_context"] = round(avg_ctx, 1)
    results["gflop_per_token"] = round(flops_per_token / 1e9, 4)
    results["runs"] = table
    print(json.dumps(results, indent=2))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
