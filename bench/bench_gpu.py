"""The GPU benchmark of the one-call GPU check (scripts/gpu-check): tokens per second, MFU and peak GPU memory.

    PYTHONPATH=$PWD python bench/bench_gpu.py [--models 0.5b 7b] [--steps 20] [--deadline SECONDS] [--out FILE.json]
    PYTHONPATH=$PWD python bench/bench_gpu.py --dry-run      # the same plumbing on the CPU, tiny shapes, 3 steps

Models: a 0.5B-shaped and a 7B-shaped Qwen2 (Qwen2-0.5B's and Qwen2-7B's configs), random weights built here, no
download. Settings: those of the CPU trainer benchmark (bench/bench_trainer.py: instruction rows whose responses
run from ~10 to ~400 tokens, batch 8, max_length 512, LoRA r16 on all linear layers), in bf16. Configurations, each
in a process of its own (so each one's peak memory is its own), in the same run:

- baseline: what a person writes by hand: the Hugging Face Trainer and peft, padding to the batch's longest row,
  the Trainer's random order;
- ftstudio: its defaults (length-grouped batches);
- ftstudio+liger: model.kernels=liger;
- ftstudio+qlora: adapter qlora (nf4, double quantization);
- ftstudio at full length: every row fills max_length, so the batch the memory estimate speaks of is the one that
  runs: its measured peak against the estimate (ftstudio.training.estimate);
- unsloth: listed, not run (its wheels are not carried to the GPU machine).

Figures: real (non-pad) tokens per second from the end of the first step to the end of the last; MFU (6 x trainable
+ 4 x frozen FLOPs per token, attention left out) over this GPU's bf16 matmul peak measured in the same run; peak GPU
memory (torch's peak reserved bytes plus what the CUDA context holds beside them); the final loss. Goals: ftstudio
at >= 1.5x the baseline's tokens per second at equal loss; the estimate within 10 % of the measured peak.
A configuration that cannot run here (no GPU, no bitsandbytes, no liger-kernel, out of time) is listed with why.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
sys.path[:0] = [str(ROOT), str(BENCH)]

from common import command_line  # noqa: E402

SHAPES: dict[str, dict[str, Any]] = {
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
}  # fmt: skip
# --dry-run: the same code paths on the CPU, at shapes that take seconds.
DRY_SHAPES: dict[str, dict[str, Any]] = {
    "0.5b": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1024, tie_word_embeddings=True),
}  # fmt: skip
CONFIGS = ("baseline", "ftstudio", "ftstudio+liger", "ftstudio+qlora", "ftstudio at full length", "unsloth")
HP = {"rank": 16, "alpha": 32, "batch_size": 8, "max_length": 512, "lr": 2e-4, "seed": 7}


def cannot_run(name: str, gpu: bool) -> str | None:
    """Why a configuration cannot run here, or None."""
    if name == "unsloth":
        return "not run: Unsloth's wheels are not among those carried (scripts/gpu-packages.txt), nor is a runner here"
    if name == "ftstudio+liger" and not gpu:
        return "Liger's kernels need a CUDA GPU"
    if name == "ftstudio+liger" and importlib.util.find_spec("liger_kernel") is None:
        return "liger-kernel is not installed (scripts/gpu-wheels carries it)"
    if name == "ftstudio+qlora" and not gpu:
        return "QLoRA needs a CUDA GPU"
    if name == "ftstudio+qlora" and importlib.util.find_spec("bitsandbytes") is None:
        return "bitsandbytes is not installed (scripts/gpu-wheels carries it)"
    return None


def build_model(folder: Path, shape: dict[str, Any], gpu: bool) -> None:
    """Random weights in the shape, saved with the built-in tokenizer; made on the GPU in bf16 there (a 7B model
    in float32 on the CPU would take 30 GB and minutes)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from ftstudio.training.builtin import build_tokenizer

    tok = build_tokenizer()
    config = Qwen2Config(
        max_position_embeddings=4096,
        eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),  # type: ignore[attr-defined]
        pad_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),  # type: ignore[attr-defined]
        **shape,
    )
    torch.manual_seed(0)
    dtype = torch.bfloat16 if gpu else torch.float32
    with torch.device("cuda" if gpu else "cpu"):
        model = Qwen2ForCausalLM._from_config(config, dtype=dtype)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)  # type: ignore[attr-defined]
    del model
    if gpu:
        torch.cuda.empty_cache()


