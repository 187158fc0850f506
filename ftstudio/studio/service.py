"""The service: the one API that the CLI and the HTTP routes both call.

`Service` does submit, reading and presentation itself, and is composed of parts with one concern
each, which it calls: the queue's side (`Launcher`, launcher.py), a person's requests on a task
(`Control`, control.py) and the datasets and models (`Catalog`, catalog.py). Its methods are the
door: nothing above this module touches SQLite, processes or the parts. Every method either
returns a result or raises an `ftstudio.errors` exception whose message a
person can act on; the edges map those to HTTP codes and exit codes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import psutil

from ftstudio import __version__, checkpoints, taskfiles
from ftstudio.chat.process import ChatReply, ChatRequest, ChatWorker, Machine
from ftstudio.config import PRESETS, TrainingConfig, custom_reward, describe_fields, label, validation_fraction
from ftstudio.errors import Conflict, DamagedFile, NotFound, Problem, StorageError, TooBusy, UserError, ValidationError
from ftstudio.execution.executor import Executor, LocalExecutor
from ftstudio.home import Home, TaskDir, read_json, write_json_atomic
from ftstudio.resources import gpu_usage, machine_gpus, parse_memory, want_of
from ftstudio.storage import storage_error, writing
from ftstudio.studio import lifecycle, paths, scheduler
from ftstudio.studio.catalog import Catalog
from ftstudio.studio.control import CANCEL_GRACE_S, Control
from ftstudio.studio.estimates import ESTIMATE_FILE, Estimates, against_run, recorded
from ftstudio.studio.incoming import Incoming
from ftstudio.studio.launcher import DEFAULT_SLOTS as DEFAULT_SLOTS
from ftstudio.studio.launcher import Launcher
from ftstudio.studio.policy import Policy
from ftstudio.studio.repair import Reindexed, reindex
from ftstudio.studio.scheduler import Plan
from ftstudio.studio.store import Store, Task
from ftstudio.studio.supervisor import Supervisor, heartbeat_age
from ftstudio.studio.task import TaskStatus
from ftstudio.text import plain, printable
from ftstudio.training import evaluation

if TYPE_CHECKING:
    from ftstudio.execution.slurm import SlurmSettings

log = logging.getLogger("ftstudio")
WARNINGS_FILE = "warnings.json"
"""The data's warnings recorded at submit, in the task's folder (the task view shows them)."""
INSPECT_AT_SUBMIT_BYTES = 64 << 20
"""The largest dataset a submit inspects for its warnings (a file this size is read in seconds)."""

S = TaskStatus

# `python train.py` in a task dir reproduces the task by hand (`python train.py --resume auto`
# continues it from its newest complete checkpoint). Nothing from the user is in it: the entry
# point reads spec.json beside it.
TRAIN_PY = """\
import pathlib, sys, ftstudio.train
sys.exit(ftstudio.train.main([str(pathlib.Path(__file__).with_name("spec.json")), *sys.argv[1:]]))
"""


class OneLineFormatter(logging.Formatter):
    """Log lines name tasks, models and paths people chose: their control characters are escaped,
    so `tail studio.log` shows text, never runs an escape sequence (a traceback keeps its lines)."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return printable(super().formatMessage(record))


