"""What an event of events.jsonl writes into its task's row, and what the store cannot keep.

The trainer's events are read from a file anything could have written: every
value is checked before it reaches SQLite (an integer past 64 bits, NaN, a lone
surrogate), so one bad record costs its own task, never the others.
"""

from __future__ import annotations

import math
from typing import Any

# Fields of the latest progress that an event may carry into the task row.
PROGRESS_FIELDS = ("step", "total_steps", "epoch", "total_epochs", "loss", "eval_loss", "lr", "tokens_per_s", "eta_s")

INT64 = range(-(2**63), 2**63)  # what an SQLite INTEGER holds


class UnstorableEvent(ValueError):
    """An event holds a value the store cannot keep (an integer past 64 bits)."""

    def __init__(self, index: int, what: str) -> None:
        super().__init__(what)
        self.index = index
        self.what = what


def num(value: Any, default: float) -> float:
    """A time stamp from a file: anything but a finite number (10**400 too) is replaced, not stored."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return default
    try:
        number = float(value)
    except OverflowError:
        return default
    return number if math.isfinite(number) else default


def text(value: str) -> str:
    """Text SQLite can encode: a lone surrogate (JSON's "\\ud800") would fail the whole batch."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return value.encode("utf-8", "replace").decode("utf-8")
    return value


def latest_progress(evs: list[dict[str, Any]]) -> dict[str, Any]:
    """The task-row fields a batch of events leaves behind, as if each event were applied in turn.

    Only the last event of each kind is looked at: a later event of a kind carries the same
    fields as an earlier one, and looking at every event was a quarter of the studio's CPU
    while supervising 20 busy tasks (bench/bench_supervisor.py).
    """
    last: dict[Any, int] = {}
    for i, ev in enumerate(evs):
        last[ev.get("kind")] = i
    out: dict[str, Any] = {}
    for i in sorted(last.values()):
        try:
            out.update(progress_of(evs[i]))
        except UnstorableEvent as e:
            raise UnstorableEvent(i, e.what) from None
    return out


def progress_of(ev: dict[str, Any]) -> dict[str, Any]:
    """Which task-row fields an event updates."""
    kind = ev.get("kind")
    out: dict[str, Any] = {}
    if kind in ("progress", "eval", "train_begin", "train_end"):
        for k in PROGRESS_FIELDS:
            v = ev.get(k)
            t = type(v)  # not isinstance: a bool is an int too
            if t is int:
                if v not in INT64:
                    raise UnstorableEvent(0, f"{k} is out of range")
                out[k] = v
            elif (
                t is float and v is not None and math.isfinite(v)
            ):  # NaN / Infinity read from a file: left out, like a missing value
                out[k] = v
    if kind == "status" and isinstance(ev.get("phase"), str):
        out["phase"] = text(ev["phase"][:64])
    elif kind == "train_begin":
        out["phase"] = "training"
    elif kind == "train_end":
        out["phase"] = "done"
        out["eta_s"] = 0
    return out
