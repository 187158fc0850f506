"""Training data: read a file, detect its shape, turn every row into a conversation.

Files: `.jsonl`, `.json` (a list of objects, or an object holding one list),
`.csv`, `.parquet`, or a directory (a dataset saved by `datasets.save_to_disk`,
or a folder of such files). A saved `DatasetDict` trains on its `train` split
(or its only one); another of its splits can be the validation set by name.
Shapes, detected from the columns:

    alpaca     instruction, input (optional), output, system (optional)
    sharegpt   conversations: [{from: human|gpt|system, value}]
    messages   messages: [{role: system|user|assistant, content}]   (OpenAI style)
    text       text                                                (plain language modelling)
    preference prompt (optional), chosen, rejected                 (DPO, ORPO, SimPO, KTO)
    unpaired   prompt, completion, label (true: a good completion) (KTO)
    prompts    prompt, answer (optional)                           (GRPO; its rewards may score the answer)

Preference pairs come in the shapes people publish them in: `prompt`, `chosen` and
`rejected` as text; `chosen` and `rejected` as whole conversations that share every
turn but the last (UltraFeedback's shape, with or without a `prompt` column); or
Anthropic HH's two transcripts, "\n\nHuman: ... \n\nAssistant: ...", with no prompt.
`prompt` may also be a list of messages, and a completion a one-turn list.

Every row becomes an `Example`: a list of chat messages (or one text) plus where
it came from (`data.jsonl line 7`). Rows of the wrong shape are skipped and
reported with their line; text that is not valid JSON, a shape that cannot be
detected, or no usable row at all is a `ValidationError` — raised here, before
any model is loaded. Nothing here needs a tokenizer, so `inspect_dataset` is
cheap enough for the studio to call while a person waits.

Held-out prompts (`evaluation.prompts`) are read the same way, except that a row
needs no answer (`prompts=True`): an alpaca row may leave out `output`, and a
conversation may end with a user turn.
"""

from __future__ import annotations

import json
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ftstudio.config import validation_fraction
from ftstudio.errors import Problem, ValidationError
from ftstudio.training.datafiles import (
    DATASET_SUFFIXES,
    FIELD,
    not_regular,
    preview,
    read_csv,
    read_json,
    read_jsonl,
    read_parquet,
    read_text,
)

if TYPE_CHECKING:
    from ftstudio.config import TrainingConfig

FORMATS = ("alpaca", "sharegpt", "messages", "text", "preference", "unpaired", "prompts")
# Bad rows are listed up to this many; the count covers all of them.
MAX_LISTED_PROBLEMS = 20

_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "bot": "assistant"}
_SHAREGPT_ROLES |= {"model": "assistant", "system": "system"}
_MESSAGE_ROLES = ("system", "user", "assistant")


@dataclass
class Example:
    where: str
    """Where the row came from, for messages: `data.jsonl line 7`."""
    messages: list[dict[str, str]] = field(default_factory=list)
    """The conversation (role, content); empty for the text shape."""
    text: str = ""
    """The text, for the text shape."""
    chosen: str = ""
    """The preferred reply, for the preference shape (`messages` is then the prompt)."""
    rejected: str = ""
    """The reply not preferred, for the preference shape."""
    completion: str = ""
    """The reply, for the unpaired shape (`messages` is then the prompt)."""
    label: bool = False
    """For the unpaired shape: whether `completion` is a good one."""
    answer: str = ""
    """For the prompts shape: the reference answer, if the row has one (`messages` is then the prompt)."""


