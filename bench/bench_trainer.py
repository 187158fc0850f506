"""Trainer throughput: ftstudio vs a hand-written transformers Trainer + peft script, and MFU.

    PYTHONPATH=. python bench/bench_trainer.py [--rows 96] [--epochs 1] [--shape narrow|wide] [--compile] [--out FILE.json]

One run, same ~20M-parameter Qwen2-architecture model (random weights, built here; `--shape`),
same data (instruction rows whose responses run from ~10 to ~400 tokens), same
hyperparameters (LoRA r=16 on all linear layers, batch 8, max_length 512, fp32).

- baseline: what a person writes by hand: chat template, prompt tokens masked,
  `DataCollatorForSeq2Seq` dynamic padding, the Trainer's default random order.
- ftstudio with length grouping off / on (the default) / packing on.

Throughput is real (non-pad) tokens per second from the first step's start to the
last step's end; "steady" figures leave out the first step (one-off work: allocations,
and with `--compile` the compile itself). MFU: achieved FLOPs per real token (4 x frozen
non-embedding params, the frozen weights get no weight gradient; 6 x LoRA params; 4 x
vocab x d for the tied output layer; 12 x layers x d x causal context for attention)
over this machine's fp32 matmul peak, measured just before and just after each run.
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

from common import command_line, load_average  # noqa: E402

from ftstudio.training.builtin import build_tokenizer  # noqa: E402

# Two ~20M-parameter Qwen2 shapes (18.9M non-embedding parameters each). "narrow" was the
# first chosen; "wide" has Qwen2-0.5B's ratio of width to depth more nearly (real models are
# wide: hidden 896 over 24 layers there), so matmuls are a larger share of each step.
SHAPES = {
    "narrow": {
        "hidden_size": 512,
        "intermediate_size": 1536,
        "num_hidden_layers": 6,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
    },
    "wide": {
        "hidden_size": 768,
        "intermediate_size": 2048,
        "num_hidden_layers": 3,
        "num_attention_heads": 12,
        "num_key_value_heads": 4,
    },
}
SHAPE = dict(SHAPES["narrow"])
SIZES = (1024, 2048, 4096)  # square fp32 matmuls for the peak
HP = {"rank": 16, "alpha": 32, "dropout": 0.0, "batch_size": 8, "max_length": 512, "lr": 2e-4, "seed": 7}
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


def build_model(out: Path) -> dict[str, int]:
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
    from peft import LoraConfig, get_peft_model

    counts = {
        "non_embedding": sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n),
        "vocab": len(tok),  # type: ignore[arg-type]
    }
    lora = get_peft_model(model, LoraConfig(r=HP["rank"], target_modules="all-linear", task_type="CAUSAL_LM"))
    counts["lora"] = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    return counts


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
    """Wall and CPU time from the first step's start to the last step's end, and at each step's end."""

    def __init__(self) -> None:
        self.t0 = self.t1 = self.c0 = self.c1 = 0.0
        self.batches: list[list[int]] = []  # real lengths of each batch collated, in order
        self.steps: list[tuple[float, float, int]] = []  # (wall, cpu, real tokens so far) at each step's end

    def count(self, lengths: list[int]) -> None:
        self.batches.append(lengths)

    def steady(self, tokens_by_step: list[int]) -> dict[str, float]:
        """From the end of step 1 to the end of the last step: the first step carries one-off work
        (allocations; with torch.compile, the compile itself), which MFU figures leave out."""
        (w1, c1, _), (wn, cn, _) = self.steps[0], self.steps[-1]
        tokens = tokens_by_step[-1] - tokens_by_step[0]
        return {"steady_tokens": tokens, "steady_seconds": wn - w1, "steady_cpu_seconds": cn - c1}


def timer(clock: Clock) -> Any:
    """A TrainerCallback that starts the clock at the first step and stops it after each step."""
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if not clock.t0:
                clock.t0, clock.c0 = time.perf_counter(), time.process_time()

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            clock.t1, clock.c1 = time.perf_counter(), time.process_time()
            clock.steps.append((clock.t1, clock.c1, state.num_input_tokens_seen))

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


