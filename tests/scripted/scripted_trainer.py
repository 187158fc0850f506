"""A scripted stand-in for `ftstudio.train`, for the tests of the process and
state logic around the trainer (the real trainer has its own tests, and the
end-to-end tests use it). Its behaviour is read from the task name in
spec.json, e.g. "scripted steps=30 delay=0.1 exit=1 hang=1":

    steps  progress events to write (default 10)
    delay  seconds between them (default 0.05)
    exit   exit code at the end (default 0); non-zero writes an error event first
    hang   1: ignore SIGTERM (to test the SIGKILL escalation)
    child  1: start a grandchild that sleeps (to test that cancel kills descendants)
    huge   write step 2**70 (more than the store can hold) in the progress event of this step
    eval   write an eval event every this many steps (default 0: none)
    scale  multiply every loss by this (default 1), so two runs draw apart
    samples  answer this many held-out prompts (evaluation.py's files and events) after step 1 and at the end
    killed   SIGKILL itself after this step, every attempt (a run that dies by itself, the OOM killer's way)

Each progress event also says how many tokens were seen (1,000 a step), as the real trainer does.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from ftstudio.events import EventWriter
from ftstudio.training.evaluation import write_stage


def main() -> int:
    spec_path = Path(sys.argv[1])
    spec = json.loads(spec_path.read_text())
    opts = dict(part.split("=", 1) for part in spec["name"].split() if "=" in part)
    steps = int(opts.get("steps", 10))
    delay = float(opts.get("delay", 0.05))
    code = int(opts.get("exit", 0))
    huge = int(opts.get("huge", 0))
    eval_every = int(opts.get("eval", 0))
    scale = float(opts.get("scale", 1))
    samples = int(opts.get("samples", 0))
    killed = int(opts.get("killed", 0))
    if opts.get("hang") == "1":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if opts.get("child") == "1":
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    task_dir = spec_path.parent
    with EventWriter(task_dir / "events.jsonl") as ev:
        # What the studio handed it: the queue's tests check which GPUs a task was given.
        ev.emit(
            "status",
            phase="loading_model",
            message="scripted",
            cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"),
            cuda_device_order=os.environ.get("CUDA_DEVICE_ORDER"),
        )
        ev.emit("train_begin", total_steps=steps, total_epochs=1)
        for step in range(1, steps + 1):
            time.sleep(delay)
            ev.emit(
                "progress",
                step=2**70 if step == huge else step,
                total_steps=steps,
                epoch=step / steps,
                total_epochs=1,
                loss=scale * 2.0 / step,
                lr=1e-3,
                tokens=1000 * step,
            )
            if eval_every and step % eval_every == 0:
                ev.emit("eval", step=step, epoch=step / steps, eval_loss=scale * 2.5 / step)
            if samples and step in (1, steps):
                stage = "final" if step == steps else f"checkpoint-{step}"
                answers = [
                    {"prompt": f"prompt {i}", "reference": None if i % 2 else f"expected {i}",
                     "adapter": f"<b>tuned {i} at {step}</b>", "base": f"base {i}"}
                    for i in range(samples)
                ]  # fmt: skip
                write_stage(task_dir, stage, step, 16, answers, 0.01, ev)
            print(f"step {step}/{steps}", flush=True)
            if step == killed:
                os.kill(os.getpid(), signal.SIGKILL)
        if code:
            ev.emit("error", message=f"scripted failure with exit code {code}", error_type="Scripted")
            return code
        (task_dir / "adapter").mkdir(exist_ok=True)
        (task_dir / "adapter" / "adapter_config.json").write_text("{}")
        ev.emit("train_end", step=steps, total_steps=steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
