"""What the studio's owner allowed when starting it (`ftstudio studio start --allow-...`).

A request over HTTP can never widen any of this; only the person who starts the
studio can. The CLI's own commands run as that person at the terminal and are
trusted (`Service.submit(..., trusted=True)`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DEFAULT_MAX_UPLOAD_BYTES = 512 << 20
DEFAULT_MAX_ROW_BYTES = 1 << 20
DEFAULT_MAX_PENDING = 100
MAX_SLOTS = 256


@dataclass(frozen=True)
class Policy:
    allow_remote_code: bool = False
    """Requests over HTTP may set model.trust_remote_code (--allow-remote-code)."""
    allow_paths: tuple[Path, ...] = ()
    """Extra roots that data.path and model.name may lie under, beside the data home and the user's home (--allow-path)."""
    allow_hosts: tuple[str, ...] = ()
    """Host names the studio answers to beside loopback ones (--allow-host)."""
    allow_origins: tuple[str, ...] = ()
    """Origins whose pages may use the studio beside its own, e.g. https://box.lan of a TLS proxy (--allow-origin)."""
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES
    """Largest dataset upload (--max-upload-mb)."""
    max_row_bytes: int = DEFAULT_MAX_ROW_BYTES
    """Largest single row of an uploaded dataset (--max-row-kb)."""
    max_pending: int = DEFAULT_MAX_PENDING
    """Most fine-tunes queued or running at once that requests over HTTP may add (--max-pending): the queue
    runs them a slot at a time, but a script gone wrong must not fill the disk with task directories.
    Further requests get 429 until one ends."""
