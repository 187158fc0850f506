"""From examples to batches: chat template, label masking, packing, padding, order.

Label masking: a conversation is rendered with the tokenizer's own chat template
(or `FALLBACK_TEMPLATE` when it has none), tokenized once with character offsets,
and a token is trained on (its label is its id) only when it starts inside an
assistant turn: from the end of the generation prompt (`<|im_start|>assistant\\n`)
to the end-of-turn token inclusive (`<|im_end|>`). Every prompt token, system
and user turn and padding gets -100. The text shape trains on every token and
ends with the eos token.

Throughput: no padding to max_length. Batches are padded to their own longest
row (dynamic padding), the sampler groups rows of similar length, and with
`packing` several examples share one row of up to max_length tokens: each
restarts its `position_ids` at 0 and the batch carries no `attention_mask`, which
transformers turns into a block-diagonal causal mask (flash-attention varlen on
GPU, an explicit mask with sdpa on CPU), so no example attends to another.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Sampler

from ftstudio.training.data import Example

IGNORE = -100

# For tokenizers without a chat template: plain markers a base model can learn quickly,
# with the eos token closing each assistant turn so the model learns to stop.
FALLBACK_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'user' %}{{ '### User:\n' + message['content'] + '\n\n' }}"
    "{% else %}{{ '### Assistant:\n' + message['content'] + eos_token + '\n\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Assistant:\n' }}{% endif %}"
)


def prepare_tokenizer(tokenizer: Any) -> None:
    """Give the tokenizer what training needs: a pad token and a chat template."""
    if tokenizer.pad_token is None:
        # Padding is masked out of attention and labels, so reusing eos is safe.
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = FALLBACK_TEMPLATE


@dataclass
class Tokenized:
    input_ids: list[int]
    labels: list[int]


def render(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool = False) -> str:
    try:
        text: str = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        return text
    except Exception as e:  # a template's own raise_exception (e.g. "roles must alternate") is a bad row
        raise ValueError(f"the model's chat template refuses this conversation ({e})") from None


def tokenize(example: Example, tokenizer: Any, max_length: int) -> Tokenized:
    """Token ids and labels for one example; ValueError when nothing trainable survives truncation."""
    eos = tokenizer.eos_token_id
    if not example.messages:
        ids: list[int] = tokenizer(example.text, add_special_tokens=True)["input_ids"]
        if eos is not None and (not ids or ids[-1] != eos):
            ids = [*ids, eos]
        ids = ids[:max_length]
        if len(ids) < 2:
            raise ValueError("text too short to learn from")
        return Tokenized(ids, list(ids))
    text, spans = _assistant_spans(tokenizer, example.messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    labels = [IGNORE] * len(ids)
    for i, (start, _end) in enumerate(enc["offset_mapping"]):
        if any(a <= start < b for a, b in spans):
            labels[i] = ids[i]
    # A template that ends an assistant turn with plain text (no special end-of-turn token)
    # would teach the model never to stop: close the final reply with eos.
    last = max((i for i, lab in enumerate(labels) if lab != IGNORE), default=-1)
    closes = last >= 0 and ids[last] in set(tokenizer.all_special_ids)
    if eos is not None and last >= 0 and not closes and example.messages[-1]["role"] == "assistant":
        ids.insert(last + 1, eos)
        labels.insert(last + 1, eos)
    ids, labels = ids[:max_length], labels[:max_length]
    if all(lab == IGNORE for lab in labels):
        raise ValueError(f"the prompt alone fills data.max_length ({max_length} tokens); raise it or shorten the row")
    return Tokenized(ids, labels)


def _assistant_spans(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character span of each assistant reply (end-of-turn token included)."""
    full = render(tokenizer, messages)
    spans: list[tuple[int, int]] = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render(tokenizer, messages[:i], generation_prompt=True)
        upto = render(tokenizer, messages[: i + 1])
        if not (full.startswith(upto) and upto.startswith(prompt)):
            # Templates that rewrite earlier turns (e.g. drop old reasoning) are not prefix-stable:
            # then only the final reply is trained on, which is always well defined.
            spans = []
            continue
        reply = upto[len(prompt) :]
        # Keep the end-of-turn token, drop the whitespace the template puts between turns.
        spans.append((len(prompt), len(prompt) + len(reply.rstrip())))
    if not spans and messages[-1]["role"] == "assistant":
        prompt = render(tokenizer, messages[:-1], generation_prompt=True)
        if not full.startswith(prompt):
            raise ValueError("the chat template renders this conversation inconsistently; use a simpler template")
        spans = [(len(prompt), len(full.rstrip()))]
    if not spans:
        raise ValueError("no assistant reply at the end of the conversation")
    return full, spans