def setup_logging(home: Home, *, to_stderr: bool = False) -> None:
    """studio.log: one line a person understands for every launch, recovery and exit."""
    logger = logging.getLogger("ftstudio")
    if any(getattr(h, "_ftstudio", False) for h in logger.handlers):
        return
    handler: logging.Handler = logging.FileHandler(home.log, encoding="utf-8")
    handler.setFormatter(OneLineFormatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    handler._ftstudio = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    if to_stderr:
        console = logging.StreamHandler()
        console.setFormatter(OneLineFormatter("%(asctime)s %(message)s", "%H:%M:%S"))
        console._ftstudio = True  # type: ignore[attr-defined]
        logger.addHandler(console)
    logger.setLevel(logging.INFO)


def choose_executors(store: Store, given: Executor | None) -> tuple[Executor, dict[str, Executor]]:
    """The executor new tasks go to, and every executor by name: a task is watched by the one that launched
    it. `given` (tests): that one alone. Otherwise the home's choice (`studio start --executor`), local by
    default; Slurm's settings are kept in the home so every CLI command and a restarted studio agree."""
    if given is not None:
        return given, {given.name: given}
    local = LocalExecutor()
    found: dict[str, Executor] = {local.name: local}
    raw = store.setting("slurm")
    if raw:
        from ftstudio.execution.slurm import SlurmExecutor, SlurmSettings

        try:
            found["slurm"] = SlurmExecutor(SlurmSettings.from_json(json.loads(raw)))
        except (ValueError, TypeError, UserError) as e:
            logging.getLogger("ftstudio").error("the home's Slurm settings are not usable (%s); set them again", e)
    return found.get(store.setting("executor") or local.name, local), found


class Service:
    def __init__(
        self,
        home: Home | None = None,
        *,
        executor: Executor | None = None,
        in_server: bool = False,
        policy: Policy | None = None,
    ) -> None:
        self.home = (home or Home.default()).ensure()
        self.policy = policy or Policy()
        self._admit = threading.Lock()
        self.gpus: tuple[int, ...] = machine_gpus()
        self._chat: ChatWorker | None = None
        setup_logging(self.home)
        self.store = Store(self.home.db)
        self.executor, executors = choose_executors(self.store, executor)
        self.in_server = in_server
        self.launcher = Launcher(self.home, self.store, self.executor, self.gpus, yield_chat=self._yield_chat)
        self.supervisor = Supervisor(
            self.store, self.home, self.executor, launch_queued=self.launcher.schedule, executors=executors
        )
        self.control = Control(
            self.home, self.store, self.supervisor, in_server=in_server, get=self.get, schedule=self.launcher.schedule
        )
        self.catalog = Catalog(self.home, self.store, self.policy)
        self.estimates = Estimates(self.gpus)
        if in_server:
            # psutil measures CPU use since its previous call: a first call answers 0 %, so make it now and
            # the page's first look at the system panel shows the load since the studio started.
            psutil.cpu_percent(interval=None, percpu=True)

    # -- submit and launch ---------------------------------------------------

    def _checked(self, config: dict[str, Any], trusted: bool) -> tuple[TrainingConfig, dict[str, Any] | None]:
        """The config, once every check of a submit has passed (it raises the first refusal), and the memory
        estimate the checks counted (None where they did not: a cluster, or a model not on this machine)."""
        config = self._started_from(config)
        cfg = TrainingConfig.from_dict(config)
        if cfg.model.trust_remote_code and not trusted and not self.policy.allow_remote_code:
            raise ValidationError(
                Problem(
                    "model.trust_remote_code",
                    "running a model repository's code is off for requests to this studio; "
                    "its owner can allow it with `ftstudio studio start --allow-remote-code`, "
                    "or submit from the terminal with `ftstudio submit --set model.trust_remote_code=true`",
                )
            )
        if any(custom_reward(spec) for spec in cfg.rewards) and not trusted and not self.policy.allow_remote_code:
            raise ValidationError(
                Problem(
                    "rewards (--reward)",
                    "custom reward functions run Python code, which is off for requests to this studio; "
                    "its owner can allow it with `ftstudio studio start --allow-remote-code`, "
                    "or submit from the terminal with `ftstudio submit --reward python:PATH:FUNC`",
                )
            )
        # Which files this request may read is decided before anything is read, on the paths the trainer will use.
        paths.anchor(cfg, self.home.root)
        refused = paths.config_problems(cfg, home=self.home.root, policy=self.policy, trusted=trusted)
        if refused:
            raise ValidationError(refused)
        from ftstudio.training import preflight  # the trainer's cheap checks: files exist, data parses

        preflight.check(cfg, self.home.root, max_row_bytes=None if trusted else self.policy.max_row_bytes)
        return cfg, self._check_resources(cfg)

    def dry_run(self, config: dict[str, Any], *, trusted: bool = False) -> dict[str, Any]:
        """Every check `submit` makes, and the memory the run would need, without recording or starting anything
        (`ftstudio submit --dry-run`, `POST /api/tasks/check`)."""
        cfg, memory = self._checked(config, trusted)
        return {"config": cfg.to_dict(), "memory": memory if memory is not None else self.memory_needed(cfg)}

    def inspect_data(self, config: dict[str, Any], *, trusted: bool = False, view_rows: int = 20) -> dict[str, Any]:
        """What the model will learn from `config`'s data (`ftstudio data inspect`, GET /api/datasets/{name}/inspect):
        its shape, the rows as the trainer sees them, lengths and truncation, duplicates, leakage and cost. Read
        with the checks of a submit (the root rule, the data parses); kept per file content and settings."""
        from ftstudio.training import inspector
        from ftstudio.training.builtin import resolve_model
        from ftstudio.training.models import load_tokenizer

        cfg = TrainingConfig.from_dict(config)
        paths.anchor(cfg, self.home.root)
        refused = paths.config_problems(cfg, home=self.home.root, policy=self.policy, trusted=trusted)
        if refused:
            raise ValidationError(refused)
        data, held_out, validation = self._data_files(cfg)
        settings = {
            "model": cfg.model.name, "method": cfg.method, "max_length": cfg.data.max_length,
            "format": cfg.data.format, "view_rows": view_rows, "version": f"{inspector.VERSION} {__version__}",
        }  # fmt: skip
        key = inspector.cache_key(settings, [data, held_out, validation])
        cached = inspector.cache_dir() / f"{key}.json"
        try:
            return dict(json.loads(cached.read_text()))
        except (OSError, ValueError):
            pass
        try:
            if cfg.model.name.strip() == "builtin:tiny":
                from ftstudio.training.builtin import build_tokenizer

                tokenizer = build_tokenizer()  # what builtin:tiny saves, without building its weights
            else:
                tokenizer = load_tokenizer(resolve_model(cfg.model.name, self.home.root), cfg.model)
        except (OSError, ValueError) as e:
            raise ValidationError(
                Problem("model.name (--model)", f"cannot load the tokenizer of {cfg.model.name!r}: {str(e)[:200]}")
            ) from None
        report = inspector.inspect_data(
            data, tokenizer, method=cfg.method, max_length=cfg.data.max_length, data_format=cfg.data.format,
            held_out=held_out, validation=validation, view_rows=view_rows,
        )  # fmt: skip
        report["model"] = cfg.model.name
        with contextlib.suppress(OSError):
            write_json_atomic(cached, report)
            kept = sorted(cached.parent.glob("*.json"), key=lambda p: p.stat().st_mtime)
            for old in kept[: -inspector.CACHE_KEEP]:  # the newest reports are kept, the rest dropped
                old.unlink(missing_ok=True)
        return report

    def _data_files(self, cfg: TrainingConfig) -> tuple[Path, Path | None, Path | None]:
        """The files a config's data comes from: the training data, the held-out prompts, the validation file."""
        from ftstudio.training.builtin import resolve_dataset

        data = resolve_dataset(cfg.data.path, self.home.root)
        held_out = resolve_dataset(cfg.evaluation.prompts, self.home.root) if cfg.evaluation.prompts.strip() else None
        value = cfg.data.validation.strip()
        validation = None if validation_fraction(value) is not None else resolve_dataset(value, self.home.root)
        return data, held_out, validation

    def time_estimate(
        self,
        config: dict[str, Any],
        *,
        trusted: bool = False,
        start: bool = False,
        wait: bool = False,
        again: bool = False,
    ) -> dict[str, Any]:
        """How long an epoch of `config` takes on this machine (training/calibration.py): the kept measurement, or
        with `start` a new one begun (the page then asks `time_estimate_of` its key), or with `wait` as well
        measured before this returns (the CLI); `again`: measured anew even when kept. A measurement is checked as
        a submit is first: a run that would be refused is not timed; asking for a kept one checks only which
        files the request may read."""
        cfg = self._checked(config, trusted)[0] if start else self._readable(config, trusted)
        why = self.estimates.unsupported(cfg, self.executor.name)
        if why is not None:
            return {"state": "unsupported", "message": f"no time estimate: {why}"}
        key, device = self._timing_key(cfg)
        if not start:
            return self.estimates.state(key, cfg)
        busy = len(self.store.with_status(S.TRAINING))
        return self.estimates.start(key, cfg, device, self.home.root, busy, wait=wait, again=again)

    def _timing_key(self, cfg: TrainingConfig) -> tuple[str, dict[str, str]]:
        """The key a measurement of `cfg` is kept by, and the environment that gives it its device (picked once)."""
        from ftstudio.training import calibration

        data, _, validation = self._data_files(cfg)
        name, env = self.estimates.where(cfg)
        return calibration.key(cfg, [data, validation], name), env

    def time_estimate_of(self, key: str) -> dict[str, Any]:
        """A measurement by its key (what `time_estimate` answered), for the page to follow one it started."""
        if not re.fullmatch(r"[0-9a-f]{32}", key):
            raise NotFound(f"no time estimate {key[:40]!r}; ask POST /api/tasks/timing with the settings")
        return self.estimates.state(key)

    def derive_dataset(self, name: str, drop: str, *, eval_prompts: str = "", validation: str = "") -> dict[str, Any]:
        """A new uploaded dataset: `name` (bundled or uploaded) without its exact duplicates (`drop="duplicates"`) or
        without the rows whose prompt is one of the held-out prompts or validation rows (`drop="leaked"`). The
        original file is never changed. The inspector's fixes on the page."""
        import tempfile

        from ftstudio.training import inspector
        from ftstudio.training.builtin import resolve_dataset

        if drop not in ("duplicates", "leaked"):
            raise ValidationError(Problem("drop", f"drop must be duplicates or leaked, not {str(drop)[:40]!r}"))
        self.catalog.known(name)
        config: dict[str, Any] = {"data": {"path": name, "validation": validation or "0"}}
        if eval_prompts:
            config["evaluation"] = {"prompts": eval_prompts}
        cfg = TrainingConfig.from_dict(config)
        paths.anchor(cfg, self.home.root)
        refused = paths.config_problems(cfg, home=self.home.root, policy=self.policy, trusted=False)
        if refused:
            raise ValidationError(refused)
        sources = [resolve_dataset(v, self.home.root) for v in (cfg.evaluation.prompts, validation) if v.strip()]
        if drop == "leaked" and not sources:
            raise ValidationError(
                Problem("eval_prompts", "name the held-out prompts (or a validation file) to look for")
            )
        source = resolve_dataset(name, self.home.root)
        stem = Path(name.removeprefix("builtin:")).stem
        kept = dropped = 0
        with tempfile.TemporaryFile("w+b", dir=self.home.datasets) as out:
            for row, keep in inspector.kept_rows(source, drop, held_out=sources):
                if keep:
                    out.write(json.dumps(row, ensure_ascii=False).encode() + b"\n")
                    kept += 1
                else:
                    dropped += 1
            if not kept:
                raise ValidationError(Problem("drop", f"every row of {name} would be dropped; nothing to train on"))
            out.seek(0)
            added = self.catalog.upload_dataset(f"{stem}-{'dedup' if drop == 'duplicates' else 'no-leaks'}.jsonl", out)
        return {**added, "source": name, "dropped": dropped, "kept": kept}

    def estimate_memory(self, config: dict[str, Any], *, trusted: bool = False) -> dict[str, Any]:
        """The memory estimate alone, for the New fine-tune form as its settings change: the config's own checks
        and which paths it may read, but not the dataset's (that is `dry_run`'s, at submit)."""
        return {"memory": self.memory_needed(self._readable(config, trusted))}

    def _readable(self, config: dict[str, Any], trusted: bool) -> TrainingConfig:
        """The config with its own checks passed and the paths it names ones this request may read; the dataset
        itself is not read (the form asks this as its settings change)."""
        cfg = TrainingConfig.from_dict(self._started_from(config))
        paths.anchor(cfg, self.home.root)
        refused = paths.config_problems(cfg, home=self.home.root, policy=self.policy, trusted=trusted)
        if refused:
            raise ValidationError(refused)
        return cfg

    def memory_needed(self, cfg: TrainingConfig) -> dict[str, Any] | None:
        """The run's estimated peak memory against what this machine has for it (training/estimate.py); None
        when the model's shape is not on this machine to count from."""
        from ftstudio.training.estimate import amount, estimate, largest_batch, shape_for

        shape = shape_for(cfg.model.name, self.home.root)
        if shape is None:
            return None
        on_gpu = want_of(cfg.to_dict()["resources"], len(self.gpus)).gpus > 0
        need = estimate(cfg, shape, on_gpu=on_gpu)
        room, free, where = self._room(cfg, on_gpu)
        fits = room is None or need.bytes <= room
        line = need.line()
        if free is not None:
            line += f"; {where} {amount(free)} free"
        suggest = None if fits or room is None else largest_batch(cfg, shape, room, on_gpu=on_gpu)
        if not fits and suggest is not None:
            accum = cfg.optim.grad_accum * cfg.optim.batch_size // suggest
            line += (
                f"; batch {suggest} fits (about {amount(estimate(cfg, shape, on_gpu=on_gpu, batch=suggest).bytes)}), "
                f"with grad_accum {accum} for the same effective batch"
            )
        elif not fits:
            line += f"; not even batch 1 fits in {amount(room or 0)}"
        return {**need.to_dict(), "room": room, "free": free, "fits": fits, "suggest_batch": suggest, "line": line}

    def _room(self, cfg: TrainingConfig, on_gpu: bool) -> tuple[int | None, int | None, str]:
        """The most memory the run could ever have here (its --memory limit, or the device's size), what is
        free now, and the words for where."""
        if on_gpu:
            gpus = [g for g in gpu_usage() if g.get("memory_total")]
            if not gpus:
                return None, None, "this GPU has"
            best = max(gpus, key=lambda g: g["memory_total"] - (g.get("memory_used") or 0))
            return best["memory_total"], best["memory_total"] - (best.get("memory_used") or 0), "this GPU has"
        memory = psutil.virtual_memory()
        limit = parse_memory(cfg.resources.memory)
        if limit and limit < memory.total:
            return limit, min(limit, memory.available), "its --memory limit leaves"
        return memory.total, memory.available, "this machine has"

    def submit(
        self, config: dict[str, Any], name: str | None = None, *, trusted: bool = False, strict: bool = False
    ) -> Task:
        """Check, record and launch a task. `trusted`: the person at the terminal asked (the CLI), not a
        request over HTTP, whose reach is limited by the studio's `policy`. The data's warnings (truncation,
        leaked held-out prompts: `data_warnings`) are recorded with the task, or with `strict` refuse it."""
        cfg, _ = self._checked(config, trusted)
        warnings = self.data_warnings(cfg, trusted=trusted)
        estimate = self._kept_estimate(cfg)
        if strict and warnings:
            raise ValidationError(
                [Problem("data.path (--dataset)", f"{w['message']} (--strict refuses it)") for w in warnings]
            )
        # A name is text: control characters (terminal commands, bidi overrides) are dropped.
        name = " ".join(plain(name or "").split())[:200] or plain(f"{cfg.model.name} on {Path(cfg.data.path).name}")
        # Counted and recorded under one lock, so concurrent requests cannot all slip under the limit.
        with self._admit, writing(self.home.root):
            if not trusted:
                self._check_room()
            task = self.store.create_task(
                name=name,
                model=cfg.model.name,
                dataset=cfg.data.path,
                config=cfg.to_dict(),
                tasks_root=self.home.tasks,
                priority=cfg.resources.priority,
            )
        tdir = task.dir
        try:
            with writing(self.home.root):
                tdir.path.mkdir(parents=True)
                tdir.checkpoints.mkdir()
                write_json_atomic(
                    tdir.spec,
                    {
                        "format": 1,
                        "task_id": task.id,
                        "name": name,
                        "config": cfg.to_dict(),
                        "home": str(self.home.root),
                    },
                )
                tdir.train_py.write_text(TRAIN_PY)
                if warnings:
                    write_json_atomic(tdir.path / WARNINGS_FILE, warnings)
                if estimate is not None:
                    write_json_atomic(tdir.path / ESTIMATE_FILE, estimate)
        except (OSError, StorageError):
            # Leave nothing half-made behind: no record, no directory.
            shutil.rmtree(tdir.path, ignore_errors=True)
            self.store.delete(task.id, only_if={S.QUEUED})
            raise
        log.info("task %s submitted: %s", task.id, name)
        self.schedule()
        return self.store.get(task.id)

    def _kept_estimate(self, cfg: TrainingConfig) -> dict[str, Any] | None:
        """The time estimate measured for these settings already (the form or `data inspect --estimate` asked for
        it), to record with the task; a submit never waits for one."""
        try:
            if self.estimates.unsupported(cfg, self.executor.name) is not None:
                return None
            found = self.estimates.state(self._timing_key(cfg)[0], cfg)
        except Exception as e:  # an estimate never stands in a submit's way
            log.info("no time estimate recorded at submit: %s", str(e)[:200])
            return None
        return found if found["state"] == "done" else None

    def data_warnings(self, cfg: TrainingConfig, *, trusted: bool) -> list[dict[str, Any]]:
        """What the inspector warns of that a submit records: over 5 % of the response tokens lost to max_length,
        held-out prompts or validation rows found among the training rows. Asked of the inspector's cache (the
        form asked already); a dataset over INSPECT_AT_SUBMIT_BYTES or a model whose tokenizer is not on this
        machine is not inspected here (`ftstudio data inspect` does it on request)."""
        from ftstudio.training.builtin import resolve_dataset

        try:
            size = resolve_dataset(cfg.data.path, self.home.root).stat().st_size
        except (OSError, UserError):
            return []
        if size > INSPECT_AT_SUBMIT_BYTES:
            return []
        try:
            report = self.inspect_data(cfg.to_dict(), trusted=trusted)
        except Exception as e:  # a warning's check never stands in a submit's way; the trainer has the last word
            log.info("data not inspected at submit: %s", str(e)[:200])
            return []
        return [w for w in report["warnings"] if w["kind"] == "truncation" or w["kind"].startswith("leakage")]

    def _check_resources(self, cfg: TrainingConfig) -> dict[str, Any] | None:
        """A request this machine can never meet is refused now, not left waiting forever. (On a cluster,
        the scheduler knows what it has: sbatch refuses what it can never give; and a task waiting for the
        check of Slurm settings is headed there.)"""
        if self.executor.cluster or self.launcher.held() is not None:
            return None
        if cfg.resources.nodes > 1:
            raise ValidationError(
                Problem(
                    "resources.nodes (--nodes)",
                    f"asks for {cfg.resources.nodes} machines, but this studio runs tasks on this machine; spread a "
                    "task over nodes from a studio started with --executor slurm, or use --processes here",
                )
            )
        want = want_of(cfg.to_dict()["resources"], len(self.gpus))
        have = (
            f"GPUs {', '.join(map(str, self.gpus))}"
            if self.gpus
            else "no GPU that ftstudio can see (nvidia-smi lists none)"
        )
        missing = [n for n in want.gpu_ids if n not in self.gpus]
        if missing:
            raise ValidationError(
                Problem("resources.gpu_ids (--gpu-ids)", f"GPU {missing[0]} is not on this machine; it has {have}")
            )
        if want.gpus > len(self.gpus):
            fix = (
                "leave --gpus unset or 0 to train on the CPU" if not self.gpus else f"ask for at most {len(self.gpus)}"
            )
            raise ValidationError(
                Problem("resources.gpus (--gpus)", f"asks for {want.gpus} GPU(s) but this machine has {have}; {fix}")
            )
        self._check_fit(cfg, on_gpu=want.gpus > 0)
        return self._check_memory(cfg)

    def _check_fit(self, cfg: TrainingConfig, *, on_gpu: bool) -> None:
        """A model whose weights alone outgrow every device this machine could give the task is refused now (the
        trainer would die of it minutes later, after the download and the load)."""
        from ftstudio.footprint import GiB, training_weights

        found = training_weights(cfg.to_dict(), on_gpu)
        if found is None:
            return
        need, basis = found
        if on_gpu:
            sizes = [g["memory_total"] for g in gpu_usage() if g.get("memory_total")]
            if not sizes:
                return  # nvidia-smi says no size: nothing to hold the weights against
            room, where = max(sizes), "its largest GPU"
        else:
            room, where = psutil.virtual_memory().total, "this machine's memory"
            limit = parse_memory(cfg.resources.memory)
            if limit and limit < room:
                room, where = limit, "the task's --memory"
        if need <= room:
            return
        fix = (
            "use adapter lora or qlora (4-bit, on a GPU), "
            if cfg.adapter == "full"
            else "use adapter qlora (4-bit) on a GPU, "
            if cfg.model.quantization == "none"
            else ""
        )
        raise ValidationError(
            Problem(
                label("model.name"),
                f"{cfg.model.name[:200]} needs at least {need / GiB:,.1f} GiB "
                f"{'to train in full' if cfg.adapter == 'full' else 'for its weights alone in training'} "
                f"({basis}), more than {where} ({room / GiB:,.1f} GiB); {fix}pick a smaller model, or train on a "
                "machine with more memory",
            )
        )

    def _check_memory(self, cfg: TrainingConfig) -> dict[str, Any] | None:
        """A run whose estimated peak is well over the most memory it could ever have here is refused now, naming
        the batch that fits, instead of dying of it minutes in. Within the estimate's error it is let through:
        the estimate may be high, and optim.auto_batch shrinks a batch that turns out not to fit."""
        from ftstudio.training.estimate import ERROR

        found = self.memory_needed(cfg)
        if found is None or found["room"] is None or found["bytes"] * (1 - ERROR) <= found["room"]:
            return found
        if cfg.optim.auto_batch and found["suggest_batch"]:
            return found  # it starts at optim.batch_size and halves its batches until they fit
        fixes = "lower optim.batch_size or data.max_length, turn on model.gradient_checkpointing or optim.auto_batch"
        if cfg.resources.memory.strip():
            fixes += ", or raise --memory"
        raise ValidationError(Problem(label("optim.batch_size"), f"this run {found['line']}; {fixes}"))

    def _check_room(self) -> None:
        pending = len(self.store.with_status(S.QUEUED, S.PREPARING, S.TRAINING))
        limit = self.policy.max_pending
        if pending >= limit:
            raise TooBusy(
                f"{pending} fine-tunes are already queued or running, the most this studio takes from requests; "
                f"wait for one to finish or cancel one (its owner can raise the limit with "
                f"`ftstudio studio start --max-pending N`)"
            )

    # -- the index -------------------------------------------------------------

    def reindex(self) -> Reindexed:
        """Put back every task folder the index does not know (the studio does it at each start)."""
        with writing(self.home.root):
            return reindex(self.store, self.home)

    @staticmethod
    def repair(home: Home) -> dict[str, Any]:
        """`ftstudio studio repair` (no studio running): a studio.db that cannot be opened is moved aside, and
        the index is rebuilt from the task folders, every one it does not know."""
        moved = None
        try:
            Store(home.db).close()
        except DamagedFile:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            moved = home.root / f"studio.db.damaged-{stamp}"
            for suffix in ("", "-wal", "-shm"):
                src = home.root / f"studio.db{suffix}"
                if src.exists():
                    src.rename(home.root / f"studio.db.damaged-{stamp}{suffix}")
        service = Service(home)
        found = service.reindex()
        return {
            "moved_aside": str(moved) if moved else None,
            "rebuilt": found.rebuilt,
            "skipped": found.skipped,
            "tasks": len(service.store.ids()),
        }

    def backup(self, folder: Path) -> dict[str, Any]:
        """`ftstudio studio backup DIR`: a consistent copy of studio.db in DIR (SQLite's online backup, safe
        while the studio serves and tasks train). Never overwrites: DIR/studio.db must not exist yet."""
        folder = folder.expanduser().absolute()
        try:
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            dest = folder / "studio.db"
            os.close(os.open(dest, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        except FileExistsError:
            raise Conflict(
                f"{folder / 'studio.db'} exists already; a backup never replaces one: give another folder"
            ) from None
        except OSError as e:
            raise UserError(f"cannot write a backup in {folder}: {e.strerror}; give a folder you can write") from None
        try:
            tasks = self.store.backup(dest)
        except BaseException:
            dest.unlink(missing_ok=True)  # no half-made copy that looks like a backup
            raise
        return {"path": str(dest), "tasks": tasks, "bytes": dest.stat().st_size}

    # -- the queue (launcher.py) -----------------------------------------------

    def slots(self) -> int:
        """Training slots for tasks without a GPU (`studio start --slots`)."""
        return self.launcher.slots()

    def set_slots(self, slots: int) -> None:
        self.launcher.set_slots(slots)

    def set_executor(self, kind: str, slurm: SlurmSettings | None = None, *, check: bool = True) -> str:
        """Where new tasks run (`studio start --executor`); a line for the person."""
        return self.launcher.set_executor(kind, slurm, check=check)

    def plan(self) -> Plan:
        """Who would start now, and why each other queued task waits."""
        return self.launcher.plan()

    def schedule(self) -> list[str]:
        """Start every queued task whose resources are free; the ids started."""
        return self.launcher.schedule()

    def queue(self) -> dict[str, Any]:
        """What runs, what waits and for what (`ftstudio queue`, `GET /api/queue`)."""
        if not self.in_server:
            self._catch_up()
        return self.launcher.queue()

    def _catch_up(self) -> None:
        """With no studio watching (the CLI alone), end what has ended and start what can start."""
        for task in self.store.with_status(S.PREPARING, S.TRAINING):
            self.supervisor.sync(task)
        self.supervisor.recover_all()
        self.launcher.schedule()

    # -- a person's requests on a task (control.py) ----------------------------

    def cancel(self, task_id: str, *, grace: float = CANCEL_GRACE_S, wait: bool | None = None) -> Task:
        return self.control.cancel(task_id, grace=grace, wait=wait)

    def pause(self, task_id: str, *, freeze: bool = False) -> Task:
        return self.control.pause(task_id, freeze=freeze)

    def resume(self, task_id: str) -> Task:
        return self.control.resume(task_id)

    def retry(self, task_id: str) -> Task:
        return self.control.retry(task_id)

    def extend(self, task_id: str, *, epochs: float | None = None, steps: int | None = None) -> Task:
        return self.control.extend(task_id, epochs=epochs, steps=steps)

    def history(self, task_id: str) -> dict[str, Any]:
        return self.control.history(task_id)

    def delete(self, task_id: str) -> None:
        from ftstudio.studio import exports

        task = self.get(task_id)
        if task.dir.path.is_dir():
            running = [
                j["quant"] for j in exports.listing(task_id, task.dir.path) if j["status"] in ("queued", "running")
            ]
            if running:
                raise Conflict(
                    f"task {task_id} is being exported ({', '.join(running)}); cancel the export, then delete"
                )
        self.control.delete(task_id)

    # -- datasets and models (catalog.py) --------------------------------------

    def receive_dataset(self) -> Incoming:
        """Start an upload: a side directory under datasets/ that the file streams into."""
        return self.catalog.receive_dataset()

    def add_dataset(self, incoming: Incoming) -> dict[str, Any]:
        return self.catalog.add_dataset(incoming)

    def upload_dataset(self, filename: str, stream: IO[bytes]) -> dict[str, Any]:
        return self.catalog.upload_dataset(filename, stream)

    def dataset(self, name: str) -> dict[str, Any]:
        return self.catalog.dataset(name)

    def dataset_name(self, name: str) -> str:
        """`name`, when it is a bundled or uploaded dataset (the API reads no other); NotFound otherwise."""
        return self.catalog.known(name)

    def datasets(self) -> list[dict[str, Any]]:
        return self.catalog.datasets()

    def models(self) -> list[dict[str, Any]]:
        return self.catalog.models()

    # -- chat ----------------------------------------------------------------

    @property
    def chat_worker(self) -> ChatWorker:
        """The one chat worker of this studio (or CLI command), started with the first message."""
        with self._admit:
            if self._chat is None:
                self._chat = ChatWorker(
                    self.home.root / "logs" / "chat.log", machine=self._chat_machine, registry=self.home.chats
                )
            return self._chat

    def _chat_machine(self) -> Machine:
        """What training holds on this machine, for the chat's place: the store's leases (the studio's and
        any other process's tasks). A cluster's tasks train elsewhere: the chat has this machine to itself."""
        held = {} if self.executor.cluster else {lease.resource: lease.task_id for lease in self.store.leases()}
        return Machine(self.gpus, self.launcher.slots(), held)

    def _yield_chat(self, task_id: str, resources: tuple[str, ...]) -> None:
        """The launcher's hook: a task is about to start on `resources`; the chat gives them up first."""
        if self._chat is not None and not self.executor.cluster:
            self._chat.yield_to(task_id, resources)

    def chat(self, task_id: str, req: ChatRequest) -> ChatReply:
        """The reply to `req` from the task's adapter or checkpoint, as the worker streams it."""
        from ftstudio.chat.process import weights_of
        from ftstudio.training.builtin import resolve_model

        task = self.get(task_id)
        tdir = require_task_dir(self, task_id)
        weights = weights_of(task.id, task.status, tdir, req.checkpoint)
        model = task.config_dict.get("model", {})
        base = str(resolve_model(str(model.get("name", "")), self.home.root))
        return self.chat_worker.chat(
            req, base=base, weights=weights, trust_remote_code=bool(model.get("trust_remote_code")), task_id=task.id
        )

    def stop_chat(self, task_id: str, reply: int) -> bool:
        """Stop the task's chat reply `reply` (its `worker` event's number); False when it had ended."""
        self.get(task_id)  # NotFound for a task that is not there
        return self._chat is not None and self._chat.stop(reply, task_id)

    # -- reading -------------------------------------------------------------

    def get(self, task_id: str) -> Task:
        self.home.task(task_id)  # rejects ids that could never be ours (path characters) with a clear error
        task = self.store.get(task_id)
        if not self.in_server and task.status.has_process:
            # No studio may be watching: bring the record up to date ourselves (compare-and-set makes this safe).
            self.supervisor.sync(task)
            task = self.store.get(task_id)
        elif not self.in_server and task.status == S.QUEUED:
            # It waits for others to end: with no studio watching, nobody else would notice they did.
            self._catch_up()
            task = self.store.get(task_id)
        return task

    def page_of_tasks(self, *, limit: int = 50, offset: int = 0, status: str | None = None) -> tuple[list[Task], int]:
        if status is not None and status not in {s.value for s in S}:
            raise ValidationError(f"status: unknown status {status!r}; use one of {', '.join(s.value for s in S)}")
        if not 1 <= limit <= 1000:
            raise ValidationError("limit: must be between 1 and 1000")
        if offset < 0:
            raise ValidationError("offset: must not be negative")
        if not self.in_server:
            self._catch_up()
        return self.store.page_of_tasks(limit=limit, offset=offset, status=status)

    def logs(self, task_id: str, offset: int = 0, limit: int = 64 << 10) -> dict[str, Any]:
        """Bytes of training.log from `offset` (negative: the last -offset bytes)."""
        task = self.get(task_id)
        path = task.dir.log
        limit = max(1, min(limit, 1 << 20))
        # Opened without following a link: a training.log planted as a link to another file is not served.
        opened = taskfiles.open_inside(path.parent, Path(path.name))
        if opened is None:
            size, start, data = 0, 0, b""
        else:
            with opened[0] as f:
                size = f.seek(0, 2)
                start = max(0, size + offset) if offset < 0 else min(offset, size)
                f.seek(start)
                data = f.read(limit)
        return {
            "offset": start,
            "next_offset": start + len(data),
            "size": size,
            "text": data.decode("utf-8", "replace"),
        }

    def metrics(self, task_id: str, after: int = 0) -> list[dict[str, Any]]:
        task = self.get(task_id)
        return self.store.events(task.id, after_seq=after)

    def samples(self, task_id: str) -> list[dict[str, Any]]:
        """The answers to the task's held-out prompts, one entry a stage, oldest first (evaluation.py)."""
        return evaluation.stages(require_task_dir(self, task_id).path)

    # -- presentation --------------------------------------------------------

    def task_json(self, task: Task, waits: dict[str, scheduler.Wait] | None = None) -> dict[str, Any]:
        """The task as the API and `--json` show it. `waits`: the queue's plan, when the caller made one for many."""
        row = task.as_dict()
        status = task.status
        now = self.supervisor.clock()
        started, finished = row.get("started_at"), row.get("finished_at")
        beat_age = heartbeat_age(task.dir, now) if status.has_process else None
        attempts = self.store.attempts(task.id)
        row.update(
            config=task.config_dict,
            percent=task.percent,
            elapsed_s=_elapsed(attempts, started, finished, now, running=status.has_process),
            reattached=bool(row.get("reattached_at")) and status.has_process,
            heartbeat_age_s=beat_age,
            # A fact to show (a live runner that stopped beating), never a status: see lifecycle.stalled.
            stalled=lifecycle.stalled(status, beat_age),
            actions=list(lifecycle.actions(status, self.control.ask(task))),
            resources=self.store.leases_of(task.id) if status.has_process or row.get("frozen_at") else [],
            frozen=bool(row.get("frozen_at")),
            memory_limit=self._memory_limit(task),
            attempts=attempts,
            queue=self.launcher.queue_place(task, waits),
            warnings=read_json(task.dir.path / WARNINGS_FILE) or [],
        )
        estimate = recorded(task.dir.path)
        if estimate is not None:
            # The finished run's own figures, from its summary (a small file; its events can be many).
            summary = read_json(task.dir.path / "adapter" / "summary.json") if status == S.COMPLETED else None
            row["time_estimate"] = against_run(estimate, summary if isinstance(summary, dict) else None)
        if status == TaskStatus.INTERRUPTED:
            row["resumes"] = self.supervisor.resumes_at(task, attempts)
        if row.get("job_id"):
            row["slurm"] = self._slurm_job(task)
            if status.has_process and row["slurm"] and row["slurm"]["state"] == "PENDING":
                why = row["slurm"]["reason"]
                row["phase"] = f"pending in Slurm (reason: {why})" if why else "pending in Slurm"
        if status.has_process and row.get("pause_requested_at"):
            row["phase"] = "pausing"  # the trainer's own status events must not hide that a pause is under way
        for internal in ("events_offset", "pid_start_time", "boot_id", "cancel_requested_at", "frozen_at"):
            row.pop(internal, None)
        return row

    def _slurm_job(self, task: Task) -> dict[str, Any] | None:
        """The task's Slurm job as Slurm sees it now (one cached `squeue` for all tasks); state None when
        Slurm cannot be asked."""
        from ftstudio.execution.slurm import SlurmExecutor

        executor = self.supervisor.executor_for(task)
        if not isinstance(executor, SlurmExecutor):
            return {"job_id": task.job_id, "state": None, "reason": None}
        state = executor.known(task.job_id) if task.job_id and task.status.has_process else None
        return {
            "job_id": task.job_id,
            "state": state.state if state else None,
            "reason": state.reason if state else None,
        }

    @staticmethod
    def _memory_limit(task: Task) -> dict[str, Any] | None:
        """The limit and the mechanism that enforces it, as the runner recorded them (launch.json, exit.json)."""
        if not (task.config_dict.get("resources") or {}).get("memory"):
            return None
        tdir = task.dir
        for path in (tdir.exit, tdir.launch):
            limit = (read_json(path) or {}).get("memory_limit")
            if isinstance(limit, dict):
                return limit
        return None

    def health(self) -> dict[str, Any]:
        return {"status": "ok", "version": __version__, "home": str(self.home.root)}

    # -- what the page and the API read (web/routes) ---------------------------

    def system(self) -> dict[str, Any]:
        """The machine as the page's system panel shows it: CPUs, memory, the GPUs the studio hands out."""
        mem = psutil.virtual_memory()
        return {
            "version": __version__,
            "home": str(self.home.root),
            "cpu_count": psutil.cpu_count(),
            "cpu_percent": psutil.cpu_percent(interval=None, percpu=True),
            "memory": {"total": mem.total, "used": mem.total - mem.available},
            "gpus": gpu_usage(),
            "executor": self.executor_state(),
        }

    def _started_from(self, config: dict[str, Any]) -> dict[str, Any]:
        """`model.start_from` naming a task: that task's adapter folder, which must be there (the task completed),
        and the base model it was trained on unless the request names one (then it must be the same: preflight)."""
        model = config.get("model") if isinstance(config, dict) else None
        if not isinstance(model, dict):
            return config
        ref = model.get("start_from")
        if not isinstance(ref, str) or not ref.strip() or "/" in ref:
            return config  # empty, or a folder: the config's and preflight's checks name what is wrong
        try:
            task = self.store.get(ref.strip())
        except NotFound:
            return config  # not a task: preflight says so
        field = label("model.start_from")
        adapter = task.dir.adapter
        if task.status != S.COMPLETED or not (adapter / "adapter_config.json").is_file():
            why = (
                f"task {task.id} trained the whole model, not an adapter; give its model folder as model.name instead"
                if task.status == S.COMPLETED and taskfiles.has_result(adapter)
                else f"task {task.id} is {task.status}; a run can go on only from a completed task's adapter"
            )
            raise ValidationError(Problem(field, why))
        try:
            trained = read_json(adapter / "training_config.json") or {}
        except ValueError:
            trained = {}  # a damaged record: preflight reads the adapter again and names what is wrong
        base = (trained.get("model") or {}).get("name") if isinstance(trained, dict) else None
        resolved = {**model, "start_from": str(adapter)}
        if isinstance(base, str) and base and "name" not in model:
            resolved["name"] = base
        return {**config, "model": resolved}

    @staticmethod
    def config_fields() -> list[dict[str, Any]]:
        """Every setting with its type, default, help, flag and bounds (the page's form, `docs/config.md`)."""
        return [
            {
                "path": f.path,
                "type": f.type,
                "default": f.default,
                "help": f.help,
                "choices": list(f.choices),
                "flag": f.flag,
                "min": f.min,
                "max": f.max,
                "range": f.range,
                "max_length": f.max_length,
                "methods": list(f.methods),
            }
            for f in describe_fields()
        ]

    @staticmethod
    def presets() -> dict[str, Any]:
        return PRESETS

    @staticmethod
    def statuses() -> dict[str, Any]:
        """The lifecycle's own table of statuses and actions, so clients keep no copy."""
        return lifecycle.describe()

    def task_page(self, *, limit: int = 50, offset: int = 0, status: str | None = None) -> dict[str, Any]:
        """A page of tasks as the API shows them, newest first, with their place in the queue."""
        tasks, total = self.page_of_tasks(limit=limit, offset=offset, status=status)
        waits = self.plan().waits if any(t.status == S.QUEUED for t in tasks) else {}
        return {"tasks": [self.task_json(t, waits) for t in tasks], "total": total, "limit": limit, "offset": offset}

    def current(self, task_id: str) -> Task:
        """The task as the store holds it now, without bringing it up to date first (`get` may): the
        stream's look, once per change, while the supervisor keeps the store current."""
        return self.store.get(task_id)

    def events_after(self, task_id: str, after: int, limit: int) -> list[dict[str, Any]]:
        """Stored events after seq `after`, oldest first: the stream's read, without a look at the task."""
        return self.store.events(task_id, after_seq=after, limit=limit)

    def checkpoints(self, task_id: str) -> dict[str, Any]:
        """What can answer a chat: the final adapter (a completed task) and each complete checkpoint, newest first."""
        task = self.get(task_id)
        tdir = require_task_dir(self, task_id)
        found = [
            p
            for p in checkpoints.list_checkpoints(tdir.checkpoints)
            if not p.is_symlink() and checkpoints.is_complete(p)
        ]
        return {
            "adapter": task.status == S.COMPLETED and taskfiles.has_result(tdir.adapter),
            "checkpoints": [{"name": p.name, "step": checkpoints.step_of(p)} for p in reversed(found)],
        }

    def artifacts(self, task_id: str) -> list[dict[str, Any]]:
        """The files of the task's adapter, with their sizes."""
        tdir = require_task_dir(self, task_id)
        return [{"name": p.name, "size": size} for p, size in taskfiles.adapter_files(tdir)]

    def adapter_archive(self, task_id: str) -> Iterator[bytes]:
        """The adapter as a .tar.gz, streamed; NotFound before the first byte when there is none yet."""
        tdir = require_task_dir(self, task_id)
        files = taskfiles.adapter_files(tdir)
        if not any(p.name in ("adapter_config.json", "config.json") for p, _ in files):
            raise NotFound(f"task {task_id} has no adapter yet; it is written when training completes")
        return taskfiles.adapter_tarball(files, f"{task_id}-adapter")

    def open_file(self, task_id: str, name: str) -> tuple[IO[bytes], int]:
        """One of the task's downloadable files (taskfiles.DOWNLOADABLE), opened without following a link."""
        tdir = require_task_dir(self, task_id)
        where = taskfiles.DOWNLOADABLE.get(name)
        opened = taskfiles.open_inside(tdir.path, Path(where) / name) if where else None
        if opened is None:
            raise NotFound(f"task {task_id} has no file {name!r}; available: {', '.join(taskfiles.DOWNLOADABLE)}")
        return opened

    def handover(self, task_id: str) -> dict[str, str]:
        """Ready-to-copy ways to load a completed task's result: peft, vLLM, Ollama, `ftstudio export`."""
        from ftstudio.training.export import handover

        task = self.get(task_id)
        tdir = require_task_dir(self, task_id)
        if task.status != S.COMPLETED or not taskfiles.has_result(tdir.adapter):
            raise NotFound(f"task {task_id} has no adapter yet; it is written when training completes")
        return handover(task.id, task.name, tdir.adapter, self.home.root)

    def upload_limit(self) -> int:
        """The most one dataset upload may carry, in bytes (`studio start --max-upload-mb`)."""
        return self.policy.max_upload_bytes

    def storage_problem(self, exc: BaseException) -> StorageError | None:
        """A database error that is a full or read-only data home, as the error a person can act on; else None."""
        return storage_error(exc, self.home.root)

    # -- results: generate, merge, export (the CLI) ----------------------------

    def _result_of(self, task_id: str, what: str) -> tuple[Task, TaskDir]:
        """A completed task and its folder, whose adapter `what` (a command) works on; why not, otherwise."""
        task = self.get(task_id)
        if task.status != S.COMPLETED:
            need = "needs" if " and " not in what else "need"
            raise ValidationError(f"task {task_id} is {task.status}; {what} {need} a completed task (its adapter)")
        return task, require_task_dir(self, task_id)

    def generate(self, task_id: str, prompt: str, *, max_new_tokens: int = 64) -> str:
        """The base model with the task's adapter answering one prompt (`ftstudio generate`), loaded here."""
        from ftstudio.training import adapters  # torch and transformers: only commands that use them pay for them

        _, tdir = self._result_of(task_id, "merge and generate")
        return adapters.generate(tdir.adapter, prompt, max_new_tokens=max_new_tokens, home=self.home.root)

    def merge(self, task_id: str, out: Path | None = None) -> Path:
        """Base model + the task's adapter folded into one model at `out` (default: TASK_DIR/merged); the folder."""
        from ftstudio.training import adapters

        _, tdir = self._result_of(task_id, "merge and generate")
        return adapters.merge(tdir.adapter, out or tdir.path / "merged", home=self.home.root)

    def export(self, task_id: str, fmt: str = "adapter", out: Path | None = None, *, quant: str = "q4_k_m") -> Path:
        """The task's result as a folder that stands on its own, with a model card (`ftstudio export`): `out`,
        which must not exist yet (default: ./NAME-FORMAT in the current folder, the CLI's; ./NAME-QUANT for gguf)."""
        from ftstudio.training import export

        task, tdir = self._result_of(task_id, "export")
        wall = self.task_json(task).get("elapsed_s")  # every attempt's training time, not only the last one's
        if fmt == "gguf":
            from ftstudio.training.gguf import export_gguf

            out = out or Path.cwd() / f"{export.lora_name(task.name, task.id)}-{quant}"
            return export_gguf(task.id, task.name, tdir.path, out, quant, self.home.root, wall_s=wall)
        out = out or Path.cwd() / f"{export.lora_name(task.name, task.id)}-{fmt}"
        return export.export(task.id, task.name, tdir.path, out, fmt, self.home.root, wall_s=wall)

    # -- export jobs (the page and the API; studio/exports.py) ------------------

    def start_export(self, task_id: str, quant: str) -> dict[str, Any]:
        """A GGUF export of a completed task started as a job of its own; its record (queued)."""
        from ftstudio.studio import exports

        task, tdir = self._result_of(task_id, "export")
        return exports.start(task, tdir.path, self.home.root, quant, self.task_json(task).get("elapsed_s"))

    def exports(self, task_id: str) -> list[dict[str, Any]]:
        """The task's export jobs, with their progress line, and their files once completed."""
        from ftstudio.studio import exports

        self.get(task_id)
        tdir = require_task_dir(self, task_id)
        return exports.listing(task_id, tdir.path)

    def cancel_export(self, task_id: str, job: str) -> dict[str, Any]:
        from ftstudio.studio import exports

        self.get(task_id)
        return exports.cancel(task_id, require_task_dir(self, task_id).path, exports.valid_job(job))

    def delete_export(self, task_id: str, job: str) -> None:
        from ftstudio.studio import exports

        self.get(task_id)
        exports.delete(task_id, require_task_dir(self, task_id).path, exports.valid_job(job))

    def open_export_file(self, task_id: str, job: str, name: str) -> tuple[IO[bytes], int]:
        from ftstudio.studio import exports

        self.get(task_id)
        return exports.open_file(task_id, require_task_dir(self, task_id).path, exports.valid_job(job), name)

    def chat_weights(self, task_id: str, checkpoint: str = "") -> str:
        """What a chat with the task answers with: "adapter" or a checkpoint's name (the one asked for, else
        the newest complete one); NotFound says why there is none yet."""
        from ftstudio.chat.process import weights_of

        task = self.get(task_id)
        return weights_of(task.id, task.status, require_task_dir(self, task.id), checkpoint).name

    def chat_message(self, task_id: str, body: dict[str, Any]) -> ChatReply:
        """`chat` for a request as the page's JSON has it (messages, system, temperature, ...), checked here."""
        from ftstudio.chat.process import parse_request

        return self.chat(task_id, parse_request(body))

    def close_chat(self) -> None:
        """End this service's chat worker (and the model it holds), if one started."""
        if self._chat is not None:
            self._chat.close()

    def check_pending_executor(self, stop: threading.Event | None = None) -> tuple[bool, str] | None:
        """The serving studio's part of `studio start --executor slurm` with changed settings: run their check
        job, and on a pass send new fine-tunes to Slurm from now on, without a restart."""
        done = self.launcher.finish_check(stop)
        if done is not None and done[0]:
            self._switch_to(choose_executors(self.store, None)[0])
        return done

    def _switch_to(self, executor: Executor) -> None:
        """New tasks go to `executor` from now on; every task already launched stays with its own."""
        with self.launcher.scheduling():
            self.executor = executor
            self.launcher.executor = executor
            self.supervisor.executor = executor
            self.supervisor.executors[executor.name] = executor
        self.supervisor.poke()  # queued tasks held for the check may start now

    def executor_state(self) -> dict[str, Any]:
        """Where new fine-tunes run, and how the last check of Slurm settings went (page, `studio status`)."""
        state: dict[str, Any] = {"kind": self.executor.name, "held": self.launcher.held()}
        settings = getattr(self.executor, "settings", None)
        if settings is not None:
            state["partition"] = settings.partition
        pending = self.launcher.pending()
        if pending is not None:
            state["pending"] = {"partition": pending["settings"].get("partition"), "since": pending.get("since")}
        check = self.launcher.last_check()
        if check is not None:
            state["last_check"] = check
        return state

    def use_executor(self, kind: str, slurm: dict[str, Any] | None = None) -> str:
        """`studio start --executor KIND`: `set_executor` with Slurm's settings as the flags give them
        (SlurmSettings' fields), each problem with them named at once; a line for the person."""
        settings = None
        if kind == "slurm":
            from ftstudio.execution.slurm import SlurmSettings

            settings = SlurmSettings(**{"partition": "", **(slurm or {})})
            problems = settings.problems() + settings.unworkable()
            if problems:
                raise ValidationError("; ".join(problems))
        return self.set_executor(kind, settings)


def _elapsed(
    attempts: list[dict[str, Any]], started: float | None, finished: float | None, now: float, *, running: bool
) -> float | None:
    """Training time over every attempt (the time between them, queued or down, is not counted); the last
    attempt's span where no attempt was recorded (tasks from before attempts were)."""
    spans = [(a["started_at"], a["ended_at"]) for a in attempts if a["started_at"]]
    if not spans:
        return round((finished or now) - started, 1) if started else None
    total: float = sum((end if end else (now if running else start)) - start for start, end in spans)
    return round(total, 1)


def require_task_dir(service: Service, task_id: str) -> TaskDir:
    task = service.get(task_id)
    tdir = task.dir
    if not tdir.path.is_dir():
        raise NotFound(f"the files of task {task_id} are gone from {tdir.path}")
    return tdir
