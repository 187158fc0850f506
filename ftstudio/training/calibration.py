"""How long an epoch will take on this machine, before the run: a few real training steps, timed.

The estimate runs the trainer itself (`recipe.run`) on the task's data and settings in a scratch folder, for
WARMUP + MEASURED optimizer steps, with no evaluation, held-out prompts or checkpoints. The first WARMUP steps
are not counted (they carry one-time costs: the allocator's first blocks, lazy initialisation). The steps are
the epoch's own first steps, in the order the run will take them, and that order is a random one
(`batches.EpochSampler` shuffles rows, or whole batches when they are grouped by length), so the measured
steps are a random sample of the epoch's: their mean seconds per step times the steps per epoch estimates the
epoch without bias. The range is a 90 % interval from the sample's spread (Student's t, corrected for a sample
that is a large part of a short epoch), never narrower than +-BASE_ERROR: what the sample cannot see (another
program taking CPU time, a GPU's clocks) measured against real runs by bench/bench_estimate.py.

What is timed, here and in the real run (progress.StudioCallback), is each optimizer step from the previous
step's end to its own: loading the batch, forward, backward, the optimizer, the step's log line. Evaluations,
checkpoints and held-out answers come on top, and the steps they interrupt are left out on both sides.

A measurement is kept per model and settings (every setting that changes a step, not the schedule's length,
learning rate, logging or checkpoints), the data's content and this machine: `~/.cache/ftstudio/calibrate/`.
It runs as a process of its own, `python -m ftstudio.training.calibration SPEC RESULT`, which writes RESULT
(the raw figures, `measurement`, or the error that stopped it) whole or not at all; `figures` says what they
mean for the settings that ask.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ftstudio.config import TrainingConfig
from ftstudio.home import write_json_atomic

WARMUP = 2
MEASURED = 8
BASE_ERROR = 0.20
"""The narrowest half-width of the range, as a share of the estimate. bench/bench_estimate.py's real runs, three
models and settings run three times, missed the estimate's middle by up to 17 % (docs/benchmarks.md): the same
settings' real runs themselves differ by that much from one run to the next on a shared machine."""
CONFIDENCE_T = {1: 6.314, 2: 2.920, 3: 2.353, 4: 2.132, 5: 2.015, 6: 1.943, 7: 1.895, 8: 1.860, 9: 1.833}
"""Student's t at 95 % one-sided (a 90 % two-sided interval), by degrees of freedom; 1.645 beyond."""
VERSION = 1
CACHE_KEEP = 200

# Settings that do not change how long a step takes: left out of the key, so changing them keeps the measurement.
NOT_TIMING = {
    "optim": ("epochs", "max_steps", "learning_rate", "warmup_ratio", "weight_decay", "scheduler", "max_grad_norm",
              "seed", "divergence_factor", "divergence_patience"),
    "preference": ("beta", "simpo_gamma", "desirable_weight", "undesirable_weight"),
    "checkpoint": None, "logging": None, "evaluation": None, "resume": None,
    "resources": ("priority", "memory", "share_gpu", "gpu_ids"),
}  # fmt: skip


def cache_dir() -> Path:
    """One cache per machine user, beside the inspector's: a measurement depends on the machine, not a data home."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ftstudio" / "calibrate"


def timing_settings(config: TrainingConfig) -> dict[str, Any]:
    """The config's settings that change a step's time."""
    settings = config.to_dict()
    for section, fields in NOT_TIMING.items():
        if fields is None:
            settings.pop(section, None)
        elif isinstance(settings.get(section), dict):
            for name in fields:
                settings[section].pop(name, None)
    return settings


def machine(on_gpu: str | None) -> dict[str, Any]:
    """What makes this machine's steps as fast as they are: its CPU and cores, and the GPU the run takes."""
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {"cpu": model, "cores": len(os.sched_getaffinity(0)), "gpu": on_gpu}


def key(config: TrainingConfig, files: list[Path | None], on_gpu: str | None) -> str:
    from ftstudio import __version__
    from ftstudio.training.inspector import cache_key

    settings = {"timing": timing_settings(config), "machine": machine(on_gpu), "version": f"{VERSION} {__version__}"}
    return cache_key(settings, files)


def calibration_config(config: TrainingConfig) -> TrainingConfig:
    """The run to time: the same model, data and settings, WARMUP + MEASURED steps (`recipe.run(timing_only=True)`
    saves and evaluates nothing)."""
    run = TrainingConfig.from_dict(config.to_dict())
    run.optim.max_steps = WARMUP + MEASURED
    run.checkpoint.resume_from = ""
    run.evaluation.prompts = ""
    run.evaluation.at_checkpoints = False
    run.logging.every_steps = 1  # a progress event, with its step's seconds, every step
    run.logging.report_to = []
    # The reference is never scored ahead here (it would be a pass over all the data): the steps make their own
    # reference passes, timed apart by ReferenceClock.
    run.preference.precompute_reference = "off"
    return run