def write_rows(path: Path, rows: int, full_length: bool) -> None:
    from bench_trainer import WORDS, make_dataset

    if not full_length:
        make_dataset(path, rows)
        return
    import random

    rng = random.Random(1)
    with path.open("w") as f:
        for n in range(rows):
            text = " ".join(rng.choice(WORDS) for _ in range(HP["max_length"] * 2))
            f.write(json.dumps({"instruction": f"Write passage {n}.", "input": "", "output": text}) + "\n")


# --- one configuration, in its own process -------------------------------------------------------------------


def one(name: str, model: Path, data: Path, steps: int, gpu: bool) -> dict[str, Any]:
    import torch
    from bench_trainer import Clock

    clock = Clock()
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    loss: float | None
    if name == "baseline":
        loss = baseline(model, data, steps, gpu, clock)
        config: dict[str, Any] | None = None
    else:
        config, loss = ftstudio(name, model, data, steps, gpu, clock)
    steady = clock.steady([t for _, _, t in clock.steps]) if len(clock.steps) > 1 else {}
    seconds = steady.get("steady_seconds") or (clock.t1 - clock.t0)
    tokens = steady.get("steady_tokens") or (clock.steps[-1][2] if clock.steps else 0)
    out: dict[str, Any] = {
        "config": name,
        "steps": len(clock.steps),
        "tokens_per_s": tokens / seconds if seconds else None,
        "final_loss": loss,
        "seconds": clock.t1 - clock.t0,
    }
    if name == "baseline":
        # The hand-written script counts no tokens itself: the real lengths of the batches it collated.
        real = [sum(b) for b in clock.batches]
        out["tokens_per_s"] = sum(real[1 : len(clock.steps)]) / seconds if seconds and len(real) > 1 else None
    if gpu:
        reserved = torch.cuda.max_memory_reserved()
        out["peak_reserved"] = reserved
        out["context"] = context_bytes()
        out["peak_bytes"] = reserved + out["context"]
    else:
        import resource

        out["peak_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if config is not None:
        from ftstudio.config import TrainingConfig
        from ftstudio.training.estimate import estimate, read_shape

        shape = read_shape(model)
        if shape is not None:
            out["estimate"] = estimate(TrainingConfig.from_dict(config), shape, on_gpu=gpu).bytes
    return out


def context_bytes() -> int:
    """GPU memory this process holds beyond torch's reserved blocks: the CUDA context, cuBLAS's workspace."""
    import torch

    free, total = torch.cuda.mem_get_info()
    return max(0, total - free - torch.cuda.memory_reserved())


def ftstudio(name: str, model: Path, data: Path, steps: int, gpu: bool, clock: Any) -> tuple[dict[str, Any], float]:
    from bench_trainer import timer

    from ftstudio.config import TrainingConfig
    from ftstudio.events import EventWriter
    from ftstudio.training.recipe import run

    config: dict[str, Any] = {
        "model": {"name": str(model), "dtype": "bfloat16" if gpu else "float32"},
        "data": {"path": str(data), "validation": "0", "max_length": HP["max_length"]},
        "lora": {"rank": HP["rank"], "alpha": HP["alpha"]},
        "optim": {"max_steps": steps, "batch_size": HP["batch_size"], "grad_accum": 1, "learning_rate": HP["lr"],
                  "seed": HP["seed"]},
        "checkpoint": {"every_steps": 10**6},
        "logging": {"eval_on_start": False},
    }  # fmt: skip
    if name == "ftstudio+liger":
        config["model"]["kernels"] = "liger"
    if name == "ftstudio+qlora":
        config["adapter"] = "qlora"
    with tempfile.TemporaryDirectory() as out:
        with EventWriter(Path(out) / "events.jsonl") as events:
            run(TrainingConfig.from_dict(config), Path(out), Path(out) / "home", events, callbacks=[timer(clock)])
        summary = json.loads((Path(out) / "adapter" / "summary.json").read_text())
    return config, summary["final_loss"]


def baseline(model_dir: Path, data: Path, steps: int, gpu: bool, clock: Any) -> float:
    """The hand-written script: chat template, prompt tokens masked, dynamic padding, the Trainer's own order."""
    import torch
    from bench_trainer import timer
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainingArguments

    tok = AutoTokenizer.from_pretrained(model_dir)
    features = []
    for line in data.read_text().splitlines():
        r = json.loads(line)
        msgs = [{"role": "user", "content": r["instruction"]}, {"role": "assistant", "content": r["output"]}]
        prompt = tok.apply_chat_template(msgs[:1], add_generation_prompt=True, tokenize=True, return_dict=False)
        full = tok.apply_chat_template(msgs, tokenize=True, return_dict=False)[: HP["max_length"]]
        features.append({"input_ids": full, "labels": [-100] * len(prompt) + full[len(prompt) :]})
    torch.manual_seed(HP["seed"])
    dtype = torch.bfloat16 if gpu else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    model = get_peft_model(
        model, LoraConfig(r=HP["rank"], lora_alpha=HP["alpha"], target_modules="all-linear", task_type="CAUSAL_LM")
    )
    pad = DataCollatorForSeq2Seq(tok, padding=True)

    def collate(batch: list[dict[str, Any]]) -> dict[str, Any]:
        clock.count([len(f["input_ids"]) for f in batch])
        return pad(batch)

    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out,
            per_device_train_batch_size=HP["batch_size"],
            max_steps=steps,
            learning_rate=HP["lr"],
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            logging_steps=1,
            seed=HP["seed"],
            bf16=gpu,
            use_cpu=not gpu,
            dataloader_num_workers=0,
        )
        trainer = Trainer(
            model=model, args=args, train_dataset=features, data_collator=collate, callbacks=[timer(clock)]
        )
        trainer.train()
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return float(losses[-1])


