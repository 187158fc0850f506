"""The trainer: `python -m ftstudio.train SPEC` fine-tunes one task into SPEC's directory.

A plain recipe, setup -> train -> save -> cleanup, that imports nothing from the
studio's server or store: SPEC (`spec.json`) and the task directory are all it
knows. Progress goes to `events.jsonl` (see `ftstudio.events`), lines for people
to stdout (the runner appends them to `training.log`).

Exit codes: 0 only when the final adapter is on disk; 2 for bad config or data
(found before the model is loaded); 1 for anything else; `pause.EXIT_SUSPENDED`
(76) after a pause or a shutdown. Each failure writes one `error` event whose
message names the fix.

SIGUSR1 pauses (see `ftstudio.pause`): at the next step boundary the trainer saves
a checkpoint of that step, writes a `suspended` event and exits EXIT_SUSPENDED.
SIGTERM does the same, the event marked `shutdown` (a machine shutdown, `docker
stop`), unless the task dir holds `cancel.request`: a person's cancel kills the
process at once, and resume starts from the last complete checkpoint.

Under torchrun (WORLD_SIZE > 1) every rank trains, rank 0 reports. After a pause
the ranks exit 0, not EXIT_SUSPENDED: torchrun turns any non-zero worker exit into
its own exit code 1 and a crash report in the log, so the runner reads the
`suspended` event instead.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import traceback
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NoReturn

from ftstudio.config import TrainingConfig
from ftstudio.errors import FtstudioError, Problem, UserError, ValidationError
from ftstudio.events import EventWriter
from ftstudio.fence import Fence
from ftstudio.home import home_dir, keep_private, write_json_atomic
from ftstudio.pause import EXIT_SUSPENDED, PauseRequest, Suspended

OOM_FIX = (
    "out of GPU memory: lower optim.batch_size (--batch-size) or data.max_length, turn on optim.auto_batch "
    "(--auto-batch) or model.gradient_checkpointing, or use model.quantization=4bit"
)
CPU_OOM_FIX = (
    "out of memory{size}: lower optim.batch_size (--batch-size) or data.max_length, "
    "or turn on optim.auto_batch (--auto-batch) or model.gradient_checkpointing"
)


def out_of_memory_message(e: BaseException) -> str | None:
    """The one line for a failed allocation, naming the settings that shrink a step; None for other errors.

    On a GPU torch raises OutOfMemoryError. On the CPU a refused allocation is a plain
    RuntimeError from torch's default allocator (a request the system cannot back), or
    Python's MemoryError; memory that runs out gradually ends in the kernel's SIGKILL
    instead, which the runner reports."""
    if type(e).__name__ == "OutOfMemoryError":  # torch.OutOfMemoryError, without importing torch here
        return OOM_FIX
    text = str(e)
    refused = "DefaultCPUAllocator" in text and ("allocate memory" in text or "not enough memory" in text)
    if not (isinstance(e, MemoryError) or (isinstance(e, RuntimeError) and refused)):
        return None
    asked = re.search(r"allocate (\d+) bytes", text)
    size = ""
    if asked:
        n = int(asked.group(1))
        amount = f"{n / 2**30:,.1f} GiB" if n >= 2**30 else f"{n / 2**20:,.1f} MiB"
        size = f" (one allocation of {amount} was refused)"
    return CPU_OOM_FIX.format(size=size)


@dataclass
class Job:
    """What SPEC says to do."""

    config: TrainingConfig
    out_dir: Path
    home: Path
    task_id: str = ""
    name: str = ""


def read_spec(spec_path: Path, output: Path | None) -> Job:
    """A task's spec.json, or a bare TrainingConfig JSON with --output."""
    try:
        data = json.loads(Path(spec_path).read_text())
    except FileNotFoundError:
        raise ValidationError(f"{spec_path} does not exist; pass the path of a task's spec.json") from None
    except ValueError as e:
        raise ValidationError(f"{spec_path} is not valid JSON ({e}); fix the file") from None
    if not isinstance(data, dict):
        raise ValidationError(f"{spec_path}: expected a JSON object")
    if "config" in data:
        config = TrainingConfig.from_dict(data["config"])
        home = Path(data["home"]) if data.get("home") else home_dir()
        out = output or Path(spec_path).resolve().parent
        return Job(config, out, home, str(data.get("task_id", "")), str(data.get("name", "")))
    if output is None:
        raise ValidationError(f"{spec_path} is a bare config; add --output DIR to say where the adapter goes")
    return Job(TrainingConfig.from_dict(data), output, home_dir())


def main(argv: Sequence[str] | None = None) -> int:
    keep_private()  # also when run by hand (a task dir's train.py), not only under a runner
    parser = argparse.ArgumentParser(prog="python -m ftstudio.train", description=__doc__.splitlines()[0])
    parser.add_argument("spec", type=Path, help="a task's spec.json, or a TrainingConfig JSON with --output")
    parser.add_argument("--output", type=Path, default=None, help="output directory for a bare config")
    parser.add_argument(
        "--resume",
        default=None,
        metavar="auto|PATH",
        help="override checkpoint.resume_from: auto = the newest complete checkpoint (a fresh start if none)",
    )
    args = parser.parse_args(argv)
    # First, so a pause or shutdown asked for while the model loads is kept, not fatal (both signals kill by
    # default). The task dir is where a person's cancel is recorded.
    pause = PauseRequest(task_dir=(args.output or args.spec.resolve().parent).resolve()).install()
    try:
        return _main(args, pause)
    finally:
        pause.uninstall()