@dataclass
class DatasetInfo:
    path: str
    """The file or directory inspected."""
    format: str
    """Detected (or requested) shape: alpaca, sharegpt, messages or text."""
    rows: int
    """Rows read, usable or not."""
    usable_rows: int
    """Rows that will be trained on."""
    preview: list[dict[str, Any]]
    """The first few rows as they are in the file."""
    problems: list[Problem]
    """Rows that will be skipped, each naming its line or row (the first few)."""
    skipped_rows: int = 0
    """Every row that will be skipped, listed or not."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "format": self.format,
            "rows": self.rows,
            "usable_rows": self.usable_rows,
            "skipped_rows": self.skipped_rows,
            "preview": self.preview,
            "problems": [{"field": p.field, "message": p.message} for p in self.problems],
        }


def inspect_dataset(
    path: Path,
    preview_rows: int = 5,
    data_format: str = "auto",
    split: str | None = None,
    *,
    max_row_bytes: int | None = None,
    prompts: bool = False,
) -> DatasetInfo:
    """Read and check a dataset without a tokenizer; raises ValidationError if nothing can be trained on.

    Rows are read one at a time and only counted, so the studio can check a file of any size.
    `max_row_bytes`: refuse a row larger than this (the studio's limit; None reads any row).
    `prompts`: the rows are held-out prompts, whose answers are optional."""
    info, _ = _load(
        Path(path), data_format, preview_rows, split, keep=False, max_row_bytes=max_row_bytes, prompts=prompts
    )
    return info


def load_examples(
    path: Path, data_format: str = "auto", split: str | None = None, *, prompts: bool = False
) -> tuple[DatasetInfo, list[Example]]:
    """Every usable row as an Example, with the inspection report. `split`: of a saved DatasetDict."""
    return _load(Path(path), data_format, 0, split, keep=True, max_row_bytes=None, prompts=prompts)


def splits(path: Path) -> list[str]:
    """The split names of a dataset saved by `DatasetDict.save_to_disk`, else []. Reads one small JSON file."""
    try:
        names = json.loads((Path(path) / "dataset_dict.json").read_text()).get("splits", [])
    except (OSError, ValueError, AttributeError, RecursionError):
        return []
    return [str(n) for n in names] if isinstance(names, list) else []


def _load(
    path: Path,
    data_format: str,
    preview_rows: int,
    split: str | None,
    *,
    keep: bool,
    max_row_bytes: int | None,
    prompts: bool = False,
) -> tuple[DatasetInfo, list[Example]]:
    name = f"{path.name} ({split} split)" if split else path.name
    shape = None if data_format == "auto" else data_format
    first_rows: list[dict[str, Any]] = []
    examples: list[Example] = []
    problems: list[Problem] = []
    rows = usable = skipped = 0
    for where, row in read_rows(path, split, max_row_bytes=max_row_bytes):
        rows += 1
        if shape is None:
            shape = detect_format(row, f"{name} {where}", prompts=prompts)
        if len(first_rows) < preview_rows:
            first_rows.append(row)
        try:
            example = to_example(row, shape, f"{name} {where}", prompts=prompts)
        except ValueError as e:
            skipped += 1
            if len(problems) < MAX_LISTED_PROBLEMS:
                problems.append(Problem(FIELD, f"{name} {where}: {e}"))
            continue
        usable += 1
        if keep:
            examples.append(example)
    what = "prompt" if prompts else "example"
    if not rows or shape is None:
        raise ValidationError(
            Problem(FIELD, f"{name} has no rows; add {'prompts' if prompts else 'training examples'} to it")
        )
    info = DatasetInfo(
        path=str(path),
        format=shape,
        rows=rows,
        usable_rows=usable,
        preview=preview(first_rows),
        problems=problems,
        skipped_rows=skipped,
    )
    if not usable:
        first = f" (first: {problems[0].message})" if problems else ""
        raise ValidationError(
            Problem(FIELD, f"{name}: none of its {rows} rows is a usable {shape} {what}{first}; fix the rows")
        )
    return info, examples


def read_rows(
    path: Path, split: str | None = None, *, max_row_bytes: int | None = None
) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, row) for every row: `line N` for JSON lines, `row N` for tables (1-based)."""
    if not path.exists():
        raise ValidationError(Problem(FIELD, f"{path} does not exist; check the path"))
    if path.is_dir():
        yield from _read_dir(path, split, max_row_bytes)
        return
    mode = path.stat().st_mode  # a stat never waits, even on a named pipe
    if not stat.S_ISREG(mode):
        raise not_regular(path, mode)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        yield from read_jsonl(path, max_row_bytes)
    elif suffix == ".json":
        yield from read_json(path, max_row_bytes)
    elif suffix == ".csv":
        yield from read_csv(path, max_row_bytes)
    elif suffix == ".parquet":
        yield from read_parquet(path, max_row_bytes)
    elif suffix == ".txt":
        yield from read_text(path, max_row_bytes)
    else:
        raise ValidationError(
            Problem(
                FIELD,
                f"{path.name}: unsupported file type {suffix or '(none)'}; use .jsonl, .json, .csv, .parquet or "
                ".txt (raw text, for method pretrain)",
            )
        )


def _read_dir(path: Path, split: str | None, max_row_bytes: int | None) -> Iterator[tuple[str, dict[str, Any]]]:
    if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
        import datasets

        try:
            ds = datasets.load_from_disk(str(path))
        except Exception as e:  # the datasets library raises many types for a damaged folder
            # Its message may quote the folder's files: name only the kind of failure.
            raise ValidationError(
                Problem(FIELD, f"{path.name}: not a readable saved dataset ({type(e).__name__}); save it again")
            ) from None
        if isinstance(ds, datasets.DatasetDict):
            if split is not None and split not in ds:
                raise ValidationError(
                    Problem(FIELD, f"{path.name} has no split {split!r}; its splits are {', '.join(ds)}")
                )
            ds = ds[split or ("train" if "train" in ds else next(iter(ds)))]
        for n, row in enumerate(ds, 1):
            yield f"row {n}", dict(row)
        return
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in DATASET_SUFFIXES)
    if not files:
        raise ValidationError(
            Problem(
                FIELD, f"{path.name}: a directory with no .jsonl/.json/.csv/.parquet/.txt files and no saved dataset"
            )
        )
    for file in files:
        rel = file.relative_to(path)
        for where, row in read_rows(file, max_row_bytes=max_row_bytes):
            yield f"{rel} {where}", row


