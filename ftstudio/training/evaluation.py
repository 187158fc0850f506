"""Held-out prompts: answered by the fine-tune and by its base model, kept with the task.

`evaluation.prompts` names a file or an uploaded dataset in any data shape (data.py),
read with answers optional. A conversation that ends with an assistant turn is the
prompt up to that turn, and the turn is the expected answer (`reference`); one that
ends with a user turn is all prompt, with nothing expected. An alpaca row without
`output` is the same. A `text` row is a plain prompt the model continues, without the
chat template (as text rows are trained), with nothing expected.

The trainer answers them on rank 0 when training ends, and after each scheduled
checkpoint with `evaluation.at_checkpoints`: greedy decoding, the adapter first, then
the base model from the same weights with the adapter switched off (peft's
`disable_adapter`), so comparing costs no second model. A model that trains its own
weights (adapter full or freeze) has no adapter to switch off: it answers as the base
before its first step, on every start (`answer_as_base`). Each stage is one file,
written atomically, then a `samples` event:

    evals/final.json, evals/checkpoint-N.json
    {"stage": "final" | "checkpoint-N", "step": N, "max_new_tokens": M, "seconds": S,
     "samples": [{"prompt": "...", "reference": "..." | null, "adapter": "...", "base": "..."}]}

A pause or a shutdown asked for while the answers are written stops the generation
at the next token, and that stage's file is not written: a half-answered stage would
read as a finished one.

The studio reads the files back with `stages()`, each opened without following a link
out of the task directory (taskfiles.open_inside).
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ftstudio.errors import Problem, ValidationError
from ftstudio.eventrows import num, text
from ftstudio.taskfiles import open_inside

EVALS_DIR = "evals"
FINAL = "final"
STAGE_FILE = re.compile(r"(final|checkpoint-\d{1,12})\.json")
MAX_STAGE_BYTES = 32 << 20
"""A stage file larger than this is not one the trainer wrote (200 prompts x 3 answers of 4,096 tokens are far less)."""


@dataclass
class Prompt:
    where: str
    """Where the row came from, for messages: `prompts.jsonl line 3`."""
    messages: list[dict[str, str]]
    """The conversation to answer, up to the expected answer; empty for a text row."""
    text: str
    """What the page shows as the prompt."""
    reference: str | None
    """The expected answer, when the row has one."""


def load_prompts(ref: str, home: Path, limit: int) -> list[Prompt]:
    """The first `limit` usable prompts of `ref` (a file or an uploaded dataset's name)."""
    from ftstudio.config import label
    from ftstudio.training.builtin import resolve_dataset
    from ftstudio.training.data import load_examples

    try:
        info, examples = load_examples(resolve_dataset(ref, home), "auto", prompts=True)
    except ValidationError as e:
        raise ValidationError([Problem(label("evaluation.prompts"), p.message) for p in e.problems]) from None
    for problem in info.problems:
        print(f"skipping held-out prompt {problem.message}", flush=True)
    return [_prompt(ex.where, ex.messages, ex.text) for ex in examples[:limit]]


def _prompt(where: str, messages: list[dict[str, str]], text: str) -> Prompt:
    if not messages:
        return Prompt(where, [], text, None)
    reference = None
    if messages[-1]["role"] == "assistant":
        reference, messages = messages[-1]["content"], messages[:-1]
    if len(messages) == 1:
        shown = messages[0]["content"]
    else:
        shown = "\n\n".join(f"{m['role']}: {m['content']}" for m in messages)
    return Prompt(where, messages, shown, reference)


class HeldOut:
    """One run's held-out prompts, tokenized, and the answering of them.

    `stop`: whether a pause or shutdown was asked for; `fence`: called before every write (fence.py)."""

    def __init__(
        self,
        prompts: list[Prompt],
        tokenizer: Any,
        *,
        max_length: int,
        max_new_tokens: int,
        batch_size: int,
        out_dir: Path,
        events: Any,
        stop: Callable[[], bool],
        fence: Callable[[], None] | None = None,
    ) -> None:
        from ftstudio.training.batches import render

        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.out_dir = Path(out_dir)
        self.events = events
        self.stop = stop
        self.fence = fence
        self.prompts: list[Prompt] = []
        self.ids: list[list[int]] = []
        self.base_answers: list[str] | None = None
        """The base model's answers, when they cannot come from switching an adapter off (see `answer_as_base`)."""
        for p in prompts:
            if p.messages:
                try:
                    text = render(tokenizer, p.messages, generation_prompt=True)
                except ValueError as e:
                    print(f"skipping held-out prompt {p.where}: {e}", flush=True)
                    continue
                ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            else:
                ids = tokenizer(p.text, add_special_tokens=True)["input_ids"]
            if not ids:
                print(f"skipping held-out prompt {p.where}: it is empty", flush=True)
                continue
            # The end is kept: it holds the question and the generation prompt.
            self.prompts.append(p)
            self.ids.append(ids[-max_length:])

    def answer(self, model: Any, stage: str, step: int) -> bool:
        """Answer every prompt with the adapter and without it, and write `evals/<stage>.json`.
        False when a pause or shutdown cut it short (nothing written) or there is nothing to answer."""
        if not self.prompts or self.stop():
            return False
        started = time.monotonic()
        adapter = self._generate(model, base=False)
        if adapter is not None and self.base_answers is not None:
            base: list[str] | None = self.base_answers
        else:
            base = self._generate(model, base=True) if adapter is not None else None
        if adapter is None or base is None:
            print(f"held-out prompts of {stage} left unanswered: a pause or shutdown was asked for", flush=True)
            return False
        seconds = round(time.monotonic() - started, 3)
        samples = [
            {"prompt": p.text, "reference": p.reference, "adapter": a, "base": b}
            for p, a, b in zip(self.prompts, adapter, base, strict=True)
        ]
        if self.fence is not None:
            self.fence()
        write_stage(self.out_dir, stage, step, self.max_new_tokens, samples, seconds, self.events)
        print(f"answered {len(samples)} held-out prompts at {stage} in {seconds:.1f}s", flush=True)
        return True

    def answer_as_base(self, model: Any) -> bool:
        """A model that trains its own weights (adapter full or freeze) has no adapter to switch off: its answers
        before the first step are the base's, kept for every stage. False when a pause cut them short."""
        if not self.prompts:
            return True
        self.base_answers = self._generate(model, base=False)
        return self.base_answers is not None

    def _generate(self, model: Any, *, base: bool) -> list[str] | None:
        """Greedy answers to every prompt, in batches; None when `stop` turned true on the way."""
        import contextlib

        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        stop = self.stop

        class Stop(StoppingCriteria):
            def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
                return torch.full((input_ids.shape[0],), stop(), dtype=torch.bool, device=input_ids.device)

        tok = self.tokenizer
        pad = tok.pad_token_id
        # The tokenizer's eos closes every turn trained (batches.tokenize); the model's own list may hold more.
        eos = model.generation_config.eos_token_id
        stops = sorted({*(eos if isinstance(eos, list) else [eos]), tok.eos_token_id} - {None})
        was_training = model.training
        model.eval()  # no dropout: the same answer every time
        answers: list[str] = []
        try:
            with torch.no_grad(), model.disable_adapter() if base else contextlib.nullcontext():
                for start in range(0, len(self.ids), self.batch_size):
                    batch = self.ids[start : start + self.batch_size]
                    width = max(len(ids) for ids in batch)
                    # Padded on the left, so that every answer starts right after its prompt.
                    input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in batch], device=model.device)
                    mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch])
                    out = model.generate(
                        input_ids=input_ids,
                        attention_mask=mask.to(model.device),
                        max_new_tokens=self.max_new_tokens,
                        do_sample=False,
                        use_cache=True,
                        pad_token_id=pad,
                        eos_token_id=stops or None,
                        stopping_criteria=StoppingCriteriaList([Stop()]),
                    )
                    if stop():
                        return None
                    answers += [tok.decode(row[width:], skip_special_tokens=True).strip() for row in out]
        finally:
            model.train(was_training)
        return answers


