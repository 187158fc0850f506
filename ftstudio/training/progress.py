"""What the trainer tells the studio and the person watching: events, log lines, guards.

`StudioCallback` is a transformers `TrainerCallback`. The Trainer logs every step
(`logging_steps=1`, NaN filter off) so the guards see every loss; the callback
writes a `progress` event every `logging.every_steps`, an `eval` event for each
evaluation, and marks each checkpoint complete (then prunes old ones) before
writing its `checkpoint` event, with what the checkpoint cost (`seconds` from the
start of the save to its marker, `bytes` on disk). Only rank 0 writes anything.

`SamplesCallback` answers the held-out prompts (evaluation.py) after each scheduled
checkpoint, on rank 0, while the other ranks wait at a barrier.

`PauseCallback` turns a pause request (SIGUSR1, or a shutdown's SIGTERM, see
`ftstudio.pause`) into a stop at the next optimizer-step boundary, after a checkpoint
of that step; every rank stops at the same step.
"""

from __future__ import annotations

import errno
import math
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ftstudio import checkpoints
from ftstudio.errors import TrainingFailed
from ftstudio.events import EventWriter
from ftstudio.pause import PauseRequest
from ftstudio.training.evaluation import HeldOut


class LossGuard:
    """Stops a run whose loss is NaN/inf, or whose smoothed loss stays far above its best."""

    def __init__(self, factor: float, patience: int) -> None:
        self.factor = factor
        self.patience = patience
        self.smoothed: float | None = None
        self.best: float | None = None
        self.bad_steps = 0

    def check(self, step: int, loss: float, grad_norm: float | None) -> None:
        if not math.isfinite(loss) or (grad_norm is not None and not math.isfinite(grad_norm)):
            what = f"loss {loss}" if not math.isfinite(loss) else f"gradient norm {grad_norm}"
            raise TrainingFailed(
                f"training stopped at step {step}: {what} is not a number; lower optim.learning_rate (--lr), "
                "keep optim.max_grad_norm at 1.0, or use bfloat16; the last good checkpoint is kept"
            )
        if self.factor <= 0:
            return
        # An exponential moving average: single noisy batches must not stop a run.
        self.smoothed = loss if self.smoothed is None else 0.9 * self.smoothed + 0.1 * loss
        self.best = self.smoothed if self.best is None else min(self.best, self.smoothed)
        if self.smoothed > self.factor * self.best:
            self.bad_steps += 1
            if self.bad_steps >= self.patience:
                raise TrainingFailed(
                    f"training diverged at step {step}: smoothed loss {self.smoothed:.3f} stayed above "
                    f"{self.factor:g}x its best ({self.best:.3f}) for {self.patience} steps; lower optim.learning_rate "
                    "(--lr) or raise optim.warmup_ratio; the last good checkpoint is kept"
                )
        else:
            self.bad_steps = 0


DISK_FULL = {errno.ENOSPC, errno.EDQUOT}
LOW_SPACE = 1 << 20
"""Less free than this after a failed write: it failed for want of space (a write that fills the disk leaves
next to nothing; the reserved blocks of ext4 do not count, as they are not free to a user)."""


def disk_full(e: BaseException, where: Path) -> bool:
    """Whether `e`, raised while writing under `where`, means the disk is full. An OSError says so by its
    errno; torch.save's writer does not ("unexpected pos 167104 vs 166996", "basic_ios::clear: iostream
    error", both RuntimeError), so then the free space left decides."""
    seen: BaseException | None = e
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in DISK_FULL:
            return True
        seen = seen.__cause__ or seen.__context__
    if isinstance(e, RuntimeError):
        try:
            return shutil.disk_usage(where).free < LOW_SPACE
        except OSError:
            return False
    return False


def checkpoint_disk_full(path: Path) -> TrainingFailed:
    """The one line for a checkpoint that did not fit; the partial checkpoint goes so the disk is not left full.
    The previous complete checkpoint stays: pruning happens only after a new one is marked complete."""
    shutil.rmtree(path, ignore_errors=True)
    previous = checkpoints.find_resume_checkpoint(path.parent)
    then = f"it continues from {previous.name}" if previous else "it starts from the beginning (no checkpoint yet)"
    return TrainingFailed(
        f"disk full while saving checkpoint {checkpoints.step_of(path)} in {path.parent}; free some space "
        f"(or lower checkpoint.keep) and resume: {then}"
    )


