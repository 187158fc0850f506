"""A process that dies with its parent, shared by the runner's children and torchrun's ranks."""

from __future__ import annotations

import ctypes
import os
import signal


def die_with_parent() -> None:
    """Have the kernel SIGKILL this process when its parent dies (Linux; nothing elsewhere), so a
    process never outlives the one that started it and keeps writing into a task called dead."""
    parent = os.getppid()
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        return
    if os.getppid() != parent:  # the parent died before the request was in place
        os.kill(os.getpid(), signal.SIGKILL)
