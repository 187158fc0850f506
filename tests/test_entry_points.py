"""The `python -m` names that task directories, runners, Slurm jobs and chat workers of any release
record keep working: each answers as its part's program, and a task dir's train.py reaches the trainer.
(tests/test_upgrade.py runs a whole fine-tune across an upgrade; this checks every name, quickly.)"""

from __future__ import annotations

import subprocess
import sys

import pytest

from ftstudio.studio.service import TRAIN_PY

# The stable name, and the first words its usage starts with.
ENTRY_POINTS = [
    ("ftstudio.train", "usage: python -m ftstudio.train"),
    ("ftstudio.runner", "usage: python -m ftstudio.runner"),
    ("ftstudio.node", "usage: python -m ftstudio.node TASK_DIR -- TORCHRUN_COMMAND"),
    ("ftstudio.chatworker", "usage: python -m ftstudio.chatworker"),
]


@pytest.mark.process
@pytest.mark.parametrize(("module", "usage"), ENTRY_POINTS)
def test_every_recorded_entry_point_still_runs(module: str, usage: str) -> None:
    args = [] if module == "ftstudio.node" else ["--help"]  # the node launcher has no --help: no args shows usage
    r = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=120)
    assert usage in r.stdout + r.stderr, r.stdout + r.stderr
    assert r.returncode in (0, 2), r.returncode  # argparse's --help, or the launcher's usage error


def test_each_entry_point_names_its_part() -> None:
    import ftstudio.chatworker
    import ftstudio.node
    import ftstudio.runner
    import ftstudio.train
    from ftstudio.chat import worker
    from ftstudio.execution import node, runner
    from ftstudio.training import trainer

    assert ftstudio.train.main is trainer.main
    assert ftstudio.runner.main is runner.main
    assert ftstudio.node.main is node.main
    assert ftstudio.chatworker.main is worker.main


def test_a_task_dirs_train_py_calls_the_stable_trainer_name() -> None:
    # Written into every task directory at submit: older task dirs hold the same two lines.
    assert "import pathlib, sys, ftstudio.train" in TRAIN_PY
    assert "ftstudio.train.main(" in TRAIN_PY