@dataclass
class CheckpointCost:
    """What this attempt's checkpoints cost: from the start of each save to its marker, and their size."""

    started: float | None = None
    """When the save in progress began (time.monotonic), set by the trainer."""
    saved: int = 0
    seconds: float = 0.0
    bytes: int = 0


@dataclass
class RunStats:
    """Figures gathered while training, for the summary."""

    losses: list[float] = field(default_factory=list)
    eval_losses: list[tuple[int, float]] = field(default_factory=list)
    first_step: int = 0
    first_tokens: int = 0
    started: float = field(default_factory=time.monotonic)
    tokens: int = 0
    step: int = 0
    epoch: float = 0.0
    step_seconds: float = 0.0
    """Seconds of this attempt's optimizer steps, each from the previous step's end to its own, leaving out the
    steps with an evaluation or a checkpoint between them. What the time estimate (calibration.py) predicts, so
    the two compare like for like."""
    steps_timed: int = 0

    def step_s(self) -> float | None:
        """Mean seconds per optimizer step in this attempt."""
        return self.step_seconds / self.steps_timed if self.steps_timed else None

    def tokens_per_s(self) -> float:
        elapsed = time.monotonic() - self.started
        return (self.tokens - self.first_tokens) / elapsed if elapsed > 0 else 0.0


def _said(metrics: dict[str, float]) -> str:
    """A method's figures for a log line, shortened: `rewards/accuracies` reads as `accuracies`, a GRPO reward's
    `rewards/numeric/mean` as `numeric/mean`, `completions/mean_length` as `mean_length`."""
    return "".join(f"  {_short(k)} {v:.3f}" for k, v in metrics.items())


def _short(key: str) -> str:
    return key.split("/", 1)[1] if key.startswith("rewards/") else key.rsplit("/", 1)[-1]


