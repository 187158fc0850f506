"""The training recipe: setup -> train -> save -> cleanup, for one TrainingConfig.

Order matters for the person waiting: the data is read and checked first, then
the tokenizer, and every example tokenized, so a bad row or an impossible
max_length fails in seconds, before the (possibly large) model is loaded.

A pause (`ftstudio.pause`) is honoured at three points. Before the model loads and
just before training starts, no step of this attempt has been taken, so it stops
with nothing new to save: the resumable state is what it was (the checkpoint this
attempt would have resumed from, or none, and the next start begins fresh). Once
training runs, it stops at the next step boundary after a checkpoint of that step.
A shutdown's SIGTERM is honoured the same way (see `ftstudio.pause`).

Held-out prompts (`evaluation.prompts`, see `ftstudio.evaluation`) are read with the
data and answered after the adapter is saved, before `train_end`; with
`evaluation.at_checkpoints` also after each scheduled checkpoint.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import TrainingArguments

from ftstudio import checkpoints
from ftstudio.config import TRL_METHODS, WHOLE_MODEL, TrainingConfig
from ftstudio.errors import Problem, ValidationError
from ftstudio.events import EventWriter
from ftstudio.pause import PauseRequest, Suspended
from ftstudio.training import autobatch, batches, evaluation, preflight
from ftstudio.training.adapters import save_adapter
from ftstudio.training.allocator import keep_freed_memory
from ftstudio.training.builtin import resolve_dataset, resolve_model
from ftstudio.training.data import Example, load_examples, split_validation
from ftstudio.training.datafiles import FIELD
from ftstudio.training.models import (
    adapter_report,
    attach_lora,
    continue_adapter,
    keep_pissa_start,
    load_model,
    load_tokenizer,
    padding_mask_matters,
    pick_dtype,
    train_whole,
)
from ftstudio.training.progress import (
    LossGuard,
    PauseCallback,
    SamplesCallback,
    StudioCallback,
    answer_held_out,
)
from ftstudio.training.resume import resolve_resume, tidy_checkpoints
from ftstudio.training.trainers import StudioTrainer

OPTIMIZERS = {"adamw_8bit": "adamw_bnb_8bit", "paged_adamw_8bit": "paged_adamw_8bit"}
"""optim.optimizer's names for the Trainer's `optim` (bitsandbytes' AdamW); `adamw` leaves the Trainer's default."""


def run(
    config: TrainingConfig,
    out_dir: Path,
    home: Path,
    events: EventWriter | None,
    callbacks: list[Any] | None = None,
    pause: PauseRequest | None = None,
    fence: Callable[[], None] | None = None,
    timing_only: bool = False,
) -> Path:
    """Train one adapter into out_dir; returns the adapter directory. `callbacks`: extra TrainerCallbacks;
    `fence`: called before every checkpoint (fence.py); `timing_only`: the time estimate's steps (calibration.py),
    with no evaluation, checkpoint or adapter saved.

    Raises `Suspended` when `pause` was requested: training stopped without an adapter."""
    keep_freed_memory()
    from transformers import set_seed
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # bars are noise in training.log; progress goes to events
    started = time.monotonic()
    world = int(os.environ.get("WORLD_SIZE", "1"))

    def status(phase: str, message: str) -> None:
        if events is not None:
            events.emit("status", phase=phase, message=message)
            print(message, flush=True)

    # --- setup: the submit-time checks again (the spec may have been written by hand),
    # then data, then tokenizer, then model ---
    status("loading_data", f"reading {config.data.path}")
    preflight.check(config, home)
    data_path = resolve_dataset(config.data.path, home)
    info, examples = load_examples(data_path, config.data.format)
    for problem in info.problems:
        print(f"skipping {problem.message}", flush=True)
    train_ex, val_ex, split_info = split_validation(config, examples, home)
    ev = config.evaluation
    prompts = evaluation.load_prompts(ev.prompts, home, ev.max_prompts) if ev.prompts.strip() else []

    status("loading_model", f"loading {config.model.name}")
    model_ref = resolve_model(config.model.name, home)
    tokenizer = load_tokenizer(model_ref, config.model)
    batches.prepare_tokenizer(tokenizer)
    # The methods built on TRL's trainers: they attach the adapter themselves, and take rows of their own kind.
    on_trl = config.method in TRL_METHODS
    train_rows: list[Any]  # each method's own kind of row: batches.Row, or preference.py's or grpo.py's dicts
    val_rows: list[Any]
    lengths: list[int] | None = None  # None: the trainer's own order (grpo)
    per_row = 1  # training sequences per row: a grpo prompt is sampled once per completion of its group
    if config.method == "grpo":
        from ftstudio.training import grpo  # TRL, imported only for the methods built on it

        def prompt(ex: Example) -> list[Any]:
            return [grpo.prompt_row(ex, tokenizer, config.data.max_length)]

        train_rows = _tokenize_all(train_ex, prompt)
        val_rows = _tokenize_all(val_ex, prompt, required=False)
        n_examples = len(train_rows)
        per_row = config.grpo.generations
    elif on_trl:
        from ftstudio.training import preference

        def rows(ex: Example) -> list[Any]:
            return preference.rows_for(config.method, ex, tokenizer, config.data.max_length)

        train_rows = _tokenize_all(train_ex, rows)
        val_rows = sorted(_tokenize_all(val_ex, rows, required=False), key=preference.length)
        lengths = [preference.length(r) for r in train_rows]
        n_examples = len(train_rows)
    else:

        def item(ex: Example) -> list[Any]:
            return [batches.tokenize(ex, tokenizer, config.data.max_length)]

        train_items = _tokenize_all(train_ex, item)
        val_items = _tokenize_all(val_ex, item, required=False)
        if config.data.packing:
            train_rows = batches.pack(train_items, config.data.max_length)
        else:
            train_rows = [batches.Row(t.input_ids, t.labels) for t in train_items]
        # Evaluation is never packed, so eval loss means the same with packing on or off.
        val_rows = sorted((batches.Row(t.input_ids, t.labels) for t in val_items), key=len)
        lengths = [len(r) for r in train_rows]
        n_examples = len(train_items)

    ckpt_dir = out_dir / "checkpoints"
    resume = resolve_resume(config.checkpoint.resume_from, ckpt_dir)
    if int(os.environ.get("RANK", "0")) == 0:
        tidy_checkpoints(ckpt_dir, resume)
        evaluation.tidy(out_dir, (checkpoints.step_of(resume) or 0) if resume else None)
    o = config.optim
    per_epoch = batches.steps_per_epoch(len(train_rows) * per_row, o.batch_size, o.grad_accum, world)
    # The Trainer's own count: max_steps, or whole epochs rounded up.
    total_steps = o.max_steps if o.max_steps > 0 else math.ceil(per_epoch * (o.epochs if o.epochs > 0 else 1.0))
    pause = pause or PauseRequest()
    held_out = (
        evaluation.HeldOut(
            prompts,
            tokenizer,
            max_length=config.data.max_length,
            max_new_tokens=ev.max_new_tokens,
            batch_size=o.batch_size,
            out_dir=out_dir,
            events=events,
            stop=lambda: pause.requested,
            fence=fence,
        )
        if prompts
        else None
    )

    def paused_before_training(shutdown: bool) -> Suspended:
        step = (checkpoints.step_of(resume) or 0) if resume else 0
        return Suspended(step, total_steps, resume.name if resume else None, shutdown=shutdown)

    # Ranks read the flag alone here only when there is one rank; under torchrun they agree below.
    if world == 1 and pause.requested:
        raise paused_before_training(pause.shutdown)

    set_seed(config.optim.seed)
    model = load_model(model_ref, config.model)
    fused = config.model.quantization == "none"
    if config.model.start_from.strip():
        # Going on from a trained adapter: it is the one that trains (the TRL trainers take it as it is, and
        # keep a frozen copy of it as DPO's and KTO's reference).
        model, report = continue_adapter(model, Path(config.model.start_from.strip()), fused)
        status("loading_model", f"going on from the adapter in {config.model.start_from.strip()}")
    elif config.adapter in WHOLE_MODEL:
        report = train_whole(model, config.adapter, config.freeze_layers)
    elif not on_trl:  # the TRL trainers attach a new adapter themselves (see preference.py)
        model, report = attach_lora(model, config.lora, fused, config.adapter)

    dtype = pick_dtype(config.model.dtype)
    has_eval = bool(val_rows) and not timing_only
    eval_strategy = "no" if not has_eval else ("steps" if config.logging.eval_every_steps else "epoch")
    if "tensorboard" in config.logging.report_to:
        # Beside the task's other files, where a person finds them (`tensorboard --logdir <task>/tensorboard`),
        # not under checkpoints/; a directory the person chose themselves wins.
        os.environ.setdefault("TENSORBOARD_LOGGING_DIR", str(out_dir / "tensorboard"))
    arguments: dict[str, Any] = dict(
        output_dir=str(ckpt_dir),
        per_device_train_batch_size=o.batch_size,
        per_device_eval_batch_size=o.batch_size,
        gradient_accumulation_steps=o.grad_accum,
        num_train_epochs=o.epochs if o.epochs > 0 else 1.0,
        max_steps=o.max_steps,
        learning_rate=o.learning_rate,
        lr_scheduler_type=o.scheduler,
        warmup_steps=o.warmup_ratio,  # a float below 1 is a fraction of the total steps
        weight_decay=o.weight_decay,
        max_grad_norm=o.max_grad_norm if o.max_grad_norm > 0 else 0.0,
        seed=o.seed,
        data_seed=o.seed,
        bf16=torch.cuda.is_available() and dtype == torch.bfloat16,
        fp16=torch.cuda.is_available() and dtype == torch.float16,
        logging_strategy="steps",
        logging_steps=1,  # every step, so the loss guard sees every loss
        logging_nan_inf_filter=False,  # the filter would hide a NaN loss from the guard
        eval_strategy=eval_strategy,
        eval_steps=config.logging.eval_every_steps or None,
        eval_on_start=has_eval and config.logging.eval_on_start and resume is None,
        save_strategy="no" if timing_only else "steps",
        save_steps=config.checkpoint.every_steps,
        save_total_limit=None,  # ftstudio prunes, only after the newer checkpoint is marked complete
        report_to=list(config.logging.report_to) or "none",
        remove_unused_columns=False,
        disable_tqdm=True,
        dataloader_num_workers=0,
        use_cpu=not torch.cuda.is_available(),
        torch_compile=config.model.compile,
        use_liger_kernel=config.model.kernels == "liger",
        ddp_backend=("gloo" if not torch.cuda.is_available() else "nccl") if world > 1 else None,
    )
    if config.optim.optimizer != "adamw":
        arguments["optim"] = OPTIMIZERS[config.optim.optimizer]
    sampler = (
        batches.EpochSampler(lengths, o.batch_size, o.seed, config.data.group_by_length)
        if lengths is not None
        else None
    )
    pause_callback = PauseCallback(pause)
    callback = StudioCallback(
        pause=pause_callback,
        events=events,
        every_steps=config.logging.every_steps,
        # GRPO's loss hovers around 0 and changes sign with the advantages: "above N x its best" means nothing
        # there, so its guard is off (a NaN loss still stops it).
        guard=LossGuard(0.0 if config.method == "grpo" else o.divergence_factor, o.divergence_patience),
        keep=config.checkpoint.keep,
        steps_per_epoch=per_epoch,
        metrics=grpo.metrics(config)
        if config.method == "grpo"
        else preference.METRICS[config.method]
        if on_trl
        else (),
        begin_fields={
            "method": config.method,
            "started_from": config.model.start_from.strip() or None,
            "train_rows": len(train_rows),
            "train_examples": n_examples,
            "steps_per_epoch": per_epoch,
            **split_info,
            "packing": config.data.packing,
        },
    )
    extra = (
        [SamplesCallback(held_out, config.checkpoint.every_steps, pause_callback)]
        if held_out and ev.at_checkpoints
        else []
    )
    split = None
    if o.auto_batch:
        parts = autobatch.read_parts(out_dir)
        if parts > 1:
            status("training", f"as an earlier attempt found: {autobatch.split_line(o.batch_size, parts)}")

        def say(line: str) -> None:
            status("training", line)

        split = autobatch.BatchSplit(o.batch_size, parts, out_dir, say)
    studio: dict[str, Any] = {
        "callbacks": [pause_callback, callback, *extra, *(callbacks or [])],
        "batch_split": split,
        "train_sampler": sampler,
        "checkpoint_cost": callback.cost,
        "fence": fence,
        "plus_ratio": config.lora.plus_ratio,
        "offload": config.model.offload_checkpoints,
    }
    trainer: StudioTrainer
    if on_trl:
        if config.method == "grpo":
            trainer = grpo.build(config, model, tokenizer, arguments, train_rows, val_rows, **studio)
        else:
            epochs = total_steps / per_epoch if per_epoch else 0.0
            trainer = preference.build(config, model, tokenizer, arguments, train_rows, val_rows, epochs, **studio)
        model = trainer.model
        if config.adapter not in WHOLE_MODEL:
            report = adapter_report(model)
    else:
        trainer = StudioTrainer(
            model=model,
            args=TrainingArguments(**arguments),
            train_dataset=train_rows,
            eval_dataset=val_rows or None,
            data_collator=batches.Collator(
                tokenizer.pad_token_id,
                shape=(o.batch_size, config.data.max_length) if config.model.compile and config.data.packing else None,
                padding_mask=padding_mask_matters(model),
            ),
            processing_class=tokenizer,
            dynamic_shapes=config.model.compile and not config.data.packing,
            **studio,
        )
    callback.begin_fields |= report.fields() | where_it_trains(trainer.model, dtype)
    pissa_start = None
    if config.adapter == "pissa" and int(os.environ.get("RANK", "0")) == 0:
        pissa_start = keep_pissa_start(trainer.model, out_dir)
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)  # it prints raw log dicts; StudioCallback writes readable lines
    trainer.remove_callback(ProgressCallback)
    if resume is not None:
        status("resuming", f"resuming from {resume}")

    if pause_callback.agreed(trainer.args):  # every rank reaches this point: the process group is up
        raise paused_before_training(pause_callback.shutdown)
    if held_out is not None and config.adapter in WHOLE_MODEL and trainer.is_world_process_zero():
        # Before the checkpoint loads (train() loads it): these weights are still the base's.
        status("answering_prompts", f"answering {len(held_out.prompts)} held-out prompts with the base model first")
        if not held_out.answer_as_base(trainer.model) and world == 1:
            raise paused_before_training(pause.shutdown)

    # --- train ---
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    state = trainer.state
    if pause_callback.stopped_at is not None:
        # Stopped for a pause after a checkpoint of this step (see PauseCallback): no eval, no adapter.
        stopped = pause_callback.stopped_at
        raise Suspended(stopped, state.max_steps, f"checkpoint-{stopped}", shutdown=pause_callback.shutdown)
    if has_eval and (not callback.stats.eval_losses or callback.stats.eval_losses[-1][0] != state.global_step):
        trainer.evaluate()
    if timing_only:
        return out_dir / "adapter"  # not written: the steps were all the time estimate wanted

    # --- save ---
    status("saving", "saving the adapter")
    stats = callback.stats
    wall = time.monotonic() - started
    # From the Trainer's history, which a resumed run restores from its checkpoint: the
    # summary covers the whole run, not only this attempt.
    losses = [float(h["loss"]) for h in state.log_history if "loss" in h]
    evals = [(int(h["step"]), float(h["eval_loss"])) for h in state.log_history if "eval_loss" in h]
    summary = {
        "task_dir": str(out_dir),
        "base_model": {"name": config.model.name, "path": str(model_ref)},
        "started_from": config.model.start_from.strip() or None,
        "steps": state.global_step,
        "epochs": round(state.epoch or 0.0, 4),
        "final_loss": losses[-1] if losses else None,
        "best_loss": min(losses) if losses else None,
        "first_eval_loss": evals[0][1] if evals else None,
        "final_eval_loss": evals[-1][1] if evals else None,
        "best_eval_loss": min(e for _, e in evals) if evals else None,
        "tokens": state.num_input_tokens_seen,
        "tokens_per_s": round(stats.tokens_per_s(), 1),
        # Mean seconds per optimizer step of this attempt, steps alone (calibration.py's measure).
        "step_s": None if stats.step_s() is None else round(stats.step_s() or 0.0, 4),
        "steps_timed": stats.steps_timed,
        "steps_per_epoch": per_epoch,
        "wall_s": round(wall, 2),  # this attempt
        "resumed_from_step": stats.first_step,
        # This attempt's checkpoints: how many, the seconds they held training up, the bytes they wrote.
        "checkpoints_saved": callback.cost.saved,
        "checkpoint_s": round(callback.cost.seconds, 3),
        "checkpoint_bytes": callback.cost.bytes,
        "trainable_params": report.trainable_params,
        "total_params": report.total_params,
        "target_modules": report.target_modules,
        "adapted_layers": report.adapted_layers,
        "train_examples": n_examples,
        "skipped_rows": info.skipped_rows,
        **split_info,
    }
    adapter = out_dir / "adapter"
    if trainer.is_world_process_zero():
        adapter = save_adapter(trainer.model, tokenizer, config.to_dict(), summary, out_dir, convert_from=pissa_start)
        if pissa_start is not None:
            shutil.rmtree(pissa_start, ignore_errors=True)  # converted into the adapter: no longer needed
        if held_out is not None and held_out.prompts:
            status(
                "answering_prompts", f"answering {len(held_out.prompts)} held-out prompts, fine-tuned and base model"
            )
            answer_held_out(held_out, trainer.model, evaluation.FINAL, state.global_step)
        if events is not None:
            events.emit("train_end", adapter=str(adapter), **summary)
        print(
            f"done: {summary['steps']} steps in {wall:.1f}s, final loss {summary['final_loss']}, "
            f"eval loss {summary['first_eval_loss']} -> {summary['final_eval_loss']}; adapter in {adapter}",
            flush=True,
        )
    # --- cleanup ---
    del trainer, model
    return adapter


def where_it_trains(model: Any, dtype: torch.dtype) -> dict[str, Any]:
    """The device, dtype and attention kernel the run trains with, for its train_begin event: what a person checks
    first when a run is slower than expected."""
    device = next(model.parameters()).device
    where = f"{device} ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else str(device)
    attention = getattr(getattr(model, "config", None), "_attn_implementation", None)
    return {"device": where, "dtype": str(dtype).removeprefix("torch."), "attention": attention}


def _tokenize_all(examples: list[Example], rows: Callable[[Example], list[Any]], required: bool = True) -> list[Any]:
    """Every example's rows (`rows` says what they are for the method); an example that cannot train is skipped and
    said, and too few left is an error that names the fix."""
    items: list[Any] = []
    dropped: list[str] = []
    for ex in examples:
        try:
            items.extend(rows(ex))
        except ValueError as e:
            dropped.append(f"{ex.where}: {e}")
    for line in dropped[:20]:
        print(f"skipping {line}", flush=True)
    if required and not items:
        first = dropped[0] if dropped else "no examples"
        raise ValidationError(Problem(FIELD, f"no example fits for training ({first})"))
    if required and len(dropped) > len(examples) * 0.5:
        print(f"warning: {len(dropped)} of {len(examples)} examples skipped; raise data.max_length", flush=True)
    return items
