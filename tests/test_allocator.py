"""The training process keeps freed memory for the next step (glibc's malloc, for real, in a fresh process)."""

from __future__ import annotations

import subprocess
import sys

import pytest

# 64 MB in 8 MB blocks, all freed: glibc's defaults hand blocks this big back to the kernel at once.
SCRIPT = """
import sys, psutil
from ftstudio.training.allocator import keep_freed_memory
if sys.argv[1] == "tuned":
    assert keep_freed_memory()
p = psutil.Process()
base = p.memory_info().rss
blocks = [bytearray(8 << 20) for _ in range(8)]
del blocks
print(p.memory_info().rss - base)
"""


def retained_mb(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True).stdout
    return int(out) / (1 << 20)


@pytest.mark.process
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_freed_step_memory_stays_in_the_process() -> None:
    assert retained_mb("default") < 16
    assert retained_mb("tuned") > 48
