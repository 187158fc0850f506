"""The range every config value must lie in, declared beside its field.

A field says `rank: int = bounded(16, 1, 4096)`; the bounds ride in the field's
metadata, so the validation (`config._check`), the page's field list
(`GET /api/config/fields`) and `docs/config.md` read the same numbers from one
place. Values come from JSON, the CLI or a file: a number too large for any
sensible run is refused with the limit named, never left to overflow later in
SQLite, the trainer or a C library.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")

INT64_MAX = 2**63 - 1  # what SQLite, torch and numpy can hold


@dataclass(frozen=True)
class Bounds:
    """The values one setting accepts; None: no limit on that side."""

    min: int | float | None = None
    max: int | float | None = None
    min_excluded: bool = False  # the value must be above `min`, not equal to it
    max_excluded: bool = False  # the value must be below `max`, not equal to it
    unit: str = ""  # shown after the numbers: "8 tokens"
    why: str = ""  # why the minimum is what it is, for the message
    max_len: int | None = None  # text: characters; list: characters of each entry
    max_items: int | None = None  # list: entries

    def problem(self, value: Any) -> str | None:
        """What is wrong with `value`, for a person, or None when it is in bounds."""
        if isinstance(value, str):
            if self.max_len is not None and len(value) > self.max_len:
                return f"is {len(value):,} characters long; at most {self.max_len:,} are allowed"
            return None
        if isinstance(value, list):
            if self.max_items is not None and len(value) > self.max_items:
                return f"has {len(value):,} entries; at most {self.max_items:,} are allowed"
            longest = max((len(v) for v in value if isinstance(v, str)), default=0)
            if self.max_len is not None and longest > self.max_len:
                return f"has an entry {longest:,} characters long; at most {self.max_len:,} are allowed"
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            return None
        if isinstance(value, float) and not math.isfinite(value):
            return f"must be a finite number (got {shown(value)})"
        unit = f" {self.unit}" if self.unit else ""
        lo, hi = self.min, self.max
        if lo is not None and (value <= lo if self.min_excluded else value < lo):
            why = f" {self.why}" if self.why else ""
            word = "above" if self.min_excluded else "at least"
            return f"must be {word} {number(lo)}{unit}{why} (got {shown(value)})"
        if hi is not None and (value >= hi if self.max_excluded else value > hi):
            word = "below" if self.max_excluded else "at most"
            return f"must be {word} {number(hi)}{unit} (got {shown(value)})"
        return None

    def text(self) -> str:
        """The range in words, for the docs and the page: `1 to 4,096`, `at least 0, below 1`."""
        unit = f" {self.unit}" if self.unit else ""
        if self.max_items is not None:
            return f"up to {self.max_items:,} entries of up to {self.max_len:,} characters"
        if self.max_len is not None:
            return f"up to {self.max_len:,} characters"
        lo, hi = self.min, self.max
        if lo is not None and hi is not None and not (self.min_excluded or self.max_excluded):
            return f"{number(lo)} to {number(hi)}{unit}"
        parts = []
        if lo is not None:
            parts.append(f"{'above' if self.min_excluded else 'at least'} {number(lo)}")
        if hi is not None:
            parts.append(f"{'below' if self.max_excluded else 'at most'} {number(hi)}")
        return ", ".join(parts) + unit


def bounded(default: T, low: float | None = None, high: float | None = None, **kw: Any) -> T:
    """A dataclass field with a default and its bounds (see `Bounds` for the keywords)."""
    return field(default=default, metadata={"bounds": Bounds(low, high, **kw)})


def list_bounds(*, max_items: int, max_len: int) -> dict[str, Bounds]:
    """Metadata for a list-of-names field: `field(default_factory=list, metadata=list_bounds(...))`."""
    return {"bounds": Bounds(max_items=max_items, max_len=max_len)}


def bounds_of(f: dataclasses.Field[Any]) -> Bounds | None:
    return f.metadata.get("bounds")


def number(n: float) -> str:
    """A limit as people write it: 1,000,000,000 and 0.5."""
    if isinstance(n, int) or float(n).is_integer():
        return f"{int(n):,}"
    return f"{n:g}"


def shown(value: Any) -> str:
    """A value someone sent, short and safe to print: a 5,000-digit number is not printed in full
    (and `repr` refuses ints past 4,300 digits anyway)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 256:
        return f"a {len(str(abs(value))) if value.bit_length() < 14000 else 'more than 4,300'}-digit number"
    try:
        text = repr(value)
    except ValueError:
        return "a value too long to show"
    return text if len(text) <= 60 else text[:57] + "..."