@dataclass
class Row:
    """One training row: a single example, or several packed together."""

    input_ids: list[int]
    labels: list[int]
    position_ids: list[int] | None = None

    def __len__(self) -> int:
        return len(self.input_ids)


def pack(items: list[Tokenized], max_length: int) -> list[Row]:
    """First-fit-decreasing into rows of at most max_length tokens; positions restart per example."""
    order = sorted(range(len(items)), key=lambda i: (-len(items[i].input_ids), i))
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = len(items[i].input_ids)
        for b, free in enumerate(room):
            if n <= free:
                bins[b].append(i)
                room[b] -= n
                break
        else:
            bins.append([i])
            room.append(max_length - n)
    rows = []
    for members in bins:
        ids: list[int] = []
        labels: list[int] = []
        pos: list[int] = []
        for i in sorted(members):
            t = items[i]
            ids += t.input_ids
            # The first token of an example is never a target: it would be predicted from the previous example.
            labels += [IGNORE, *t.labels[1:]]
            pos += list(range(len(t.input_ids)))
        rows.append(Row(ids, labels, pos))
    return rows


class Collator:
    """Pads a batch to its own longest row; counts the real (non-pad) tokens it carries.

    Padding goes on the right. `padding_mask=False` leaves the attention mask out of
    unpacked batches, for models where right padding cannot reach a real token
    (`models.padding_mask_matters`): the labels alone keep pads out of the loss.

    `shape` (rows, width) pads every packed batch to exactly that shape instead, for
    torch.compile: one shape is one compile, where every new shape costs another
    (about a minute on a CPU). The extra rows are padding only: their own segment
    (packed rows carry no attention mask), -100 labels, not counted as real tokens.
    """

    def __init__(self, pad_id: int, shape: tuple[int, int] | None = None, padding_mask: bool = True) -> None:
        self.pad_id = pad_id
        self.shape = shape
        self.padding_mask = padding_mask

    def __call__(self, rows: list[Row]) -> dict[str, torch.Tensor]:
        packed = rows[0].position_ids is not None
        width = max(len(r) for r in rows)
        height = len(rows)
        if packed and self.shape:
            height, width = max(height, self.shape[0]), max(width, self.shape[1])
        ids = torch.full((height, width), self.pad_id, dtype=torch.long)
        labels = torch.full((height, width), IGNORE, dtype=torch.long)
        mask = torch.zeros((height, width), dtype=torch.long)
        pos = torch.arange(width).repeat(height, 1)  # padding rows: one segment each, from position 0
        for i, r in enumerate(rows):
            n = len(r)
            ids[i, :n] = torch.tensor(r.input_ids)
            labels[i, :n] = torch.tensor(r.labels)
            mask[i, :n] = 1
            if packed:
                pos[i, :n] = torch.tensor(r.position_ids)
                # Padding forms its own segment (positions from 0), so it is attended by nothing real.
                pos[i, n:] = torch.arange(width - n)
        batch = {"input_ids": ids, "labels": labels, "num_real_tokens": mask.sum()}
        if packed:
            batch["position_ids"] = pos
        elif self.padding_mask:
            batch["attention_mask"] = mask
        return batch


class EpochSampler(Sampler[int]):
    """Row order for one epoch, a function of (seed, epoch) only, so a resumed run sees the same order.

    With `group_by_length`, rows are shuffled, cut into mega-batches of 50 batches,
    sorted by length inside each, cut into batches, and the batches shuffled:
    little padding, and still a random mix across the epoch.
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int, group_by_length: bool) -> None:
        self.lengths = lengths
        self.batch_size = batch_size
        self.seed = seed
        self.group_by_length = group_by_length
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator()
        g.manual_seed(self.seed * 1_000_003 + self.epoch)
        perm = torch.randperm(len(self.lengths), generator=g).tolist()
        if not self.group_by_length:
            return iter(perm)
        mega = self.batch_size * 50
        batches: list[list[int]] = []
        for start in range(0, len(perm), mega):
            chunk = sorted(perm[start : start + mega], key=lambda i: -self.lengths[i])
            batches += [chunk[j : j + self.batch_size] for j in range(0, len(chunk), self.batch_size)]
        # Keep only the last batch (possibly short) in place; shuffle the full ones.
        full, tail = batches, []
        if batches and len(batches[-1]) < self.batch_size:
            full, tail = batches[:-1], [batches[-1]]
        shuffled = [full[i] for i in torch.randperm(len(full), generator=g).tolist()] + tail
        return iter([i for b in shuffled for i in b])


def steps_per_epoch(rows: int, batch_size: int, grad_accum: int, processes: int = 1) -> int:
    batches = math.ceil(rows / (batch_size * processes))
    return max(1, math.ceil(batches / grad_accum))