def _main(args: argparse.Namespace, pause: PauseRequest) -> int:
    rank0 = int(os.environ.get("RANK", "0")) == 0
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        # torchrun starts each rank in a session of its own, so nothing takes a rank down with the
        # launcher: without this, a killed runner (and launcher) would leave ranks training as orphans.
        from ftstudio.parent import die_with_parent

        die_with_parent()
    if args.output is None and not args.spec.is_file():
        # No task directory to report into: say it on the console only.
        return _fail(None, f"{args.spec} does not exist; pass the path of a task's spec.json", "ValidationError", 2)
    out_dir = (args.output or args.spec.resolve().parent).resolve()
    events: EventWriter | None = None
    rank = int(os.environ.get("RANK", "0"))
    # Ranks but 0 report a failure in a file of their own (rank 0 has the events): see TaskDir.ranks.
    report = out_dir / "ranks" / f"rank-{rank}.json" if world > 1 and not rank0 else None
    fence = Fence(out_dir)  # a newer attempt owns the task dir: write nothing more
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        events = EventWriter(out_dir / "events.jsonl", fence=fence.check) if rank0 else None
        job = read_spec(args.spec, args.output.resolve() if args.output else None)
        if args.resume is not None:
            job.config.checkpoint.resume_from = args.resume
        from ftstudio.training.recipe import run

        run(job.config, job.out_dir, job.home, events, pause=pause, fence=fence.check)
        return 0
    except Suspended as stop:
        if events is not None:
            events.emit(
                "suspended",
                step=stop.step,
                total_steps=stop.total_steps,
                checkpoint=stop.checkpoint,
                shutdown=stop.shutdown,
            )
        if rank0:
            saved = (
                f"; {stop.checkpoint} holds the state to resume from" if stop.checkpoint else "; nothing to save yet"
            )
            what = "stopped for a shutdown (SIGTERM)" if stop.shutdown else "paused"
            print(f"{what} at step {stop.step}/{stop.total_steps}{saved}", flush=True)
        return EXIT_SUSPENDED if world == 1 else 0
    except UserError as e:
        return _fail(events, str(e), type(e).__name__, e.exit_code, getattr(e, "problems", None), report=report)
    except FtstudioError as e:
        return _fail(events, str(e), type(e).__name__, 1, report=report)
    except Exception as e:
        traceback.print_exc(file=sys.stdout)  # into training.log, for whoever digs deeper
        oom = out_of_memory_message(e)
        if oom:
            return _fail(events, oom, "OutOfMemoryError", 1, report=report)
        first = (str(e).strip().splitlines() or [""])[0][:300]
        return _fail(
            events,
            f"training failed: {type(e).__name__}: {first}; see training.log for details",
            type(e).__name__,
            1,
            peer_lost=world > 1 and peer_lost(e),
            report=report,
        )
    finally:
        if events is not None:
            events.close()
        if world > 1:
            _leave_process_group()


def _leave_process_group() -> None:
    """Under torchrun: leave the process group on purpose, on every way out (done, failed, paused), rather
    than leave its teardown to the interpreter's exit, where torch warns about it and order is not ours."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# How a collective fails when a peer rank is gone (gloo over TCP, NCCL): this rank did nothing wrong.
PEER_GONE = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "remote process exited")


def peer_lost(e: BaseException) -> bool:
    """Whether `e` says another rank vanished mid-collective (killed, or its machine gone), not that this
    rank failed: the runner resumes such a run instead of failing it (see runner.distributed_outcome)."""
    import torch.distributed as dist

    network_error = getattr(dist, "DistNetworkError", None)
    if network_error is not None and isinstance(e, network_error):
        return True
    return any(s in str(e) for s in PEER_GONE)


def _fail(
    events: EventWriter | None,
    message: str,
    error_type: str,
    code: int,
    problems: list[Problem] | None = None,
    *,
    peer_lost: bool = False,
    report: Path | None = None,
) -> int:
    extra: dict[str, Any] = {"problems": [asdict(p) for p in problems]} if problems else {}
    if peer_lost:
        extra["peer_lost"] = True
    if events is not None:
        events.emit("error", message=message, error_type=error_type, **extra)
    elif report is not None:
        Fence(report.parent.parent).check()
        try:
            report.parent.mkdir(exist_ok=True)
            write_json_atomic(report, {"message": message, "error_type": error_type, **extra})
        except OSError as e:  # the console line below is all there is then
            print(f"could not write {report}: {e}", file=sys.stdout, flush=True)
    print(f"error: {message}", file=sys.stdout, flush=True)
    return code


def _reporters(argv: Sequence[str]) -> bool:
    """Whether the run reports to an outside service (wandb, mlflow, tensorboard), whose exit hooks must run."""
    try:
        spec = json.loads(Path(argv[0]).read_text())
        config = spec.get("config", spec) if isinstance(spec, dict) else {}
        return bool(((config or {}).get("logging") or {}).get("report_to"))
    except (OSError, ValueError, IndexError, AttributeError):
        return True  # cannot tell: take the slow, safe way out


def run_as_main() -> NoReturn:
    """`python -m ftstudio.train`: run, then leave without the interpreter's slow teardown where that is safe."""
    code = main()
    if not _reporters(sys.argv[1:]):
        # Everything the run writes (events, checkpoints, the adapter) is closed and synced by now, but the
        # interpreter's teardown of torch and transformers took ~3 s more on a 2-core machine: a pause held its
        # slot that long after the checkpoint, and every queued task started that much later. Skip it.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    raise SystemExit(code)


if __name__ == "__main__":
    run_as_main()
