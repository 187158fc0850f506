"""What a request to the HTTP API may carry, and what it is told when it carries something else.

The body of `POST /api/tasks` is `{"name": ..., "config": {...}}`. People (and
scripts written against other studios) often send settings at the top level,
`{"model": "x", "dataset": "y"}`: that is a 422 naming each misplaced key and
where it belongs, not a task trained on the defaults. Integer query parameters
carry bounds (FastAPI `Query(ge=, le=)`, so /openapi.json shows them too): SQLite
holds 64-bit integers, and a larger one used to reach it as a 500.
"""

from __future__ import annotations

from typing import Any

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field

from ftstudio.bounds import shown
from ftstudio.errors import Problem, ValidationError

MAX_NAME_CHARS = 1000  # names are cut to 200 characters at submit; far longer is not a name
SEQ_MAX = 2**62  # event sequence numbers and byte offsets: far past any real task, inside SQLite's range
OFFSET_MAX = 1_000_000_000  # tasks to skip when paging


MAX_DIGITS = 64  # far past any bound here (2**64 has 20 digits)
NUMBER_PARAMS = ("limit", "offset", "after")


def short_numbers(request: Request) -> None:
    """The integer query parameters, refused by their length before they are read: `000…0` of 5,000
    characters is 0 to int() and in range, but it is no number anyone means, and reading it costs time.
    A router-wide dependency, so it runs before the parameters are parsed."""
    for name in NUMBER_PARAMS:
        value = request.query_params.get(name)
        if value is not None and len(value) > MAX_DIGITS:
            raise ValidationError(
                Problem(name, f"must be a whole number of at most {MAX_DIGITS} digits (got {len(value):,} characters)")
            )


class TaskCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(default=None, max_length=MAX_NAME_CHARS, description="A name to recognise the task by")
    config: dict[str, Any] = Field(
        default_factory=dict, description="TrainingConfig as nested JSON; see /api/config/fields"
    )
    strict: bool = Field(
        default=False,
        description="Refuse the task when its data warns (truncation, leaked held-out prompts) instead of recording it",
    )


class TaskExtend(BaseModel):
    """How much more to train a completed task: one of the two."""

    model_config = ConfigDict(extra="forbid")

    epochs: float | None = Field(default=None, gt=0, le=10_000, description="More epochs (tasks bounded by epochs)")
    steps: int | None = Field(default=None, gt=0, le=1_000_000_000, description="More steps (tasks with max_steps)")


# Top-level keys people send by habit, and the config field each one means.
MISPLACED: dict[str, str] = {
    "model": "model.name",
    "model_name": "model.name",
    "base_model": "model.name",
    "model_name_or_path": "model.name",
    "dataset": "data.path",
    "data_path": "data.path",
    "dataset_path": "data.path",
    "train_file": "data.path",
    "epochs": "optim.epochs",
    "num_epochs": "optim.epochs",
    "num_train_epochs": "optim.epochs",
    "learning_rate": "optim.learning_rate",
    "lr": "optim.learning_rate",
    "max_steps": "optim.max_steps",
    "batch_size": "optim.batch_size",
    "per_device_train_batch_size": "optim.batch_size",
    "grad_accum": "optim.grad_accum",
    "gradient_accumulation_steps": "optim.grad_accum",
    "seed": "optim.seed",
    "lora_rank": "lora.rank",
    "rank": "lora.rank",
    "lora_r": "lora.rank",
    "lora_alpha": "lora.alpha",
    "max_length": "data.max_length",
    "max_seq_length": "data.max_length",
    "cutoff_len": "data.max_length",
    "preset": "preset",
    **{section: section for section in ("data", "lora", "optim", "checkpoint", "logging", "evaluation")},
}


def misplaced(key: str) -> str:
    """The message for an unknown top-level key of a task request."""
    path = MISPLACED.get(key)
    if path is None:
        return (
            "not a field of the request, which has only name and config; "
            "settings go inside config (see GET /api/config/fields)"
        )
    *outer, last = path.split(".")
    inner: str = "{...}" if path in ("model", "data", "lora", "optim", "checkpoint", "logging", "evaluation") else "..."
    example = f'{{"{last}": {inner}}}'
    for part in reversed(outer):
        example = f'{{"{part}": {example}}}'
    return f'not a field of the request; settings go inside config, e.g. {{"config": {example}}} (config.{path})'


def request_problems(errors: list[Any]) -> list[dict[str, str]]:
    """FastAPI's validation errors as `{"field", "message"}` a person can act on."""
    out = []
    for e in errors:
        loc = [str(p) for p in e.get("loc", ())]
        where, names = (loc[0], loc[1:]) if loc and loc[0] in ("body", "query", "path", "header") else ("", loc)
        field = ".".join(names)
        out.append({"field": field, "message": _message(where, field, e)})
    return out


def _message(where: str, field: str, e: dict[str, Any]) -> str:
    kind = e.get("type", "")
    ctx = e.get("ctx") or {}
    got = f" (got {shown(e['input'])})" if "input" in e and where == "query" else ""
    if kind == "extra_forbidden" and where == "body":
        return misplaced(field)
    if kind == "json_invalid":
        return f"the request body is not valid JSON ({ctx.get('error', 'malformed')})"
    if where == "body" and not field and kind in ("model_type", "model_attributes_type", "dict_type"):
        return 'the request body must be a JSON object: {"name": "...", "config": {...}}'
    if field == "config" and kind == "dict_type":
        return 'must be a JSON object of settings, e.g. {"preset": "cpu-demo", "optim": {"epochs": 1}}'
    if kind == "string_type":
        return "must be text"
    if kind == "string_too_long":
        return f"must be at most {ctx.get('max_length', 0):,} characters long"
    if kind.startswith("int_"):
        return f"must be a whole number{got}"
    if kind == "less_than_equal":
        return f"must be at most {ctx.get('le', 0):,}{got}"
    if kind == "greater_than_equal":
        return f"must be at least {ctx.get('ge', 0):,}{got}"
    return str(e.get("msg", "is not valid"))


def last_event_id(header: str) -> int | None:
    """A reconnecting page's Last-Event-ID, or None when it is not one of our ids (plain ASCII digits,
    at most SEQ_MAX): str.isdigit() is also true of "١٢" and "²", and int() of 30 digits overflows SQLite."""
    if not (header.isascii() and header.isdigit()) or len(header) > 19:
        return None
    value = int(header)
    return value if value <= SEQ_MAX else None