def interval(step_seconds: Sequence[float], steps_per_epoch: int) -> dict[str, float]:
    """Seconds per epoch from a random sample of its steps' seconds: the estimate and its 90 % range."""
    n = len(step_seconds)
    if n == 0:
        raise ValueError("no step was timed")
    mean = statistics.fmean(step_seconds)
    epoch = mean * steps_per_epoch
    half = 0.0
    if n > 1 and mean > 0:
        # The spread of the mean of n steps out of the epoch's, corrected for a sample that is much of the epoch.
        fpc = math.sqrt(max(steps_per_epoch - n, 0) / (steps_per_epoch - 1)) if steps_per_epoch > n else 0.0
        se = statistics.stdev(step_seconds) / math.sqrt(n) * fpc
        half = CONFIDENCE_T.get(n - 1, 1.645) * se / mean
    half = max(half, BASE_ERROR)
    return {"low_s": epoch * (1 - half), "epoch_s": epoch, "high_s": epoch * (1 + half), "half": half}


def measured(events: list[dict[str, Any]]) -> tuple[dict[int, float], dict[str, Any]]:
    """The timed steps past the warm-up (step: seconds), and the run's train_begin, from a calibration run's events."""
    begin: dict[str, Any] = {}
    steps: dict[int, float] = {}
    for event in events:
        if event.get("kind") == "train_begin":
            begin = event
        elif event.get("kind") == "progress" and event.get("step_s") is not None and int(event["step"]) > WARMUP:
            steps[int(event["step"])] = float(event["step_s"])
    return steps, begin


class ReferenceClock:
    """Seconds of each step spent in DPO's and KTO's reference pass (the model's forward without gradients, its
    adapter off).
    A run that scores the reference once before training (preference.precompute_reference) makes no such pass in
    its steps, while the few timed steps (too few to be worth that pass over all the data) do: their reference
    seconds are taken out of the steps, and the pass itself is said apart. A TrainerCallback (made one in
    `callback`, so this module imports no transformers until a calibration runs)."""

    def __init__(self) -> None:
        self.per_step: dict[int, float] = {}
        self._seconds = 0.0
        self._began: float | None = None

    def callback(self) -> Any:
        from transformers import TrainerCallback

        clock = self

        class Callback(TrainerCallback):
            def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
                if model is not None:
                    clock.watch(model)

            def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                clock.per_step[int(state.global_step)] = clock._seconds
                clock._seconds = 0.0

        return Callback()

    def watch(self, model: Any) -> None:
        import torch

        # The reference is the model with its adapter switched off (a new adapter), or its frozen copy named "ref"
        # (going on from an adapter): other passes without gradients (KTO's KL term) are the policy's, and stay.
        layer = next((m for m in model.modules() if hasattr(m, "disable_adapters")), None)

        def reference() -> bool:
            if torch.is_grad_enabled():
                return False
            return getattr(model, "active_adapter", None) == "ref" or bool(layer is not None and layer.disable_adapters)

        def sync() -> None:
            if torch.cuda.is_available():
                torch.cuda.synchronize()  # a GPU runs behind Python: time the work, not its launch

        def began(module: Any, inputs: Any) -> None:
            if reference():
                sync()
                self._began = time.monotonic()

        def ended(module: Any, inputs: Any, output: Any) -> None:
            if self._began is not None:
                sync()
                self._seconds += time.monotonic() - self._began
                self._began = None

        model.register_forward_pre_hook(began)
        model.register_forward_hook(ended)


def measurement(
    steps: dict[int, float], begin: dict[str, Any], reference: dict[int, float], seconds: float, model: str
) -> dict[str, Any]:
    """What the process keeps: the raw figures, so that what they mean for a run (`figures`) is worked out for the
    settings that ask, whose run length decides whether the reference is scored ahead."""
    per_epoch = int(begin.get("steps_per_epoch") or 0)
    if per_epoch <= 0 or not steps:
        raise ValueError("the timed steps did not report their seconds and the steps per epoch")
    return {
        "state": "done",
        "model": model,
        "device": begin.get("device"),
        "steps_per_epoch": per_epoch,
        "steps": {str(k): round(v, 6) for k, v in steps.items()},
        "reference": {str(k): round(reference.get(k, 0.0), 6) for k in steps},
        "calibration_s": round(seconds, 1),
        "measured_at": time.time(),
    }


