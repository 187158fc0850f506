"""optim.auto_batch: a batch that runs out of memory is split into parts trained one after the other, as gradient
accumulation does, and training goes on from the same step.

Why split inside the step rather than shrink optim.batch_size: the data loader, the sampler's order and the
optimizer's steps stay exactly what they were, so the effective batch, the data each step sees and the loss curve
do not change; only how many rows go through the model at once does. The loss of each part is weighted by its
share of the batch (or, where the loss is a sum over the batch's tokens, simply added), so the gradient is the
whole batch's.

A step that runs out of memory part-way has added some gradient already. So each step's gradients are made apart
from what earlier steps of the accumulation left (the tensors set aside, not copied) and added to them only once
the whole batch went through: a failed try is thrown away whole and the batch is tried again in twice as many
parts. The number of parts is written into the task folder (`batch_split.json`, ftstudio/batchsplit.py), so a resumed run starts with
it, and the runner uses the same file when the kernel kills a run at its memory limit (a kill gives no exception
to catch here): it doubles the parts and resumes from the last checkpoint.

In one process only: under torchrun every rank would have to split alike, and DDP owns the gradients' memory;
there a run out of memory ends with the message, and the runner splits and resumes it as after a kill.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ftstudio.batchsplit import SPLIT_FILE, read_parts, rows_per_part, split_line, write_parts

__all__ = ["SPLIT_FILE", "BatchSplit", "read_parts", "split_inputs", "split_line", "write_parts"]


def out_of_memory(e: BaseException) -> bool:
    """A refused allocation: torch's OutOfMemoryError on a GPU, the CPU allocator's refusal, or MemoryError."""
    if isinstance(e, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and "DefaultCPUAllocator" in text and "memory" in text


def split_inputs(inputs: dict[str, Any], parts: int) -> list[tuple[dict[str, Any], int]]:
    """The batch's rows in `parts` nearly equal slices, each with its row count. Values that are not per row
    (a scalar, a tensor of another first size) go to every slice as they are."""
    rows = _rows(inputs)
    if rows is None or parts <= 1 or rows <= 1:
        return [(inputs, rows or 1)]
    bounds = [round(rows * k / parts) for k in range(parts + 1)]
    slices = []
    for a, b in itertools.pairwise(bounds):
        if b <= a:
            continue
        piece = {k: _slice(v, rows, a, b) for k, v in inputs.items()}
        slices.append((piece, b - a))
    return slices


def _rows(inputs: dict[str, Any]) -> int | None:
    for key in ("input_ids", "prompt_input_ids", "chosen_input_ids", "completion_input_ids"):
        value = inputs.get(key)
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return int(value.shape[0])
    for value in inputs.values():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return int(value.shape[0])
    return None


def _slice(value: Any, rows: int, a: int, b: int) -> Any:
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == rows:
        return value[a:b]
    if isinstance(value, list) and len(value) == rows:
        return value[a:b]
    return value


class BatchSplit:
    """The training step of a run with optim.auto_batch (see the module's docstring).

    `task_dir`: where the number of parts is kept; `say`: a line for the log and the events."""

    def __init__(self, batch_size: int, parts: int, task_dir: Path | None, say: Callable[[str], None]) -> None:
        self.batch_size = batch_size
        self.parts = max(1, parts)
        self.task_dir = task_dir
        self.say = say

    def step(
        self,
        trainer: Any,
        model: Any,
        inputs: dict[str, Any],
        num_items_in_batch: Any,
        inner: Callable[[Any, dict[str, Any], Any], torch.Tensor],
    ) -> torch.Tensor:
        """One training step (`inner`: the Trainer's own, for one part) over the whole batch."""
        real = inputs.pop("num_real_tokens", None)  # counted once the batch went through, not per try
        params = [p for p in model.parameters() if p.requires_grad]
        while True:
            held = [p.grad for p in params]
            for p in params:
                p.grad = None
            try:
                loss = self._parts(trainer, model, inputs, num_items_in_batch, inner)
            except Exception as e:
                split_again = out_of_memory(e) and rows_per_part(self.batch_size, self.parts) > 1
                for p, h in zip(params, held, strict=True):
                    p.grad = h  # what this try added is thrown away whole
                if not split_again:
                    raise
            else:
                for p, h in zip(params, held, strict=True):
                    if h is not None:
                        p.grad = h if p.grad is None else p.grad.add_(h)
                if real is not None:
                    trainer.state.num_input_tokens_seen += int(real)
                return loss
            # Outside the except block: the exception's frames held the failed try's activations until now.
            self._free()
            self.parts *= 2
            step = int(trainer.state.global_step) + 1
            if self.task_dir is not None:
                write_parts(self.task_dir, self.parts, self.batch_size, step)
            self.say(f"out of memory at step {step}: {split_line(self.batch_size, self.parts)}; going on")

    def _parts(
        self,
        trainer: Any,
        model: Any,
        inputs: dict[str, Any],
        num_items_in_batch: Any,
        inner: Callable[[Any, dict[str, Any], Any], torch.Tensor],
    ) -> torch.Tensor:
        if self.parts == 1:
            return inner(model, dict(inputs), num_items_in_batch)
        pieces = split_inputs(inputs, self.parts)
        rows = sum(n for _, n in pieces)
        # As the Trainer decides it (Trainer.training_step): a loss already divided by the batch's token count is
        # a sum over tokens, and the parts' losses add up; a mean over rows is weighted by each part's rows.
        summed = trainer.loss_is_scaled_for_ga
        if summed is None:
            summed = (trainer.model_accepts_loss_kwargs and num_items_in_batch is not None) or (
                trainer.compute_loss_func is not None
            )
        accumulation = trainer.current_gradient_accumulation_steps
        total: torch.Tensor | None = None
        try:
            for piece, n in pieces:
                if not summed:
                    trainer.current_gradient_accumulation_steps = accumulation * rows / n
                loss = inner(model, piece, num_items_in_batch)
                total = loss if total is None else total + loss
        finally:
            trainer.current_gradient_accumulation_steps = accumulation
        assert total is not None
        return total

    @staticmethod
    def _free() -> None:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