# --- the run ------------------------------------------------------------------------------------------------


def matmul_peak(gpu: bool) -> float:
    """This device's best dense matmul rate in FLOP/s (bf16 on a GPU, float32 on the CPU)."""
    import torch

    device, dtype, n = ("cuda", torch.bfloat16, 8192) if gpu else ("cpu", torch.float32, 1024)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = 0.0
    for _ in range(3):
        reps = 10 if gpu else 3
        if gpu:
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        if gpu:
            torch.cuda.synchronize()
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t))
    return best


def flops_per_token(shape: dict[str, Any], name: str) -> float:
    """6 x trainable (LoRA r16 on every linear) + 4 x frozen parameters (no weight gradient): attention left out."""
    from ftstudio.training.estimate import Shape

    s = Shape.of(shape)
    assert s is not None
    lora = s.layers * sum(HP["rank"] * (a + o) for a, o in s.linears().values())
    return 6 * lora + 4 * (s.params - s.vocab * s.hidden * (0 if s.tied else 1)) + 2 * s.vocab * s.hidden


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(SHAPES), choices=sorted(SHAPES))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--deadline", type=float, default=0, help="seconds; configurations after it are skipped")
    parser.add_argument("--dry-run", action="store_true", help="on the CPU, tiny shapes, 3 steps: the plumbing")
    parser.add_argument("--out", type=Path, default=None, help="also write the figures as JSON here")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a configuration, in a child process
    parser.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    import torch

    gpu = torch.cuda.is_available() and not args.dry_run
    if args.one:
        result = one(args.one, args.model_dir, args.data, args.steps, gpu)
        print("RESULT " + json.dumps(result), flush=True)
        return
    started = time.monotonic()
    shapes = DRY_SHAPES if args.dry_run else {m: SHAPES[m] for m in args.models}
    steps = 3 if args.dry_run else args.steps
    print(f"# {command_line()}", flush=True)
    device = torch.cuda.get_device_name(0) if gpu else "CPU (dry run)" if args.dry_run else "CPU"
    peak = matmul_peak(gpu)
    print(f"# device: {device}; matmul peak {peak / 1e12:.1f} TFLOP/s", flush=True)
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="ftstudio-bench-gpu-") as tmp:
        rows = Path(tmp) / "rows.jsonl"
        full = Path(tmp) / "full.jsonl"
        write_rows(rows, HP["batch_size"] * (steps + 1), full_length=False)
        write_rows(full, HP["batch_size"] * 4, full_length=True)
        for label, shape in shapes.items():
            folder = Path(tmp) / label
            build_model(folder, shape, gpu)
            for name in CONFIGS:
                why = cannot_run(name, gpu)
                if why is None and args.deadline and time.monotonic() - started > args.deadline:
                    why = f"out of time (the check's budget of {args.deadline:.0f} s was spent)"
                if why:
                    runs.append({"model": label, "config": name, "skipped": why})
                    print(f"{label:5s} {name:24s} skipped: {why}", flush=True)
                    continue
                data, n = (full, 3) if name.endswith("full length") else (rows, steps)
                env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(BENCH), os.environ.get(
                    "PYTHONPATH", "")]), "FTSTUDIO_HOME": str(Path(tmp) / "home")}  # fmt: skip
                argv = [sys.executable, __file__, "--one", name, "--model-dir", str(folder), "--data", str(data),
                        "--steps", str(n)] + (["--dry-run"] if args.dry_run else [])  # fmt: skip
                proc = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=ROOT)
                found = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
                if proc.returncode != 0 or not found:
                    tail = (proc.stdout + proc.stderr).strip().splitlines()[-3:]
                    runs.append({"model": label, "config": name, "failed": " | ".join(tail)[-600:]})
                    print(f"{label:5s} {name:24s} FAILED: {' | '.join(tail)[-300:]}", flush=True)
                    continue
                result = {"model": label, **json.loads(found[-1][7:])}
                if result.get("tokens_per_s"):
                    result["mfu"] = result["tokens_per_s"] * flops_per_token(shape, name) / peak
                runs.append(result)
                print(line_of(result), flush=True)
    summary = goals(runs)
    for line in summary["lines"]:
        print(line)
    if args.out:
        args.out.write_text(
            json.dumps({"command": command_line(), "device": device, "matmul_peak": peak, "runs": runs, **summary},
                       indent=2)
        )  # fmt: skip


