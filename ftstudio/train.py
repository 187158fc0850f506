"""`python -m ftstudio.train SPEC`: the trainer's entry point (the code is in `ftstudio.training.trainer`).

A stable name: every task directory's `train.py` calls `ftstudio.train.main`, and the runners of
tasks started by any release run `python -m ftstudio.train`, so it stays here across upgrades.
"""

from ftstudio.training.trainer import main as main
from ftstudio.training.trainer import run_as_main

if __name__ == "__main__":
    run_as_main()