def run_ftstudio(
    model_dir: Path, data: Path, epochs: float, home: Path, compiled: bool = False, **data_opts: Any
) -> dict[str, Any]:
    from ftstudio.config import TrainingConfig
    from ftstudio.events import EventWriter
    from ftstudio.training.recipe import run

    config = TrainingConfig.from_dict(
        {
            "model": {"name": str(model_dir), "dtype": "float32", "compile": compiled},
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
    return {
        "tokens": summary["tokens"],
        "seconds": clock.t1 - clock.t0,
        "cpu_seconds": clock.c1 - clock.c0,
        "steps": len(clock.steps),
        **clock.steady([t for _, _, t in clock.steps]),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--rows", type=int, default=96)
    parser.add_argument("--dropout", type=float, default=HP["dropout"], help="LoRA dropout for every run")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="narrow", help="the model's shape (see SHAPES)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--compile", action="store_true", help="add runs with torch.compile, grouped and packed (~1 min compile each)"
    )
    args = parser.parse_args()
    HP["dropout"] = args.dropout
    SHAPE.clear()
    SHAPE.update(SHAPES[args.shape])
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    results: dict[str, Any] = {
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "rows": args.rows,
        "shape": args.shape,
        "epochs": args.epochs,
        **HP,
    }
    with tempfile.TemporaryDirectory() as tmp:
        tmpdir = Path(tmp)
        model_dir = tmpdir / "model"
        counts = build_model(model_dir)
        non_embed, lora_params, vocab = counts["non_embedding"], counts["lora"], counts["vocab"]
        data = tmpdir / "data.jsonl"
        make_dataset(data, args.rows)
        results["non_embedding_params"] = non_embed
        results["lora_params"] = lora_params
        # The peak is measured before and after every run, and each run is set against the mean of
        # the two beside it: on a shared machine the peak moved by up to 30 % between measurements
        # minutes apart, more than the differences being measured.
        peaks = [matmul_peak()]
        print(f"fp32 matmul peak {peaks[0][0]:.1f} GFLOP/s; {non_embed / 1e6:.1f}M non-embedding params", flush=True)

        clock = Clock()
        run_baseline(model_dir, data, args.epochs, clock)
        lengths = [n for b in clock.batches for n in b]
        per_step = [sum(b) for b in clock.batches[: len(clock.steps)]]
        so_far = [sum(per_step[: i + 1]) for i in range(len(per_step))]
        base = {
            "tokens": sum(lengths),
            "seconds": clock.t1 - clock.t0,
            "cpu_seconds": clock.c1 - clock.c0,
            "steps": len(clock.steps),
            **clock.steady(so_far),
        }
        peaks.append(matmul_peak())
        print("baseline", base, flush=True)
        runs = {"baseline (Trainer + peft, dynamic padding)": base}
        variants: list[tuple[str, dict[str, Any]]] = [
            ("ftstudio, grouping off, packing off", {"group_by_length": False}),
            ("ftstudio, length grouping (default)", {"group_by_length": True}),
            ("ftstudio, packing", {"packing": True}),
        ]
        if args.compile:
            variants.append(("ftstudio, length grouping + torch.compile", {"group_by_length": True, "compiled": True}))
            variants.append(("ftstudio, packing + torch.compile", {"packing": True, "compiled": True}))
        for name, opts in variants:
            runs[name] = run_ftstudio(model_dir, data, args.epochs, tmpdir / "home", **opts)
            peaks.append(matmul_peak())
            print(name, runs[name], f"peak after {peaks[-1][0]:.1f} GFLOP/s", flush=True)

    d, layers = SHAPE["hidden_size"], SHAPE["num_hidden_layers"]
    # average causal context per real token, from the data (identical for every run)
    avg_ctx = sum(n * (n + 1) / 2 for n in lengths) / max(1, sum(lengths))
    # Per real token: the frozen weights get a forward and an input gradient (2 + 2 FLOPs a weight),
    # the LoRA weights a weight gradient too (2 + 2 + 2); the tied output layer (vocab x d) is a
    # frozen matmul like the others; attention (QK^T and AV, forward and two input gradients) has
    # no weights: 12 x layers x d x the mean causal context.
    flops_per_token = 4 * non_embed + 6 * lora_params + 4 * vocab * d + 12 * layers * d * avg_ctx
    base_tps = base["tokens"] / base["seconds"]
    base_cps = base["tokens"] / base["cpu_seconds"]
    results["peaks_gflops"] = [round(w, 1) for w, _ in peaks]
    results["peaks_gflops_per_cpu_s"] = [round(c, 1) for _, c in peaks]
    table = []
    for i, (name, r) in enumerate(runs.items()):
        peak_wall = (peaks[i][0] + peaks[i + 1][0]) / 2
        peak_cpu = (peaks[i][1] + peaks[i + 1][1]) / 2
        tps, cps = r["tokens"] / r["seconds"], r["tokens"] / r["cpu_seconds"]
        table.append(
            {
                "run": name,
                "peak_gflops": round(peak_wall, 1),
                "tokens": r["tokens"],
                "tokens_per_s": round(tps, 1),
                "vs_baseline": round(tps / base_tps, 2),
                "tokens_per_cpu_s": round(cps, 1),
                "vs_baseline_cpu": round(cps / base_cps, 2),
                "mfu": round(flops_per_token * tps / (peak_wall * 1e9), 3),
                "mfu_cpu_time": round(flops_per_token * cps / (peak_cpu * 1e9), 3),
                "steps": r["steps"],
                "steady_tokens_per_s": round(r["steady_tokens"] / r["steady_seconds"], 1),
                "steady_mfu": round(flops_per_token * r["steady_tokens"] / r["steady_seconds"] / (peak_wall * 1e9), 3),
                "steady_mfu_cpu_time": round(
                    flops_per_token * r["steady_tokens"] / r["steady_cpu_seconds"] / (peak_cpu * 1e9), 3
                ),
            }
        )
    results["avg_context"] = round(avg_ctx, 1)
    results["gflop_per_token"] = round(flops_per_token / 1e9, 4)
    results["runs"] = table
    results["command"] = command_line()
    results["load_average"] = load_average()
    print(json.dumps(results, indent=2))
    for row in table:
        print(
            f"{row['run']}: {row['tokens_per_s']} real tokens/s ({row['vs_baseline']}x baseline), "
            f"steady {row['steady_tokens_per_s']} tokens/s, MFU {100 * row['mfu']:.1f}% "
            f"(steady {100 * row['steady_mfu']:.1f}%, by CPU time {100 * row['steady_mfu_cpu_time']:.1f}%; "
            f"peak {row['peak_gflops']} GFLOP/s)"
        )
    print(f"command: {results['command']}\nload average: {results['load_average']}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
