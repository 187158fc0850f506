"""One node's share of a task spread over several machines (`resources.nodes` > 1, Slurm only).

The runner runs on the job's first node. It starts `srun`, which starts `python -m ftstudio.node
TASK_DIR -- TORCHRUN...` once on every node of the job; each starts torchrun for that node's ranks,
and the torchruns meet at the c10d rendezvous on the first node (the address is in their arguments).

Why a launcher of our own between srun and torchrun: a pause is SIGUSR1, and srun hands every signal
it gets to every process of its step. torchrun's agent has no handler for SIGUSR1 and would die of it,
so the launcher starts torchrun with SIGUSR1 ignored (its ranks inherit that until the trainer installs
its own handler, so a pause that comes while they start cannot kill them either). The launcher
catches SIGUSR1 itself and delivers it to each of the node's ranks once that rank catches it, as the
runner does on one machine. It writes `ranks/node-N.ready` when its handler is in place: the runner
sends nothing through srun before every node's launcher is ready.

A person's cancel needs nothing here: srun ends the whole step when the runner signals it. Slurm's own
SIGTERM (a time limit, a preemption) reaches every process of the step at once: the ranks take it as a
shutdown (checkpoint at the next step), torchrun's agent passes it on and waits for them, and the
launcher, which would die of it and take the step down with it (srun --kill-on-bad-exit), waits too.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from ftstudio.execution.runner import PauseForwarder, log, processes_of, ready_file
from ftstudio.home import TaskDir, keep_private
from ftstudio.pause import PAUSE_SIGNAL

WAIT_S = 0.2


def main(argv: list[str] | None = None) -> int:
    keep_private()
    args = sys.argv[1:] if argv is None else argv
    if len(args) < 3 or args[1] != "--":
        print("usage: python -m ftstudio.node TASK_DIR -- TORCHRUN_COMMAND...", file=sys.stderr)
        return 2
    task = TaskDir(Path(args[0]).resolve())
    node = int(os.environ.get("SLURM_NODEID", "0"))
    torchrun = subprocess.Popen(
        args[2:],
        stdin=subprocess.DEVNULL,
        preexec_fn=lambda: signal.signal(PAUSE_SIGNAL, signal.SIG_IGN),
    )
    pause = PauseForwarder(torchrun, distributed=True, processes=processes_of(task))

    def on_pause(signum: int, frame: object) -> None:
        pause.requested = True
        pause.forward()

    def on_stop(signum: int, frame: object) -> None:
        log(f"node {node}: received {signal.Signals(signum).name}; waiting for its training processes to stop")

    signal.signal(PAUSE_SIGNAL, on_pause)
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, on_stop)
    task.ranks.mkdir(parents=True, exist_ok=True)
    ready_file(task, node).write_text(f"{os.getpid()}\n")
    log(f"node {node} ({os.uname().nodename}) started its {pause.processes} training process(es)")
    while True:
        if pause.pending():
            pause.forward()
        try:
            code = torchrun.wait(timeout=WAIT_S)
        except subprocess.TimeoutExpired:
            continue
        # srun reports the highest exit code of its tasks; a signal's death is 128+N, as a shell says it.
        return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main())