def write_stage(
    out_dir: Path,
    stage: str,
    step: int,
    max_new_tokens: int,
    samples: list[dict[str, str | None]],
    seconds: float,
    events: Any,
) -> Path:
    """`evals/<stage>.json`, written atomically, then its `samples` event."""
    from ftstudio.home import write_json_atomic

    path = Path(out_dir) / EVALS_DIR / f"{stage}.json"
    record = {"stage": stage, "step": step, "max_new_tokens": max_new_tokens, "samples": samples, "seconds": seconds}
    write_json_atomic(path, record)
    if events is not None:
        events.emit("samples", stage=stage, step=step, count=len(samples), seconds=seconds)
    return path


def tidy(out_dir: Path, resume_step: int | None) -> None:
    """At the start of an attempt: answers from steps past the one it resumes from belong to an
    abandoned run (a fresh start drops them all), so they go."""
    folder = Path(out_dir) / EVALS_DIR
    if not folder.is_dir():
        return
    for path in folder.glob("*.json"):
        step = _step_in(path)
        if step is None or resume_step is None or step > resume_step:
            path.unlink(missing_ok=True)


def _step_in(path: Path) -> int | None:
    try:
        step = json.loads(path.read_text()).get("step")
    except (OSError, ValueError, AttributeError):
        return None
    return step if isinstance(step, int) and not isinstance(step, bool) else None


