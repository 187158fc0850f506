"""The C allocator of a training process: keep freed memory for the next step.

glibc hands every allocation above its mmap threshold (128 KB, rising only as
far as 32 MB by itself) to the kernel with mmap and gives it back with munmap
when freed, and trims the heap top whenever 128 KB are free. A training step on
the CPU allocates and frees the same activation tensors over and over, so each
step paid again for fresh pages from the kernel (page faults, zeroing): 15-20 %
of the step time on a ~20M-parameter model (bench/bench_trainer.py). Raising
both thresholds keeps that memory in the process; its size stays at the peak of
a step, which it reaches every step anyway.
"""

from __future__ import annotations

import ctypes
import logging

log = logging.getLogger("ftstudio")

# From glibc's malloc.h.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's largest allowed value on 64-bit: bigger blocks are still mmap'd
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: trim the heap top only past ~2 GB free


def keep_freed_memory() -> bool:
    """Tune glibc's malloc for repeated same-size allocations; False where there is no glibc (nothing changes)."""
    try:
        # The symbols already loaded into this process, the C library's among them: no search for it by name
        # (ctypes.util.find_library runs `ldconfig -p`, a process of its own, at every training start).
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt), or no C library to load
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1)
    if not ok:
        log.debug("mallopt refused the thresholds; the allocator keeps its defaults")
    return ok
