"""A dataset on its way into the data home: a side directory under datasets/ that the file streams into,
removed unless the dataset is checked and moved in. The web side feeds it the bytes of an upload."""

from __future__ import annotations

import re
import shutil
import tempfile
import unicodedata
from pathlib import Path
from typing import IO

from ftstudio.errors import TooLarge, ValidationError
from ftstudio.storage import writing
from ftstudio.training.datafiles import DATASET_SUFFIXES

MAX_NAME_CHARS = 100
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_name(filename: str) -> str:
    """A bounded base name of plain letters, digits, `.`, `_` and `-` (no path, no control characters),
    keeping the suffix; "" when nothing usable is left."""
    base = filename.replace("\\", "/").rsplit("/", 1)[-1]
    base = unicodedata.normalize("NFKD", base).encode("ascii", "ignore").decode()  # é -> e, not a dash
    base = _UNSAFE.sub("-", base).strip(".-")
    stem, dot, suffix = base.rpartition(".")
    if not dot:
        return base[:MAX_NAME_CHARS]
    suffix = suffix[:16]
    stem = stem[: MAX_NAME_CHARS - len(suffix) - 1].rstrip(".-")
    return f"{stem}.{suffix}" if stem else ""


def is_dataset_name(name: str) -> bool:
    return name.lower().endswith(DATASET_SUFFIXES)


def too_large(limit: int) -> TooLarge:
    return TooLarge(
        f"file: larger than {limit >> 20} MB, the most this studio accepts in one upload; nothing was kept. "
        "Put a big dataset in a folder the studio may read and give its path as data.path "
        "(its owner can raise the limit with `ftstudio studio start --max-upload-mb N`)"
    )


class Incoming:
    """One upload on its way in: a side directory under datasets/ holding the file as it is written."""

    def __init__(self, datasets: Path, home: Path, limit: int) -> None:
        self.home = home
        self.limit = limit
        self.size = 0
        self.filename = ""
        self.path: Path | None = None
        self._file: IO[bytes] | None = None
        with writing(home):
            self.dir = Path(tempfile.mkdtemp(prefix=".incoming-", dir=datasets))

    def open(self, filename: str) -> None:
        """Start the file (once): its name is checked before a byte of it is written."""
        if self.path is not None:
            raise ValidationError("file: send one file per upload")
        name = safe_name(filename)
        if not is_dataset_name(name):
            shown = filename[:80] + ("…" if len(filename) > 80 else "")
            raise ValidationError(
                f"file: {shown!r} is not a dataset file; upload .json, .jsonl, .csv, .parquet or .txt"
            )
        self.filename, self.path = filename, self.dir / name
        with writing(self.home):
            self._file = open(self.path, "wb")  # noqa: SIM115  (closed by close() or discard())

    def write(self, data: bytes) -> None:
        assert self._file is not None
        self.size += len(data)
        if self.size > self.limit:
            raise too_large(self.limit)
        with writing(self.home):
            self._file.write(data)

    def close(self) -> None:
        if self._file is not None:
            with writing(self.home):
                self._file.close()
            self._file = None

    def discard(self) -> None:
        """Remove the side directory and whatever is in it; safe to call more than once."""
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass  # a full disk failing the last flush: the file goes anyway
            self._file = None
        shutil.rmtree(self.dir, ignore_errors=True)
