"""Serving a task's files without ever following a link out of its directory.

A task directory is written by the trainer, which runs code from model
repositories and libraries; a link planted there (`training.log -> /etc/shadow`)
must not turn the studio into a way to read other files. So every file is opened
component by component relative to the task directory with O_NOFOLLOW, must be a
regular file, and is read through the descriptor that was checked. The adapter
tarball is built the same way, streamed, and holds regular files only.
"""

from __future__ import annotations

import os
import stat
import tarfile
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from ftstudio.home import TaskDir

CHUNK = 1 << 20


# Files of a finished task that may be downloaded one by one, and the folder each is in (nothing else
# in the task dir is served).
DOWNLOADABLE = {
    "training_config.json": "adapter",
    "summary.json": "adapter",
    "adapter_config.json": "adapter",
    "config.json": "adapter",
    "spec.json": ".",
    "training.log": ".",
}


def has_result(folder: Path) -> bool:
    """Whether a task's adapter/ (or a checkpoint) holds a result: a peft adapter, or the whole model of a run that
    trained its own weights (adapter full or freeze)."""
    return (folder / "adapter_config.json").is_file() or (folder / "config.json").is_file()


def open_inside(top: Path, rel: Path) -> tuple[IO[bytes], int] | None:
    """`top/rel` opened for reading, with its size, or None if it is missing, not a regular file,
    or reached through a symbolic link (any part of `rel`)."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
    parts = [p for p in rel.parts if p not in ("", ".")]
    if not parts or any(p == ".." or "/" in p for p in parts):
        return None
    fds: list[int] = []
    try:
        fds.append(os.open(top, flags | os.O_DIRECTORY))
        for part in parts[:-1]:
            fds.append(os.open(part, flags | os.O_DIRECTORY, dir_fd=fds[-1]))
        # O_NONBLOCK: a fifo planted under the name must not hang the request.
        fd = os.open(parts[-1], flags | os.O_NONBLOCK, dir_fd=fds[-1])
    except OSError:
        return None
    finally:
        for d in fds:
            os.close(d)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        return None
    return os.fdopen(fd, "rb"), st.st_size


def chunks(f: IO[bytes]) -> Iterator[bytes]:
    with f:
        while block := f.read(CHUNK):
            yield block


def adapter_files(tdir: TaskDir) -> list[tuple[Path, int]]:
    """The regular files directly in the task's adapter/ (links and folders left out), with sizes."""
    try:
        if stat.S_ISLNK(os.lstat(tdir.adapter).st_mode):
            return []
        entries = sorted(os.scandir(tdir.adapter), key=lambda e: e.name)
    except OSError:
        return []
    out = []
    for entry in entries:
        try:
            if entry.is_file(follow_symlinks=False):
                out.append((Path(entry.path), entry.stat(follow_symlinks=False).st_size))
        except OSError:
            continue
    return out


def adapter_tarball(files: list[tuple[Path, int]], folder: str) -> Iterator[bytes]:
    # An empty chunk would end a chunked HTTP response early: send only what the compressor gives.
    return (block for block in _tarball(files, folder) if block)


def _tarball(files: list[tuple[Path, int]], folder: str) -> Iterator[bytes]:
    """A .tar.gz of `files` under `folder/`, made as it is sent (no temporary file); each file is opened
    as open_inside does, so a file swapped for a link after listing is skipped, not followed."""
    gz = zlib.compressobj(6, zlib.DEFLATED, 31)  # wbits 31: a gzip stream
    written = 0
    for path, _ in files:
        opened = open_inside(path.parent, Path(path.name))
        if opened is None:
            continue
        f, size = opened
        info = tarfile.TarInfo(f"{folder}/{path.name}")
        info.size, info.mode, info.mtime = size, 0o644, int(time.time())
        header = info.tobuf(format=tarfile.PAX_FORMAT)
        written += len(header)
        yield gz.compress(header)
        left = size
        with f:
            while left > 0:
                block = f.read(min(CHUNK, left)) or b"\0" * min(CHUNK, left)  # a file cut short: pad it
                left -= len(block)
                written += len(block)
                yield gz.compress(block)
        pad = -written % tarfile.BLOCKSIZE
        written += pad
        yield gz.compress(b"\0" * pad)
    end = 2 * tarfile.BLOCKSIZE
    end += -(written + end) % tarfile.RECORDSIZE
    yield gz.compress(b"\0" * end) + gz.flush()