def detect_format(row: dict[str, Any], where: str, *, prompts: bool = False) -> str:
    # Before `messages`: UltraFeedback's pairs carry a `messages` column beside `chosen` and `rejected`.
    if "chosen" in row and "rejected" in row:
        return "preference"
    if "completion" in row and "label" in row:
        return "unpaired"
    if "messages" in row:
        return "messages"
    if "conversations" in row:
        return "sharegpt"
    if "instruction" in row and ("output" in row or prompts):
        return "alpaca"
    if "text" in row:
        return "text"
    if "prompt" in row:
        return "prompts"
    # Column names only (never values), and few of them: a CSV header is the file's first line.
    names = sorted(str(c)[:40] for c in row)
    cols = ", ".join(names[:12]) + (f", … ({len(names)} in all)" if len(names) > 12 else "") if names else "none"
    raise ValidationError(
        Problem(
            FIELD,
            f"{where}: cannot tell the data shape from columns ({cols}); use alpaca (instruction/output), "
            "sharegpt (conversations), messages, text, or for preference methods prompt/chosen/rejected "
            "or prompt/completion/label",
        )
    )


def to_example(row: dict[str, Any], shape: str, where: str, *, prompts: bool = False) -> Example:
    """One row as an Example; ValueError says what is wrong with it. `prompts`: an answer is optional
    (an alpaca row without `output` ends with the user turn)."""
    if shape == "alpaca":
        instruction, inp = _text(row, "instruction"), _text(row, "input", True)
        output = _text(row, "output", prompts)
        messages = []
        system = _text(row, "system", True)
        if system:
            messages.append({"role": "system", "content": system})
        prompt = f"{instruction}\n\n{inp}" if inp else instruction
        messages.append({"role": "user", "content": prompt})
        if output or not prompts:
            messages.append({"role": "assistant", "content": output})
        return Example(where, messages)
    if shape == "text":
        return Example(where, text=_text(row, "text"))
    if shape == "preference":
        return _preference(row, where, prompts=prompts)
    if shape == "unpaired":
        return _unpaired(row, where, prompts=prompts)
    if shape == "prompts":
        return _prompt_row(row, where, prompts=prompts)
    key, role_key, content_key = (
        ("conversations", "from", "value") if shape == "sharegpt" else ("messages", "role", "content")
    )
    turns = row.get(key)
    if not isinstance(turns, list) or not turns:
        raise ValueError(f"`{key}` must be a non-empty list of turns")
    messages = []
    for i, turn in enumerate(turns, 1):
        if not isinstance(turn, dict):
            raise ValueError(f"turn {i} of `{key}` is not an object")
        raw_role = turn.get(role_key)
        role = _SHAREGPT_ROLES.get(str(raw_role).lower()) if shape == "sharegpt" else raw_role
        if role not in _MESSAGE_ROLES:
            # The value itself is not quoted: messages never carry a file's content.
            known = ", ".join(sorted(_SHAREGPT_ROLES)) if shape == "sharegpt" else ", ".join(_MESSAGE_ROLES)
            raise ValueError(f"turn {i} has a `{role_key}` that is not a role; use one of {known}")
        content = _content(turn.get(content_key))
        if content is None:
            raise ValueError(f"turn {i} has no text in `{content_key}`")
        messages.append({"role": role, "content": content})
    return _conversation_checked(where, messages, prompts=prompts)