class StudioCallback(TrainerCallback):
    def __init__(
        self,
        events: EventWriter | None,
        every_steps: int,
        guard: LossGuard,
        keep: int,
        steps_per_epoch: int,
        begin_fields: dict[str, Any],
        out: TextIO = sys.stdout,
        pause: PauseCallback | None = None,
        metrics: tuple[str, ...] = (),
    ) -> None:
        self.events = events
        self.metrics = metrics
        self.pause = pause
        self.every = every_steps
        self.guard = guard
        self.keep = keep
        self.steps_per_epoch = steps_per_epoch
        self.begin_fields = begin_fields
        self.out = out
        self.stats = RunStats()
        self.cost = CheckpointCost()
        self.total_steps = 0
        self.total_epochs = 0.0
        self._window: list[float] = []
        self._metric_window: dict[str, list[float]] = {}
        self._last_emit = (time.monotonic(), 0)
        self._last_step_end: float | None = None
        self._interrupted = False
        self._window_seconds = (0.0, 0)

    def say(self, line: str) -> None:
        if self.events is not None:
            print(line, file=self.out, flush=True)

    def emit(self, kind: str, **fields: Any) -> None:
        if self.events is not None:
            self.events.emit(kind, **fields)

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        self.total_steps = state.max_steps
        self.total_epochs = round(state.max_steps / self.steps_per_epoch, 4)
        s = self.stats
        s.first_step = s.step = state.global_step
        s.first_tokens = s.tokens = state.num_input_tokens_seen
        s.started = time.monotonic()
        self._last_emit = (s.started, s.tokens)
        self.emit(
            "train_begin",
            total_steps=self.total_steps,
            total_epochs=self.total_epochs,
            resumed_from_step=state.global_step,
            **self.begin_fields,
        )
        resumed = f", resuming at step {state.global_step}" if state.global_step else ""
        self.say(
            f"training {self.total_steps} steps over {self.total_epochs:g} epochs, "
            f"{self.begin_fields.get('trainable_params', 0):,} trainable parameters{resumed}"
        )

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        # A step's time is from the previous step's end to its own: the batch's loading, forward, backward, the
        # optimizer and the step's log line, as a person waits for them. An interval with an evaluation or a
        # checkpoint in it is left out (`_interrupted`): those are counted on their own.
        now = time.monotonic()
        if self._last_step_end is not None and not self._interrupted:
            seconds = now - self._last_step_end
            self.stats.step_seconds += seconds
            self.stats.steps_timed += 1
            total, count = self._window_seconds
            self._window_seconds = (total + seconds, count + 1)
        self._last_step_end = now
        self._interrupted = False

    def on_evaluate(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        self._interrupted = True

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        logs: dict[str, float] = kw.get("logs") or {}
        step = state.global_step
        epoch = round(state.epoch or 0.0, 4)
        if "eval_loss" in logs:
            loss = float(logs["eval_loss"])
            self.stats.eval_losses.append((step, loss))
            measured = {k: float(logs[f"eval_{k}"]) for k in self.metrics if f"eval_{k}" in logs}
            extra = {"metrics": measured} if measured else {}
            # Perplexity, exp(loss): the figure continued pre-training is judged by (capped: exp overflows past ~709).
            self.emit("eval", step=step, epoch=epoch, eval_loss=loss, perplexity=math.exp(min(loss, 50.0)), **extra)
            self.say(f"eval  step {step}/{self.total_steps}  epoch {epoch:.2f}  eval_loss {loss:.4f}{_said(measured)}")
            return
        if "loss" not in logs:
            return
        loss = float(logs["loss"])
        grad_norm = logs.get("grad_norm")
        self.guard.check(step, loss, None if grad_norm is None else float(grad_norm))
        s = self.stats
        s.losses.append(loss)
        s.step, s.epoch, s.tokens = step, epoch, state.num_input_tokens_seen
        self._window.append(loss)
        for key in self.metrics:
            if key in logs:
                self._metric_window.setdefault(key, []).append(float(logs[key]))
        # The step a pause stops at is always reported: it is where the person will see the task wait.
        pausing = self.pause is not None and self.pause.stopped_at == step
        if step % self.every and step != self.total_steps and not pausing:
            return
        now = time.monotonic()
        last_t, last_tokens = self._last_emit
        tokens_per_s = (s.tokens - last_tokens) / (now - last_t) if now > last_t else 0.0
        self._last_emit = (now, s.tokens)
        done = step - s.first_step
        eta = (now - s.started) / done * (self.total_steps - step) if done > 0 else None
        mean_loss = sum(self._window) / len(self._window)
        self._window = []
        # The method's own figures (preference.METRICS), averaged over the same steps as the loss.
        measured = {k: round(sum(v) / len(v), 6) for k, v in self._metric_window.items() if v}
        self._metric_window = {}
        fields: dict[str, Any] = {"metrics": measured} if measured else {}
        seconds, timed = self._window_seconds
        self._window_seconds = (0.0, 0)
        if timed:
            fields["step_s"] = round(seconds / timed, 4)  # mean seconds per step since the last progress event
        lr = float(logs.get("learning_rate", 0.0))
        self.emit(
            "progress",
            step=step,
            total_steps=self.total_steps,
            epoch=epoch,
            total_epochs=self.total_epochs,
            loss=round(mean_loss, 6),
            lr=lr,
            grad_norm=None if grad_norm is None else round(float(grad_norm), 6),
            tokens_per_s=round(tokens_per_s, 1),
            tokens=s.tokens,
            eta_s=None if eta is None else round(eta, 1),
            **fields,
        )
        eta_text = f"{eta:.0f}s" if eta is not None else "?"
        self.say(
            f"step {step}/{self.total_steps}  epoch {epoch:.2f}/{self.total_epochs:g}  loss {mean_loss:.4f}  "
            f"lr {lr:.2e}  tok/s {tokens_per_s:,.0f}  eta {eta_text}{_said(measured)}"
        )

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        self._interrupted = True
        if args.world_size > 1:
            # Each rank writes its own RNG state; the marker must not go down before the slowest rank's.
            import torch.distributed as dist

            dist.barrier()
        if not state.is_world_process_zero:
            return
        path = Path(args.output_dir or ".") / f"checkpoint-{state.global_step}"
        try:
            size = checkpoints.mark_complete(path, ranks=args.world_size)
        except OSError as e:
            if disk_full(e, path):
                raise checkpoint_disk_full(path) from e
            raise
        cost = self.cost
        seconds = time.monotonic() - cost.started if cost.started is not None else 0.0
        cost.started = None
        cost.saved += 1
        cost.seconds += seconds
        cost.bytes += size
        checkpoints.prune(Path(args.output_dir or "."), self.keep)
        self.emit("checkpoint", step=state.global_step, path=str(path), seconds=round(seconds, 3), bytes=size)
        self.say(f"checkpoint saved: {path} ({size / 2**20:,.1f} MiB in {seconds:.2f}s)")


class PauseCallback(TrainerCallback):
    """Stops training for a pause at an optimizer-step boundary, after saving a checkpoint of that step.

    Under torchrun the ranks must agree on the step: a rank that stopped alone would leave the
    others waiting in the next step's gradient all-reduce forever. So at every step end (only when
    world_size > 1) the flag is all-reduced with MAX: one int across the ranks, next to the
    gradient all-reduce every step already does."""

    def __init__(self, request: PauseRequest) -> None:
        self.request = request
        self.stopped_at: int | None = None
        """The global step training stopped at for a pause, None while it runs."""
        self.shutdown = False
        """The stop was for a shutdown (SIGTERM on some rank), not a person's pause."""

    def agreed(self, args: TrainingArguments) -> bool:
        """Whether a pause or shutdown is requested on any rank; a collective when world_size > 1 (every rank
        must call it). The request's level is reduced, so every rank also agrees on whether it was a shutdown."""
        level = self.request.level()
        if args.world_size > 1:
            import torch
            import torch.distributed as dist

            flag = torch.tensor([level], dtype=torch.int32, device=args.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            level = int(flag.item())
        self.shutdown = self.shutdown or level >= PauseRequest.SHUTDOWN
        return level > PauseRequest.NONE

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        if self.stopped_at is not None or not self.agreed(args):
            return
        if state.global_step >= state.max_steps:
            # The last step: the run ends here anyway, and a finished adapter serves the person better
            # than a checkpoint of a finished run.
            return
        self.stopped_at = state.global_step
        # A checkpoint the every_steps schedule saves at this step already set should_save: saved once.
        control.should_save = True
        control.should_training_stop = True
        control.should_evaluate = False  # a pause should be quick; the next attempt evaluates on schedule

    def on_epoch_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        if self.stopped_at is not None:
            # With eval_strategy "epoch" the Trainer would evaluate on the way out of the loop.
            control.should_evaluate = False


class SamplesCallback(TrainerCallback):
    """`evaluation.at_checkpoints`: the held-out prompts answered after each checkpoint of the every_steps
    schedule, once it is marked complete (StudioCallback.on_save runs first). Not after a checkpoint a pause
    asked for (a pause should be quick), nor at the last step (the final answers follow at once).

    Rank 0 answers; under torchrun the other ranks wait at a barrier meanwhile, or they would sit in the next
    step's gradient all-reduce, where a long wait ends in the collective's timeout."""

    def __init__(self, held_out: HeldOut, every_steps: int, pause: PauseCallback) -> None:
        self.held_out = held_out
        self.every = every_steps
        self.pause = pause

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        step = state.global_step
        if step % self.every or step >= state.max_steps or self.pause.stopped_at is not None:
            return
        if state.is_world_process_zero:
            answer_held_out(self.held_out, kw["model"], f"checkpoint-{step}", step)
        if args.world_size > 1:
            import torch.distributed as dist

            dist.barrier()


def answer_held_out(held_out: HeldOut, model: Any, stage: str, step: int) -> None:
    """Answer the held-out prompts; a failure to (out of memory while generating, say) is said in the log
    and costs the run nothing: the answers are a view of the training, not a part of it."""
    try:
        held_out.answer(model, stage, step)
    except Exception as e:
        import traceback

        traceback.print_exc(file=sys.stdout)
        first = (str(e).strip().splitlines() or [""])[0][:300]
        print(f"warning: the held-out prompts of {stage} were not answered ({type(e).__name__}: {first})", flush=True)
