"""Datasets and models the studio knows: uploads checked row by row, the bundled ones, recent models.
One of the parts the service is composed of (service.py)."""

from __future__ import annotations

import fcntl
import logging
import os
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from ftstudio.errors import NotFound, Problem, ValidationError
from ftstudio.storage import writing
from ftstudio.studio.incoming import Incoming, is_dataset_name

if TYPE_CHECKING:
    from ftstudio.home import Home
    from ftstudio.studio.policy import Policy
    from ftstudio.studio.store import Store

log = logging.getLogger("ftstudio")


class Catalog:
    def __init__(self, home: Home, store: Store, policy: Policy) -> None:
        self.home = home
        self.store = store
        self.policy = policy

    def receive_dataset(self) -> Incoming:
        """Start an upload: a side directory under datasets/ that the file streams into (see uploads.py)."""
        return Incoming(self.home.datasets, self.home.root, self.policy.max_upload_bytes)

    def add_dataset(self, incoming: Incoming) -> dict[str, Any]:
        """Check a received upload row by row and move it in among the datasets under a free name.
        Checked under its final name (so errors name the file the user sent), in its side directory:
        a bad upload never appears among the datasets."""
        from ftstudio.training.data import inspect_dataset

        assert incoming.path is not None
        try:
            info = inspect_dataset(incoming.path, max_row_bytes=self.policy.max_row_bytes)
        except ValidationError as e:  # the upload is the `file` field, not a data.path
            raise ValidationError([Problem("file", p.message) for p in e.problems]) from None
        with writing(self.home.root):
            target = self._place(incoming.path)
        log.info("dataset %s uploaded (%d rows, %s, %d bytes)", target.name, info.rows, info.format, incoming.size)
        return {
            "name": target.name,
            "path": str(target),
            "format": info.format,
            "rows": info.rows,
            "preview": info.preview,
        }

    def upload_dataset(self, filename: str, stream: IO[bytes]) -> dict[str, Any]:
        """Upload from a file object (what the HTTP route does as the body streams in)."""
        incoming = self.receive_dataset()
        try:
            incoming.open(filename)
            while chunk := stream.read(1 << 20):
                incoming.write(chunk)
            incoming.close()
            return self.add_dataset(incoming)
        finally:
            incoming.discard()

    def _place(self, received: Path) -> Path:
        """Move a checked upload in among the datasets as datasets/<name>, or <stem>-2<suffix>, -3, ... when
        that is taken (in any letter case). Never replaces and never hands one name out twice: the choice is
        made under a lock on the folder (other studios' and CLIs' uploads too), and the file is linked in,
        which fails rather than replace a file that appeared some other way."""
        name = received.name
        stem, dot, suffix = name.rpartition(".")
        folder = os.open(self.home.datasets, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(folder, fcntl.LOCK_EX)
            taken = {p.name.lower() for p in self.home.datasets.iterdir()}
            candidate, n = name, 2
            while True:
                if candidate.lower() not in taken:
                    try:
                        os.link(received, self.home.datasets / candidate)
                        break
                    except FileExistsError:
                        taken.add(candidate.lower())
                candidate, n = f"{stem}-{n}{dot}{suffix}", n + 1
        finally:
            os.close(folder)  # and with it the lock
        os.unlink(received)
        return self.home.datasets / candidate

    def known(self, name: str) -> str:
        """`name`, when it is a bundled or uploaded dataset; NotFound otherwise."""
        known = {d["name"] for d in self.datasets()}
        if name not in known:
            shown = name[:80] + ("…" if len(name) > 80 else "")
            raise NotFound(f"no dataset {shown!r}; upload it first (known: {', '.join(sorted(known)[:20])})")
        return name

    def dataset(self, name: str) -> dict[str, Any]:
        """Format, row count and the first rows of a bundled or uploaded dataset."""
        from ftstudio.training.builtin import BUILTIN_DATASETS, resolve_dataset
        from ftstudio.training.data import inspect_dataset

        self.known(name)
        info = inspect_dataset(resolve_dataset(name, self.home.root), max_row_bytes=self.policy.max_row_bytes)
        return {
            "name": name,
            "builtin": name in BUILTIN_DATASETS,
            "format": info.format,
            "rows": info.rows,
            "preview": info.preview,
        }

    def datasets(self) -> list[dict[str, Any]]:
        from ftstudio.training.builtin import BUILTIN_DATASETS

        out: list[dict[str, Any]] = [{"name": name, "builtin": True} for name in BUILTIN_DATASETS]
        for path in sorted(self.home.datasets.iterdir()):
            # Links are not listed: an upload is always a plain file, and a planted link must not be served.
            if (
                path.is_file()
                and not path.is_symlink()
                and not path.name.startswith(".")
                and is_dataset_name(path.name)
            ):
                out.append({"name": path.name, "builtin": False, "size": path.stat().st_size})
        return out

    def models(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = [{"name": "builtin:tiny", "builtin": True}]
        rows = self.store._conn().execute(
            "SELECT model, max(created_at) AS last FROM tasks GROUP BY model ORDER BY last DESC LIMIT 20"
        )
        out += [{"name": r["model"], "builtin": False} for r in rows if not r["model"].startswith("builtin:")]
        return out