def _turns(value: Any, key: str) -> list[dict[str, str]]:
    """A list of chat messages (role/content, or ShareGPT's from/value) as role/content dicts; ValueError names the
    turn that is not one."""
    if not isinstance(value, list) or not value:
        raise ValueError(f"`{key}` must be text or a non-empty list of messages")
    out = []
    for i, turn in enumerate(value, 1):
        if not isinstance(turn, dict):
            raise ValueError(f"turn {i} of `{key}` is not an object")
        sharegpt = "role" not in turn and "from" in turn
        raw_role = turn.get("from") if sharegpt else turn.get("role")
        role = _SHAREGPT_ROLES.get(str(raw_role).lower()) if sharegpt else raw_role
        if role not in _MESSAGE_ROLES:
            raise ValueError(f"turn {i} of `{key}` has a role that is not one; use one of {', '.join(_MESSAGE_ROLES)}")
        content = _content(turn.get("value") if sharegpt else turn.get("content"))
        if content is None:
            raise ValueError(f"turn {i} of `{key}` has no text")
        out.append({"role": role, "content": content})
    return out


_HH_TURN = re.compile(r"\n\n(Human|Assistant): ")


def _hh_turns(text: str, key: str) -> list[dict[str, str]]:
    """Anthropic HH's transcript ("\n\nHuman: ...\n\nAssistant: ...") as messages."""
    parts = _HH_TURN.split(text)
    if len(parts) < 3 or parts[0].strip():
        raise ValueError(
            f"`{key}` is text but there is no `prompt`; give a prompt column, or write `{key}` as an HH transcript "
            "(Human: / Assistant: turns) or a list of messages"
        )
    return [
        {"role": "user" if who == "Human" else "assistant", "content": said.strip()}
        for who, said in zip(parts[1::2], parts[2::2], strict=True)
    ]


def _prompt_turns(row: dict[str, Any]) -> list[dict[str, str]]:
    value = row.get("prompt")
    if isinstance(value, str):
        if not value.strip():
            raise ValueError("`prompt` is empty")
        return [{"role": "user", "content": value}]
    return _turns(value, "prompt")


def _reply(value: Any, key: str) -> str:
    """A completion given as text, or as a list whose last turn is the assistant's reply."""
    if value is None:
        raise ValueError(f"`{key}` is missing")
    if isinstance(value, str):
        if not value.strip():
            raise ValueError(f"`{key}` is empty")
        return value
    turns = _turns(value, key)
    if turns[-1]["role"] != "assistant" or not turns[-1]["content"].strip():
        raise ValueError(f"`{key}` must end with an assistant turn with text")
    return turns[-1]["content"]


def _preference(row: dict[str, Any], where: str, *, prompts: bool) -> Example:
    """One preference pair: the shared prompt turns, the chosen and the rejected reply."""
    for key in ("chosen", "rejected"):
        if row.get(key) is None:
            raise ValueError(f"`{key}` is missing; a preference pair needs prompt, chosen and rejected")
    chosen, rejected = row["chosen"], row["rejected"]
    has_prompt = row.get("prompt") is not None
    if not has_prompt or (isinstance(chosen, list) and isinstance(rejected, list)):
        # Whole conversations (or HH transcripts): the prompt is every turn they share.
        a = _turns(chosen, "chosen") if isinstance(chosen, list) else _hh_turns(_text(row, "chosen"), "chosen")
        b = (
            _turns(rejected, "rejected")
            if isinstance(rejected, list)
            else _hh_turns(_text(row, "rejected"), "rejected")
        )
        shared = 0
        while shared < min(len(a), len(b)) - 1 and a[shared] == b[shared]:
            shared += 1
        if len(a) != shared + 1 or len(b) != shared + 1 or a[-1]["role"] != "assistant" or b[-1]["role"] != "assistant":
            raise ValueError("`chosen` and `rejected` must share every turn but a last assistant reply")
        prompt = a[:shared] if shared else (_prompt_turns(row) if has_prompt else [])
        if not prompt:
            raise ValueError("no prompt: give a `prompt` column, or conversations that start with a user turn")
        good, bad = a[-1]["content"], b[-1]["content"]
    else:
        prompt = _prompt_turns(row)
        good, bad = _reply(chosen, "chosen"), _reply(rejected, "rejected")
    if not good.strip() or not bad.strip():
        raise ValueError(f"`{'chosen' if not good.strip() else 'rejected'}` is empty")
    if prompts:  # a held-out prompt: the chosen reply is the expected answer
        return _conversation_checked(where, [*prompt, {"role": "assistant", "content": good}], prompts=True)
    if good.strip() == bad.strip():
        raise ValueError("`chosen` and `rejected` are the same reply: nothing to prefer")
    return Example(where, prompt, chosen=good, rejected=bad)


