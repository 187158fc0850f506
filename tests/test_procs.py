import os
import subprocess
import sys
import time

import psutil
import pytest

from ftstudio.execution.procs import Identity, Liveness, boot_id, check


@pytest.mark.process
def test_a_live_process_is_alive_and_its_marker_is_checked():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", "marker-abc"])
    try:
        # Until exec, the child still shows our command line.
        deadline = time.monotonic() + 10
        while "marker-abc" not in psutil.Process(proc.pid).cmdline() and time.monotonic() < deadline:
            time.sleep(0.01)
        ident = Identity.of(proc.pid)
        assert check(ident) == Liveness.ALIVE
        assert check(ident, marker="marker-abc") == Liveness.ALIVE
        assert check(ident, marker="some-other-task") == Liveness.REUSED
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.process
def test_a_zombie_is_not_alive():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    ident = Identity.of(proc.pid)
    deadline = time.monotonic() + 10
    while psutil.Process(proc.pid).status() != psutil.STATUS_ZOMBIE and time.monotonic() < deadline:
        time.sleep(0.05)
    assert psutil.pid_exists(proc.pid)  # what a bare `kill -0` would believe
    assert check(ident) == Liveness.DEAD
    proc.wait()
    assert check(ident) == Liveness.DEAD


def test_a_reused_pid_is_not_adopted():
    me = Identity.of(os.getpid())
    assert check(Identity(me.pid, me.start_time - 100.0, me.boot_id)) == Liveness.REUSED


def test_another_boot_means_not_ours(monkeypatch):
    me = Identity.of(os.getpid())
    monkeypatch.setenv("FTSTUDIO_BOOT_ID", "a-different-boot")
    assert boot_id() == "a-different-boot"
    assert check(me) == Liveness.REBOOTED
