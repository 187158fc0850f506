"""The progress channel between trainer and studio: `events.jsonl`.

One JSON object a line, `\\n`-terminated, appended and flushed by the trainer.
The studio reads it by byte offset and consumes complete lines only, so a line
being written while it reads is picked up on the next read, never half-parsed.
The studio never parses free-form log text for status.

Kinds (every event has `kind` and `ts`, unix seconds):

    status       phase ("loading_model", "loading_data", "saving", ...), message
    train_begin  total_steps, total_epochs, steps_per_epoch, trainable_params, resumed_from_step
    progress     step, total_steps, epoch, total_epochs, loss, lr, grad_norm,
                 tokens_per_s, tokens (real tokens seen so far), eta_s, step_s (mean seconds per optimizer step
                 since the last progress event, the steps alone)
    eval         step, epoch, eval_loss
    checkpoint   step, path
    samples      stage ("final" or "checkpoint-N"), step, count, seconds: the held-out prompts of that
                 stage are answered, in evals/<stage>.json (see ftstudio.evaluation)
    train_end    summary fields (steps, final_loss, best_loss, tokens, tokens_per_s, wall_s, step_s: this
                 attempt's mean seconds per optimizer step)
    suspended    step, total_steps, checkpoint ("checkpoint-N", or null when no step was taken):
                 training stopped for a pause; the next start resumes from that checkpoint
    error        message (one line, for a person), error_type
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

KINDS = ("status", "train_begin", "progress", "eval", "checkpoint", "samples", "train_end", "suspended", "error")


class EventWriter:
    """Appends events for one task; safe to reopen after a resume (it appends)."""

    def __init__(self, path: Path, fence: Callable[[], None] | None = None) -> None:
        self.path = path
        self.fence = fence
        """Called before every write; the trainer's exits when a newer attempt owns the task (fence.py)."""
        self._f: IO[str] = open(path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115

    def emit(self, kind: str, **fields: Any) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown event kind {kind!r}")
        if self.fence is not None:
            self.fence()
        # NaN/inf are not JSON: a diverged loss is written as null (the trainer's guard reports it).
        clean = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in fields.items()}
        record = {"kind": kind, "ts": round(time.time(), 3), **clean}
        self._f.write(json.dumps(record, separators=(",", ":"), allow_nan=False, default=_jsonable) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> EventWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _jsonable(value: Any) -> Any:
    # numpy / torch scalars
    if hasattr(value, "item"):
        return value.item()
    return str(value)


@dataclass
class Chunk:
    events: list[dict[str, Any]]
    offset: int  # byte offset just past the last complete line consumed
    bad_lines: int  # complete lines that were not JSON objects (counted, skipped)
    lines: list[str] = field(default_factory=list)  # each event's line as written, for storing without re-encoding
    line_numbers: list[int] = field(
        default_factory=list
    )  # each event's line, counted from `offset` of the read (1-based)


# A line that may hold a number JSON cannot carry: NaN, Infinity, or an exponent that overflows.
# Only such lines (rare) are parsed a second time, strictly: the common line costs one regex search.
_MAYBE_NOT_FINITE = re.compile(r"NaN|Infinity|[eE][+]?\d{3}")


def _not_finite(token: str) -> float:
    raise ValueError(f"{token} is not JSON")


def _finite_float(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        raise ValueError(f"{text} is out of range")
    return number


def read_from(path: Path, offset: int, max_bytes: int = 4 << 20) -> Chunk:
    """Complete events after byte `offset`. A trailing partial line is left for next time."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size <= offset:
                return Chunk([], offset, 0)
            f.seek(offset)
            # Only what is there: read(max_bytes) allocates max_bytes (4 MB) on every call, which
            # was a quarter of the studio's CPU while tailing 20 busy tasks (bench/bench_supervisor.py).
            data = f.read(min(max_bytes, size - offset))
    except FileNotFoundError:
        return Chunk([], offset, 0)
    end = data.rfind(b"\n")
    if end < 0:
        return Chunk([], offset, 0)
    events: list[dict[str, Any]] = []
    lines: list[str] = []
    bad = 0
    numbers: list[int] = []
    # split("\n"), not splitlines(): a U+2028 inside a line is text, not a line break.
    for number, raw in enumerate(data[:end].decode("utf-8", "replace").split("\n"), 1):
        if not raw.strip():
            continue
        raw = raw.removesuffix("\r")
        try:
            obj = json.loads(raw)
            if _MAYBE_NOT_FINITE.search(raw):
                # NaN / Infinity / 1e999 would be stored, then break every JSON reply that carries the event.
                json.loads(raw, parse_constant=_not_finite, parse_float=_finite_float)
        except ValueError:
            bad += 1
            continue
        if isinstance(obj, dict) and isinstance(obj.get("kind"), str):
            events.append(obj)
            lines.append(raw)
            numbers.append(number)
        else:
            bad += 1
    return Chunk(events, offset + end + 1, bad, lines, numbers)