def _unpaired(row: dict[str, Any], where: str, *, prompts: bool) -> Example:
    """One unpaired completion (KTO): the prompt turns, the completion, and whether it is a good one."""
    if row.get("prompt") is None:
        raise ValueError("`prompt` is missing; an unpaired example needs prompt, completion and label")
    prompt = _prompt_turns(row)
    completion = _reply(row.get("completion"), "completion")
    label = row.get("label")
    if isinstance(label, str) and label.strip().lower() in ("true", "false"):  # a CSV cell
        label = label.strip().lower() == "true"
    if not isinstance(label, bool):
        raise ValueError("`label` must be true (a good completion) or false (a bad one)")
    if prompts:
        messages = [*prompt, {"role": "assistant", "content": completion}] if label else prompt
        return _conversation_checked(where, messages, prompts=True)
    return Example(where, prompt, completion=completion, label=label)


def _prompt_row(row: dict[str, Any], where: str, *, prompts: bool) -> Example:
    """One prompt (GRPO's data), with its reference answer when the row has one."""
    if row.get("prompt") is None:
        raise ValueError("`prompt` is missing; give each row a prompt (and an answer for exact or numeric)")
    turns = _prompt_turns(row)
    if turns[-1]["role"] == "assistant":
        raise ValueError("`prompt` ends with an assistant turn: nothing left to answer")
    value = row.get("answer")
    if isinstance(value, int | float) and not isinstance(value, bool) and value == value:
        value = format(value, "g") if isinstance(value, float) else str(value)  # a number column of a CSV
    answer = _text({"answer": value}, "answer", optional=True)
    if prompts:
        return _conversation_checked(
            where, [*turns, {"role": "assistant", "content": answer}] if answer.strip() else turns, prompts=True
        )
    return Example(where, turns, answer=answer)


def _conversation_checked(where: str, messages: list[dict[str, str]], *, prompts: bool) -> Example:
    if prompts:
        if all(m["role"] == "system" for m in messages):
            raise ValueError("only system turns: no prompt to answer")
    elif not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        raise ValueError("no assistant turn with text: nothing to learn from")
    return Example(where, messages)


def _text(row: dict[str, Any], key: str, optional: bool = False) -> str:
    value = row.get(key)
    if value is None or (isinstance(value, float) and value != value):  # NaN: an empty CSV/parquet cell
        value = ""
    if not isinstance(value, str):
        raise ValueError(f"`{key}` must be text, got {type(value).__name__}")
    if not optional and not value.strip():
        raise ValueError(f"`{key}` is empty")
    return value


def _content(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    # OpenAI content parts: [{"type": "text", "text": "..."}]
    if isinstance(value, list) and all(isinstance(p, dict) for p in value):
        texts = [p.get("text") for p in value if p.get("type") == "text"]
        if texts and all(isinstance(t, str) for t in texts):
            return "".join(t for t in texts if isinstance(t, str))
    return None


def split_validation(
    config: TrainingConfig, examples: list[Any], home: Path
) -> tuple[list[Any], list[Any], dict[str, Any]]:
    """(train, validation) examples: a seeded fraction of the data, or a separate file."""
    import random

    from ftstudio.training.builtin import resolve_dataset

    value = config.data.validation.strip()
    fraction = validation_fraction(value)
    if fraction is None:
        data_path = resolve_dataset(config.data.path, home)
        # A split of the training dataset itself (a saved DatasetDict), by name; else a file.
        split = value if value in splits(data_path) else None
        path = data_path if split else resolve_dataset(value, home)
        try:
            _, val = load_examples(path, config.data.format, split)
        except ValidationError as e:
            raise ValidationError([Problem("data.validation", p.message) for p in e.problems]) from None
        where = f"the {split} split of {path}" if split else str(path)
        return examples, val, {"validation": where, "validation_rows": len(val)}
    # At least one validation row when asked for, never all of them; none from a tiny dataset.
    n_val = (
        max(1, min(round(len(examples) * fraction), len(examples) - 1)) if fraction > 0 and len(examples) >= 4 else 0
    )
    order = list(range(len(examples)))
    random.Random(config.optim.seed).shuffle(order)
    val_idx = set(order[:n_val])
    train = [e for i, e in enumerate(examples) if i not in val_idx]
    val = [examples[i] for i in sorted(val_idx)]
    return train, val, {"validation": f"{fraction:g} of the data", "validation_rows": len(val)}