def figures(raw: dict[str, Any], config: TrainingConfig) -> dict[str, Any]:
    """The estimate for `config` from a kept measurement: seconds per step and per epoch with the range, the steps of
    the whole run, and the reference pass said apart when the run scores the reference before its first step."""
    per_epoch = int(raw["steps_per_epoch"])
    o = config.optim
    total_steps = o.max_steps if o.max_steps > 0 else math.ceil(per_epoch * (o.epochs if o.epochs > 0 else 1.0))
    step_seconds = [float(v) for v in raw["steps"].values()]
    extra: dict[str, Any] = {}
    if precomputes(config, total_steps / per_epoch):
        passes = [float(v) for v in (raw.get("reference") or {}).values()] or [0.0] * len(step_seconds)
        step_seconds = [max(s - r, 0.0) for s, r in zip(step_seconds, passes, strict=True)]
        # Once before the first step (and again on every start): the same forward, over every row.
        extra["reference_pass_s"] = round(statistics.fmean(passes) * per_epoch, 3)
    found = interval(step_seconds, per_epoch)
    kept = ("state", "model", "device", "steps_per_epoch", "calibration_s", "measured_at", "busy")
    return {
        **{k: raw[k] for k in kept if k in raw},
        **extra,
        "steps_timed": len(step_seconds),
        "step_s": round(statistics.fmean(step_seconds), 5),
        "total_steps": total_steps,
        **{k: round(v, 3) for k, v in found.items()},
    }


def precomputes(config: TrainingConfig, epochs: float) -> bool:
    """Whether the real run scores the reference once before training (dpo and kto; config.precompute_reference)."""
    from ftstudio.config import precompute_reference

    return precompute_reference(config, epochs)


def words(seconds: float) -> str:
    """A duration as a person reads it: 1.6 s, 45 s, 3 min 20 s, 2 h 05 min."""
    if seconds < 9.95:
        return f"{seconds:.1f} s"
    s = round(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def line(found: dict[str, Any]) -> str:
    """The estimate in one line: "time per epoch about 3 min 05 s - 4 min 11 s (middle 3 min 38 s, 120 steps of 1.82 s,
    8 timed on cpu)"."""
    text = (
        f"time per epoch about {words(found['low_s'])} - {words(found['high_s'])} (middle {words(found['epoch_s'])}, "
        f"{found['steps_per_epoch']:,} steps of {found['step_s']:.3g} s, {found['steps_timed']} timed on "
        f"{found.get('device') or 'this machine'})"
    )
    if found.get("reference_pass_s"):
        text += f", plus {words(found['reference_pass_s'])} scoring the reference before the first step"
    if found.get("busy"):
        text += f"; measured while {found['busy']} other fine-tune(s) trained here, so the run may be faster"
    return text


def compare(estimate: dict[str, Any], step_s: float | None, steps_per_epoch: int | None) -> dict[str, Any] | None:
    """The real run against its estimate: the measured seconds per epoch and how far the estimate was off."""
    if not step_s or not steps_per_epoch or not estimate.get("epoch_s"):
        return None
    real = step_s * steps_per_epoch
    error = estimate["epoch_s"] / real - 1
    inside = estimate["low_s"] <= real <= estimate["high_s"]
    return {"epoch_s": round(real, 3), "error": round(error, 4), "within_range": inside}


def run_calibration(spec: Path, out: Path) -> int:
    """The process: time the run `spec` describes, write `out`."""
    started = time.monotonic()
    data = json.loads(spec.read_text())
    config = TrainingConfig.from_dict(data["config"])
    home = Path(data["home"])
    scratch = out.parent / f"{out.stem}.work-{os.getpid()}"  # the studio removes one whose process is gone
    shutil.rmtree(scratch, ignore_errors=True)
    try:
        from ftstudio.events import EventWriter, read_from
        from ftstudio.training.recipe import run

        scratch.mkdir(parents=True)
        events = EventWriter(scratch / "events.jsonl")
        clock = ReferenceClock()
        try:
            run(calibration_config(config), scratch, home, events, callbacks=[clock.callback()], timing_only=True)
        finally:
            events.close()
        steps, begin = measured(read_from(scratch / "events.jsonl", 0).events)
        found = measurement(steps, begin, clock.per_step, time.monotonic() - started, config.model.name)
        found["busy"] = int(data.get("busy", 0))
        write_json_atomic(out, found)
        return 0
    except Exception as e:
        from ftstudio.training.trainer import out_of_memory_message

        first = (str(e).strip().splitlines() or [""])[0][:300]
        message = out_of_memory_message(e) or f"{type(e).__name__}: {first}"
        write_json_atomic(
            out,
            {"state": "failed", "message": f"the time estimate's steps failed: {message} (its log: {out.stem}.log)"},
        )
        print(f"error: {message}", file=sys.stderr, flush=True)
        return 1
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ftstudio.training.calibration", description=__doc__.splitlines()[0]
    )
    parser.add_argument("spec", type=Path, help="JSON: {config, home, busy}")
    parser.add_argument("out", type=Path, help="where the figures (or the error) go")
    args = parser.parse_args(argv)
    from ftstudio.parent import die_with_parent

    die_with_parent()  # the CLI or the studio waits on it; with them gone, nobody reads the figures
    return run_calibration(args.spec, args.out)


if __name__ == "__main__":
    raise SystemExit(main())
