"""`python -m ftstudio.runner TASK_DIR`: the runner's entry point (the code is in `ftstudio.execution.runner`).

A stable name: local tasks and pending Slurm jobs of any release start their runner by it.
"""

from ftstudio.execution.runner import main as main

if __name__ == "__main__":
    raise SystemExit(main())