def line_of(r: dict[str, Any]) -> str:
    mib = 1 << 20
    est = f"  estimate {r['estimate'] / mib:,.0f} MiB" if r.get("estimate") else ""
    mfu = f"  MFU {r['mfu']:.1%}" if r.get("mfu") is not None else ""
    tps = f"{r['tokens_per_s']:,.0f} tok/s" if r.get("tokens_per_s") else "- tok/s"
    loss = f"{r['final_loss']:.4f}" if isinstance(r.get("final_loss"), float) else "-"
    return f"{r['model']:5s} {r['config']:24s} {tps}{mfu}  peak {r['peak_bytes'] / mib:,.0f} MiB{est}  loss {loss}"


def goals(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Speed-up over the baseline at equal loss, and the estimate against the measured peak, per model."""
    lines, speedups, estimates = [], {}, {}
    for model in dict.fromkeys(r["model"] for r in runs):
        mine = {r["config"]: r for r in runs if r["model"] == model and "tokens_per_s" in r}
        base, ours = mine.get("baseline"), mine.get("ftstudio")
        if base and ours and base.get("tokens_per_s") and ours.get("tokens_per_s"):
            ratio = ours["tokens_per_s"] / base["tokens_per_s"]
            same = math.isclose(ours["final_loss"], base["final_loss"], rel_tol=0.1)
            speedups[model] = {"ratio": ratio, "equal_loss": same}
            lines.append(f"{model}: ftstudio {ratio:.2f}x the baseline's tokens/s (goal >= 1.5x); final loss "
                         f"{ours['final_loss']:.3f} vs {base['final_loss']:.3f} ({'equal' if same else 'NOT equal'})")  # fmt: skip
        fl = mine.get("ftstudio at full length")
        if fl and fl.get("estimate"):
            error = fl["estimate"] / fl["peak_bytes"] - 1
            estimates[model] = error
            lines.append(f"{model}: memory estimate {error:+.1%} off the measured peak (goal within 10 %)")
    return {"speedups": speedups, "estimate_errors": estimates, "lines": lines}


if __name__ == "__main__":
    main()
