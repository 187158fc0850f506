"""Preference tuning: dpo (DPO, IPO, SimPO), orpo and kto, trained by TRL's trainers.

TRL computes the losses. What stays ftstudio's: the rows, read and checked by data.py;
the prompt rendered with the model's chat template and tokenized here, the way SFT
renders it (a model tuned with both sees one format); length-grouped batches; progress
events; pause, checkpoints and resume (`trainers.StudioTrainer` comes first in each
class below, so its hooks run for every method).

The reference model. DPO, IPO and KTO score the model against the model as it started.
Here that is the base model with the adapter switched off: TRL attaches the adapter
itself (from `models.lora_config`) and computes the reference with adapters disabled,
so neither a second model nor a second adapter is held in memory. SimPO and ORPO need
no reference at all.

Rows. Every example becomes token ids once, before the model loads: `prompt_ids`,
`chosen_ids` and `rejected_ids` for a pair, as DPO's collator takes them; `prompt_ids`,
`completion_ids` and `label` for kto (a pair gives kto two rows, the chosen reply
labelled good and the rejected one bad); and for SimPO and ORPO, whose trainers are
TRL's older (experimental) kind, the prompt+reply sequences with their labels, their
own tokenizing step skipped. KTO estimates drift from the reference on completions
paired with other prompts of the batch: that pairing is made in the collator here,
over the batch as ftstudio's sampler formed it.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import Any

import torch
from datasets import Dataset
from trl.import_utils import TRLExperimentalWarning
from trl.trainer.dpo_config import DPOConfig
from trl.trainer.dpo_trainer import DPOTrainer
from trl.trainer.kto_config import KTOConfig
from trl.trainer.kto_trainer import KTOTrainer

from ftstudio.config import TrainingConfig, precompute_reference
from ftstudio.training.batches import IGNORE, render
from ftstudio.training.data import Example
from ftstudio.training.models import adapters_attached, trl_peft_config
from ftstudio.training.trainers import StudioTrainer, StudioTRLTrainer

with warnings.catch_warnings():
    # SimPO and ORPO are in TRL's experimental package, which says so on import: the version is pinned and its
    # trainers are tested here, so the warning would only worry the person reading training.log.
    warnings.simplefilter("ignore", TRLExperimentalWarning)
    from trl.experimental.cpo import CPOConfig, CPOTrainer
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

_PAIR = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")
METRICS: dict[str, tuple[str, ...]] = {
    "dpo": _PAIR,
    "orpo": (*_PAIR, "nll_loss", "log_odds_ratio"),
    "kto": ("rewards/chosen", "rewards/rejected", "rewards/margins", "kl"),
}
"""What each method charts, as TRL logs it: the implicit rewards of the chosen and rejected replies, their margin,
how often the chosen one wins; ORPO's SFT part and odds ratio; KTO's drift from the reference."""


def _encode(tokenizer: Any, prompt: list[dict[str, str]], replies: list[str]) -> tuple[list[int], list[list[int]]]:
    """The prompt's ids (up to the generation prompt) and each reply's ids (through its end-of-turn token)."""
    prompt_text = render(tokenizer, prompt, generation_prompt=True)
    prompt_ids: list[int] = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    specials = set(tokenizer.all_special_ids)
    eos = tokenizer.eos_token_id
    out = []
    for reply in replies:
        full = render(tokenizer, [*prompt, {"role": "assistant", "content": reply}])
        if not full.startswith(prompt_text):
            raise ValueError("the chat template renders this prompt inconsistently; use a simpler template")
        # Keep the end-of-turn token, drop the whitespace the template puts after it.
        ids: list[int] = tokenizer(full[len(prompt_text) :].rstrip(), add_special_tokens=False)["input_ids"]
        if eos is not None and ids and ids[-1] not in specials:
            ids.append(eos)  # a template that ends a reply in plain text would teach the model never to stop
        out.append(ids)
    return prompt_ids, out


def _room(prompt_ids: list[int], max_length: int) -> int:
    room = max_length - len(prompt_ids)
    if room < 1:
        raise ValueError(f"the prompt alone fills data.max_length ({max_length} tokens); raise it or shorten the row")
    return room


def pair_row(example: Example, tokenizer: Any, max_length: int) -> dict[str, Any]:
    """One preference pair as token ids; ValueError when the pair cannot train (see `_room`)."""
    prompt, (chosen, rejected) = _encode(tokenizer, example.messages, [example.chosen, example.rejected])
    room = _room(prompt, max_length)
    chosen, rejected = chosen[:room], rejected[:room]
    if chosen == rejected:
        raise ValueError(
            f"`chosen` and `rejected` are the same in the {room} tokens data.max_length leaves them; raise it"
        )
    return {"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected}


def unpaired_rows(example: Example, tokenizer: Any, max_length: int) -> list[dict[str, Any]]:
    """kto's rows: one labelled completion, or a pair's two (chosen: good, rejected: bad)."""
    if example.chosen:
        replies, labels = [example.chosen, example.rejected], [True, False]
    else:
        replies, labels = [example.completion], [example.label]
    prompt, ids = _encode(tokenizer, example.messages, replies)
    room = _room(prompt, max_length)
    return [
        {"prompt_ids": prompt, "completion_ids": c[:room], "label": label} for c, label in zip(ids, labels, strict=True)
    ]


def rows_for(method: str, example: Example, tokenizer: Any, max_length: int) -> list[dict[str, Any]]:
    """The rows `method` trains on for one example."""
    if method == "kto":
        return unpaired_rows(example, tokenizer, max_length)
    return [pair_row(example, tokenizer, max_length)]


def length(row: dict[str, Any]) -> int:
    """Tokens in the longest sequence the row becomes: what the sampler groups batches by."""
    reply = max(len(row.get("chosen_ids", ())), len(row.get("rejected_ids", ())), len(row.get("completion_ids", ())))
    return len(row["prompt_ids"]) + reply


def _sequences(row: dict[str, Any]) -> dict[str, Any]:
    """A pair as TRL's older preference trainers (CPO for SimPO, ORPO) tokenize it themselves: each reply after
    the prompt, labelled on the reply only."""
    prompt = row["prompt_ids"]
    out: dict[str, Any] = {"prompt_input_ids": prompt, "prompt_attention_mask": [1] * len(prompt)}
    for side in ("chosen", "rejected"):
        reply = row[f"{side}_ids"]
        out[f"{side}_input_ids"] = prompt + reply
        out[f"{side}_attention_mask"] = [1] * (len(prompt) + len(reply))
        out[f"{side}_labels"] = [IGNORE] * len(prompt) + reply
    return out


class Collator:
    """TRL's collator, plus what ftstudio adds to a batch: the count of real tokens StudioTrainer reads
    (`num_real_tokens`), and for kto each completion paired with the previous row's prompt (`KL_completion_ids`),
    the mismatched pairs its drift estimate needs."""

    def __init__(self, inner: Callable[[list[dict[str, Any]]], dict[str, Any]], kl: bool = False) -> None:
        self.inner = inner
        self.kl = kl

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        if self.kl:
            rows = [{**row, "KL_completion_ids": rows[i - 1]["completion_ids"]} for i, row in enumerate(rows)]
        batch = self.inner(rows)
        counted = [v for k, v in batch.items() if k.endswith("attention_mask") and not k.startswith(("KL_", "prompt_"))]
        batch["num_real_tokens"] = sum((m.sum() for m in counted), torch.tensor(0))
        return batch


class StudioDPOTrainer(StudioTRLTrainer, DPOTrainer):
    def _prepare_dataset(self, dataset: Any, processing_class: Any, args: Any, dataset_name: str) -> Any:
        return dataset  # tokenized already (pair_row)


class StudioKTOTrainer(StudioTRLTrainer, KTOTrainer):
    def _prepare_dataset(self, dataset: Any, processing_class: Any, args: Any, dataset_name: str) -> Any:
        return dataset  # tokenized already (unpaired_rows); the KL pairs come from Collator


class StudioCPOTrainer(StudioTRLTrainer, CPOTrainer):
    def tokenize_row(self, feature: dict[str, Any], model: Any = None) -> dict[str, Any]:
        return feature  # tokenized already (_sequences)


class StudioORPOTrainer(StudioTRLTrainer, ORPOTrainer):
    def tokenize_row(self, feature: dict[str, Any], model: Any = None) -> dict[str, Any]:
        return feature


def build(
    config: TrainingConfig,
    model: Any,
    tokenizer: Any,
    arguments: dict[str, Any],
    train_rows: list[Any],
    val_rows: list[Any],
    epochs: float = 0.0,
    **studio: Any,
) -> StudioTrainer:
    """The trainer for `config.method`, with the adapter attached: `arguments` are the TrainingArguments every method
    shares, `epochs` how many passes over the rows the run will make, `studio` StudioTrainer's own (sampler, fence,
    checkpoint clock) and the callbacks."""
    p = config.preference
    precompute = precompute_reference(config, epochs)
    method = config.method
    # TRL's configs turn gradient checkpointing on unless told: here it follows model.gradient_checkpointing,
    # which load_model has already applied.
    shared = {**arguments, "activation_checkpointing": False, "max_length": config.data.max_length}
    if precompute:
        # TRL's pass over the data draws progress bars; training.log gets the one line below instead.
        import datasets

        os.environ["TQDM_DISABLE"] = "1"
        datasets.disable_progress_bars()
        print(
            f"scoring {len(train_rows) + len(val_rows)} rows with the reference model once, before the first step "
            f"(preference.precompute_reference {p.precompute_reference}, {epochs:.2g} epochs planned)",
            flush=True,
        )
    legacy = method == "orpo" or (method == "dpo" and p.loss == "simpo")
    if legacy:
        train_rows, val_rows = [_sequences(r) for r in train_rows], [_sequences(r) for r in val_rows]
    cls: type[StudioTrainer]
    if method == "kto":
        cls = StudioKTOTrainer
        args: Any = KTOConfig(
            **shared,
            beta=p.beta,
            desirable_weight=p.desirable_weight,
            undesirable_weight=p.undesirable_weight,
            precompute_ref_log_probs=precompute,
        )
    elif method == "orpo":
        cls, args = StudioORPOTrainer, ORPOConfig(**shared, beta=p.beta)
    elif p.loss == "simpo":
        # SimPO is CPO's simpo loss with CPO's own SFT term off (cpo_alpha 0), as the SimPO paper trains it.
        cls = StudioCPOTrainer
        args = CPOConfig(**shared, beta=p.beta, loss_type="simpo", cpo_alpha=0.0, simpo_gamma=p.simpo_gamma)
    else:
        cls = StudioDPOTrainer
        args = DPOConfig(**shared, beta=p.beta, loss_type=[p.loss], precompute_ref_log_probs=precompute)
    peft_config = trl_peft_config(config, model)  # before the context below, which would undo its filter
    with adapters_attached():
        trainer = cls(
            model=model,
            args=args,
            train_dataset=Dataset.from_list(train_rows),
            eval_dataset=Dataset.from_list(val_rows) if val_rows else None,
            processing_class=tokenizer,
            peft_config=peft_config,
            **studio,
        )
    trainer.data_collator = Collator(trainer.data_collator, kl=method == "kto")
    return trainer
