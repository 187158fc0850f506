"""ftstudio's Trainer: the HF Trainer (and, through it, TRL's trainers) with the studio's own row order, token count,
checkpoint fence and checkpoint clock.

TRL's trainers subclass the HF Trainer, so a class of both takes these hooks first
(`class StudioDPOTrainer(StudioTrainer, DPOTrainer)`: StudioTrainer, then DPOTrainer, in
the method order), and every method trains with the same pause, checkpoints and resume.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from transformers import Trainer

from ftstudio.training import batches
from ftstudio.training.autobatch import BatchSplit
from ftstudio.training.progress import CheckpointCost, checkpoint_disk_full, disk_full


class StudioTrainer(Trainer):
    """The HF Trainer with ftstudio's row order and an exact count of real (non-pad) tokens.

    `dynamic_shapes`: with `model.compile`, compile for dynamic shapes from the first step.
    Length-grouped batches change shape every step; by default torch.compile specialises on
    the first shape, recompiles when the second arrives, and only then goes dynamic.
    """

    def __init__(
        self,
        *args: Any,
        train_sampler: batches.EpochSampler | None,
        dynamic_shapes: bool = False,
        checkpoint_cost: CheckpointCost | None = None,
        fence: Callable[[], None] | None = None,
        plus_ratio: float = 0.0,
        batch_split: BatchSplit | None = None,
        offload: bool = False,
        **kwargs: Any,
    ) -> None:
        self._studio_dynamic_shapes = dynamic_shapes  # read by _build_accelerator_args, from Trainer.__init__
        super().__init__(*args, **kwargs)
        self._studio_sampler = train_sampler
        self._studio_cost = checkpoint_cost
        self._studio_fence = fence
        self._studio_plus_ratio = plus_ratio
        self._studio_split = batch_split
        self._studio_offload = offload

    def training_step(self, model: Any, inputs: Any, num_items_in_batch: Any = None) -> Any:
        # optim.auto_batch (autobatch.py); GRPO's inputs are its prompts, which it samples from in its own step.
        if self._studio_split is None or not isinstance(inputs, dict):
            return super().training_step(model, inputs, num_items_in_batch)
        return self._studio_split.step(self, model, inputs, num_items_in_batch, super().training_step)

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        if self._studio_fence is not None:
            self._studio_fence()  # a stale attempt's checkpoint-N would be written over a newer attempt's
        # The clock starts here, before the Trainer writes a byte; StudioCallback.on_save stops it at the marker.
        if self._studio_cost is not None:
            self._studio_cost.started = time.monotonic()
        try:
            super()._save_checkpoint(model, trial)
        except Exception as e:
            path = Path(self.args.output_dir or ".") / f"checkpoint-{self.state.global_step}"
            if not disk_full(e, path.parent):
                raise
            raise checkpoint_disk_full(path) from e

    def _build_accelerator_args(self, **kwargs: Any) -> dict[str, Any]:
        args = super()._build_accelerator_args(**kwargs)
        plugin = args.get("dynamo_plugin")
        if plugin is not None and self._studio_dynamic_shapes:
            plugin.dynamic = True
        return args

    def create_optimizer(self, model: Any = None) -> Any:
        """LoRA+ (lora.plus_ratio): peft's optimizer, whose B matrices learn `plus_ratio` times faster; else the
        Trainer's own. The same groups are built on every start, so a resumed run's optimizer state fits."""
        if self._studio_plus_ratio <= 0 or self.optimizer is not None:
            return super().create_optimizer(model)
        from peft.optimizers import create_loraplus_optimizer

        opt_model: Any = self.model if model is None else model
        cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        kwargs = {k: v for k, v in kwargs.items() if k != "lr"}
        self.optimizer = create_loraplus_optimizer(
            opt_model,
            cls,
            lr=self.args.learning_rate,
            loraplus_lr_ratio=self._studio_plus_ratio,
            weight_decay=self.args.weight_decay,
            **kwargs,
        )
        return self.optimizer

    def _get_train_sampler(self, train_dataset: Any = None) -> Any:
        # None: the trainer's own order (GRPO's sampler repeats each prompt once per completion of its group).
        if self._studio_sampler is None:
            return super()._get_train_sampler(train_dataset)
        return self._studio_sampler

    def compute_loss(
        self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        real = inputs.pop("num_real_tokens", None)
        if real is not None and model.training:
            if self.args.world_size > 1:
                real = self.accelerator.gather(real.reshape(1)).sum()
            self.state.num_input_tokens_seen += int(real)
        if self._studio_offload and model.training:
            # model.offload_checkpoints: every tensor the forward saves for the backward (with gradient checkpointing,
            # chiefly each layer's input) waits in pinned host memory, and comes back as the backward reaches it.
            import torch

            with torch.autograd.graph.save_on_cpu(pin_memory=True):
                return super().compute_loss(
                    model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
                )
        return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)


class StudioTRLTrainer(StudioTrainer):
    """StudioTrainer for TRL's trainers (`class StudioDPOTrainer(StudioTRLTrainer, DPOTrainer)`)."""

    def create_model_card(self, *args: Any, **kwargs: Any) -> None:
        """TRL writes a README into the checkpoint folder at every save: the task's files say what was trained."""