def stages(task_dir: Path) -> list[dict[str, Any]]:
    """Every stage's answers, oldest first (by step, the final stage after a checkpoint of the same step).

    Files are opened without following links (a task directory is written by code from model
    repositories); one that is not a stage the trainer wrote is left out."""
    folder = Path(task_dir) / EVALS_DIR
    try:
        names = [] if folder.is_symlink() else os.listdir(folder)
    except OSError:  # none yet
        return []
    found = [_read_stage(Path(task_dir), name) for name in sorted(names) if STAGE_FILE.fullmatch(name)]
    return sorted((s for s in found if s is not None), key=lambda s: (s["step"], s["stage"] == FINAL))


def _read_stage(task_dir: Path, name: str) -> dict[str, Any] | None:
    opened = open_inside(task_dir, Path(EVALS_DIR) / name)
    if opened is None:
        return None
    f, size = opened
    with f:
        if size > MAX_STAGE_BYTES:
            return None
        try:
            data = json.loads(f.read())
        except (ValueError, RecursionError):
            return None
    if not isinstance(data, dict) or not isinstance(data.get("samples"), list):
        return None
    step = data.get("step")
    if not isinstance(step, int) or isinstance(step, bool):
        return None
    return {
        "stage": name.removesuffix(".json"),
        "step": step,
        "max_new_tokens": _number(data.get("max_new_tokens")),
        "seconds": _number(data.get("seconds")),
        "samples": [_sample(s) for s in data["samples"] if isinstance(s, dict)],
    }


def _number(value: Any) -> float | None:
    """A number from the file, or None: NaN, Infinity or 10**400 cannot go out as JSON."""
    found = num(value, math.nan)
    return value if math.isfinite(found) else None


def _sample(s: dict[str, Any]) -> dict[str, str | None]:
    def field(key: str) -> str | None:
        value = s.get(key)
        return text(value) if isinstance(value, str) else None  # a lone surrogate would fail the whole reply

    return {
        "prompt": field("prompt") or "",
        "reference": field("reference"),
        "adapter": field("adapter") or "",
        "base": field("base") or "",
    }
