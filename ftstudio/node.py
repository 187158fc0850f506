"""`python -m ftstudio.node TASK_DIR -- TORCHRUN...`: one node's launcher (the code is in `ftstudio.execution.node`).

A stable name: the srun line of a multi-node Slurm job, written when the job starts, names it.
"""

from ftstudio.execution.node import main as main

if __name__ == "__main__":
    raise SystemExit(main())
