"""How a task's processes run: the runner, the node launcher, the local and Slurm executors,
process identity and memory limits, and the facts they report. It imports nothing of the studio's core or the web."""
