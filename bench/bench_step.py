"""Step-loop A/B of the trainer's own choices, on the trainer benchmark's model and data.

    PYTHONPATH=$PWD python bench/bench_step.py [--shape narrow|wide] [--rounds 6] [--batches 12]

The whole-trainer benchmark (bench_trainer.py) runs each variant once, minutes apart, on a
shared machine whose matmul peak moves by 10-30 % between runs: too coarse for a 5 % change.
Here every variant is a model built once in the same process, and the variants take turns
over the same length-grouped batches (forward + backward, no optimizer) for several rounds;
the medians are compared. Variants:

- `ftstudio`: what training does: the fused LoRA layer, right-padded batches without their
  attention mask (`models.padding_mask_matters` is false for this model);
- `with padding mask`: the same, with the mask every batch used to carry;
- `peft layer`: peft's own LoRA layer instead of the fused one (mask left out as in ftstudio).

Round 0 warms up (allocations, first-call work) and is not counted.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import bench_trainer as bt  # noqa: E402
from common import command_line, load_average  # noqa: E402

VARIANTS = {
    "ftstudio": {"fused": True, "mask": False},
    "with padding mask": {"fused": True, "mask": True},
    "peft layer": {"fused": False, "mask": False},
}


def grouped_batches(model_dir: Path, data: Path, count: int) -> list[dict[str, torch.Tensor]]:
    """The first `count` batches of an epoch as training sees them: tokenized, length-grouped, padded."""
    from transformers import AutoTokenizer

    from ftstudio.training import batches
    from ftstudio.training.data import load_examples

    tok = AutoTokenizer.from_pretrained(model_dir)
    batches.prepare_tokenizer(tok)
    _, examples = load_examples(data)
    tokenized = [batches.tokenize(e, tok, bt.HP["max_length"]) for e in examples]
    rows = [batches.Row(t.input_ids, t.labels) for t in tokenized]
    size = bt.HP["batch_size"]
    order = list(batches.EpochSampler([len(r) for r in rows], size, bt.HP["seed"], group_by_length=True))
    collate = batches.Collator(tok.pad_token_id)  # with the mask; variants without it drop it
    return [collate([rows[i] for i in order[j : j + size]]) for j in range(0, len(order), size)][:count]


def build(model_dir: Path, fused: bool) -> Any:
    from transformers import AutoModelForCausalLM

    from ftstudio.config import LoraConfig
    from ftstudio.training.models import attach_lora, padding_mask_matters

    torch.manual_seed(bt.HP["seed"])
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    assert not padding_mask_matters(model), "the benchmark model should be one that trains without the mask"
    model, _ = attach_lora(model, LoraConfig(rank=bt.HP["rank"], alpha=bt.HP["alpha"], dropout=0.0), fused=fused)
    return model.train()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(bt.SHAPES), default="narrow")
    parser.add_argument("--rounds", type=int, default=6, help="counted rounds (one more warms up)")
    parser.add_argument("--batches", type=int, default=12, help="batches per round")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    bt.SHAPE.clear()
    bt.SHAPE.update(bt.SHAPES[args.shape])
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, data = Path(tmp) / "model", Path(tmp) / "data.jsonl"
        bt.build_model(model_dir)
        bt.make_dataset(data, 256)
        batches = grouped_batches(model_dir, data, args.batches)
        models = {name: build(model_dir, v["fused"]) for name, v in VARIANTS.items()}
    real = sum(int(b["num_real_tokens"]) for b in batches)
    padded = sum(b["input_ids"].numel() for b in batches)
    wall: dict[str, list[float]] = {name: [] for name in VARIANTS}
    cpu: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for rnd in range(args.rounds + 1):
        for name, model in models.items():
            keep = {"input_ids", "labels"} | ({"attention_mask"} if VARIANTS[name]["mask"] else set())
            t0, c0 = time.perf_counter(), time.process_time()
            for b in batches:
                model(**{k: v for k, v in b.items() if k in keep}).loss.backward()
            if rnd:  # round 0 warms up
                wall[name].append(real / (time.perf_counter() - t0))
                cpu[name].append(real / (time.process_time() - c0))
            model.zero_grad(set_to_none=True)
    base = statistics.median(wall["ftstudio"])
    base_cpu = statistics.median(cpu["ftstudio"])
    results: dict[str, Any] = {
        "shape": args.shape,
        "rounds": args.rounds,
        "batches": args.batches,
        "real_tokens_per_round": real,
        "padded_tokens_per_round": padded,
        "threads": torch.get_num_threads(),
        "variants": {
            name: {
                "median_tokens_per_s": round(statistics.median(wall[name]), 1),
                "median_tokens_per_cpu_s": round(statistics.median(cpu[name]), 1),
                "ftstudio_speedup": round(base / statistics.median(wall[name]), 3),
                "ftstudio_speedup_cpu": round(base_cpu / statistics.median(cpu[name]), 3),
                "rounds_tokens_per_s": [round(x, 1) for x in wall[name]],
            }
            for name in VARIANTS
        },
        "command": command_line(),
        "load_average": load_average(),
    }
    print(json.dumps(results, indent=2))
    print(f"{args.shape} model, {args.batches} length-grouped batches ({real} real tokens), {args.rounds} rounds:")
    for name, v in results["variants"].items():
        print(
            f"  {name}: {v['median_tokens_per_s']} real tokens/s median "
            f"(ftstudio is {v['ftstudio_speedup']}x this; by CPU time {v['ftstudio_speedup_cpu']}x)"
        )
    print(f"command: {results['command']}\nload average: {results['load_average']}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
