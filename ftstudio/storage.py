"""A data home that cannot be written: the one place that recognises it.

A full disk, a quota, a read-only mount or wrong permissions show up as an
OSError (ENOSPC, EDQUOT, EROFS, EACCES, EPERM) from a file write, or as SQLite's
"database or disk is full" / "attempt to write a readonly database". Each becomes
a `StorageError` (HTTP 507, CLI exit 1) whose message says what is wrong and that
running training is not affected: the person reading it may fear their run died.
"""

from __future__ import annotations

import errno
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ftstudio.errors import StorageError

FULL = {errno.ENOSPC, errno.EDQUOT}
READ_ONLY = {errno.EROFS, errno.EACCES, errno.EPERM}
_SQLITE_FULL = ("database or disk is full",)
_SQLITE_READ_ONLY = ("attempt to write a readonly database", "readonly database", "unable to open database file")


def storage_error(exc: BaseException, home: Path) -> StorageError | None:
    """The StorageError that `exc` means for the data home `home`, or None if it is something else."""
    if isinstance(exc, StorageError):
        return exc
    if isinstance(exc, OSError) and exc.errno in FULL:
        return _full(home)
    if isinstance(exc, OSError) and exc.errno in READ_ONLY:
        return _read_only(home)
    if isinstance(exc, sqlite3.Error):
        text = str(exc).lower()
        if any(m in text for m in _SQLITE_FULL):
            return _full(home)
        if any(m in text for m in _SQLITE_READ_ONLY):
            return _read_only(home)
    return None


@contextmanager
def writing(home: Path) -> Iterator[None]:
    """Turn a failed write under the data home into a StorageError; anything else passes through."""
    try:
        yield
    except (OSError, sqlite3.Error) as e:
        mapped = storage_error(e, home)
        if mapped is None:
            raise
        raise mapped from e


def _full(home: Path) -> StorageError:
    return StorageError(
        f"the data home {home} is full: nothing was saved for this request, and tasks already training "
        "were not stopped (they need free space too, for their checkpoints); free some space there and try again"
    )


def _read_only(home: Path) -> StorageError:
    return StorageError(
        f"the data home {home} is read-only for the studio: nothing was saved for this request, and tasks "
        "already training were not stopped; fix its permissions (or mount it writable) and try again"
    )
