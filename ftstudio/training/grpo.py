"""GRPO: reinforcement learning with reward functions, on TRL's GRPOTrainer.

Each step samples `grpo.generations` completions of the same prompt, scores every one
with the `rewards` (rewards.py), and makes the completions that scored above their
group's mean likelier and the others less likely: no reward model, no value model. With
`grpo.beta` above 0 a KL penalty keeps the model near where it started (the base with
the adapter switched off, as for DPO); at 0, TRL's default, no reference pass is made.

The prompts come from data.py: the `prompts` shape (`prompt` and an optional `answer`),
or any instruction or conversation shape, whose last assistant turn is then the answer
the `exact` and `numeric` rewards compare with. TRL renders each prompt with the model's
chat template when it samples, so a row here is the prompt's messages and its answer;
a prompt that alone fills `data.max_length` is skipped before the model loads. The order
of prompts is TRL's own (each prompt repeated once per completion of its group); the
pause, checkpoints, resume and events are ftstudio's, as for every method.
"""

from __future__ import annotations

from typing import Any

from datasets import Dataset
from trl.trainer.grpo_config import GRPOConfig
from trl.trainer.grpo_trainer import GRPOTrainer

from ftstudio.config import TrainingConfig
from ftstudio.training.batches import render
from ftstudio.training.data import Example
from ftstudio.training.models import adapters_attached, trl_peft_config
from ftstudio.training.rewards import CustomReward, parse_rewards
from ftstudio.training.trainers import StudioTrainer, StudioTRLTrainer

FIGURES = ("reward", "reward_std", "completions/mean_length", "kl")
"""What every grpo run charts, as TRL logs it: the mean reward of all rewards summed and its spread within the
groups, how long the completions are, and the drift from the start (beta above 0 only)."""


def metrics(config: TrainingConfig) -> tuple[str, ...]:
    """The run's figures: FIGURES, then each reward's mean and spread (TRL names them by the reward's __name__)."""
    rewards = parse_rewards(config.rewards, custom_allowed=True)
    each = [f"rewards/{r.__name__}/{stat}" for r in rewards for stat in ("mean", "std")]
    return (*FIGURES, *each)


def prompt_row(example: Example, tokenizer: Any, max_length: int) -> dict[str, Any]:
    """One prompt as TRL samples from it: its messages and the answer the rewards may compare with."""
    messages, answer = example.messages, example.answer
    if messages and messages[-1]["role"] == "assistant":  # an instruction or conversation: its reply is the answer
        messages, answer = messages[:-1], answer or messages[-1]["content"]
    if not messages:
        raise ValueError("no prompt before the answer")
    tokens = len(tokenizer(render(tokenizer, messages, generation_prompt=True), add_special_tokens=False)["input_ids"])
    if tokens >= max_length:
        raise ValueError(f"the prompt alone fills data.max_length ({max_length} tokens); raise it or shorten the row")
    return {"prompt": messages, "answer": answer}


class StudioGRPOTrainer(StudioTRLTrainer, GRPOTrainer):
    pass


def build(
    config: TrainingConfig,
    model: Any,
    tokenizer: Any,
    arguments: dict[str, Any],
    train_rows: list[Any],
    val_rows: list[Any],
    **studio: Any,
) -> StudioTrainer:
    """The GRPO trainer, with the adapter attached (see preference.build for `arguments` and `studio`)."""
    g = config.grpo
    # The studio admitted these rewards (a custom one only where its owner allows code): the trainer runs them.
    rewards = parse_rewards(config.rewards, custom_allowed=True)
    for reward in rewards:
        if isinstance(reward, CustomReward):
            reward.load()  # its file runs now, so a broken one stops the run before the first step
    args = GRPOConfig(
        **{
            **arguments,
            # Evaluation samples a group for every held-out prompt: one group per batch.
            "per_device_eval_batch_size": g.generations,
        },
        activation_checkpointing=False,  # TRL turns it on unless told: model.gradient_checkpointing decides
        num_generations=g.generations,
        max_completion_length=g.max_completion_length,
        temperature=g.temperature,
        beta=g.beta,
    )
    peft_config = trl_peft_config(config, model)  # before the context below, which would undo its filter
    with adapters_attached():
        return StudioGRPOTrainer(
            model=model,
            reward_funcs=list(rewards),
            args=args,
            train_dataset=Dataset.from_list(train_rows),
            eval_dataset=Dataset.from_list(val_rows) if val_rows else None,
            processing_class=tokenizer,
            peft_config=peft_config,
            **{**studio, "train_sampler": None},
        )
