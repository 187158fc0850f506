"""`ftstudio`: the command line. Thin: every command calls the same service
functions as the HTTP routes, so read commands work while the studio is down."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from ftstudio import __version__
from ftstudio.config import CLI_FLAGS, set_path
from ftstudio.errors import Conflict, FtstudioError, NotRunning, ValidationError
from ftstudio.home import Home
from ftstudio.studio.policy import DEFAULT_MAX_PENDING, DEFAULT_MAX_ROW_BYTES, DEFAULT_MAX_UPLOAD_BYTES
from ftstudio.studio.store import Task
from ftstudio.studio.task import TaskStatus
from ftstudio.text import printable
from ftstudio.web import daemon as studio_mod
from ftstudio.web.auth import binds_beyond_loopback, load_or_create_token

# Flags of `submit` that map onto config fields: (flag, field path, type, help).
SUBMIT_FLAGS: list[tuple[str, str, type, str]] = [
    ("--model", "model.name", str, "base model: hub id, local directory or builtin:tiny"),
    ("--dataset", "data.path", str, "dataset: builtin:sample, an uploaded name or a file path"),
    ("--epochs", "optim.epochs", float, "passes over the data"),
    ("--lr", "optim.learning_rate", float, "peak learning rate"),
    ("--max-steps", "optim.max_steps", int, "stop after this many steps"),
    ("--batch-size", "optim.batch_size", int, "samples per step per device"),
    ("--lora-rank", "lora.rank", int, "LoRA rank"),
    ("--checkpoint-every", "checkpoint.every_steps", int, "checkpoint every N steps"),
    ("--eval-prompts", "evaluation.prompts", str, "held-out prompts (a file or uploaded dataset) answered at the end"),
    ("--processes", "resources.processes", int, "training processes per node (above 1: torchrun)"),
    ("--nodes", "resources.nodes", int, "machines to spread over, each running --processes (Slurm executor only)"),
    ("--gpus", "resources.gpus", int, "GPUs to lease (default: one per process where there are GPUs; 0: CPU)"),
    ("--gpu-ids", "resources.gpu_ids", str, "exactly these GPUs, e.g. 0,2 (nvidia-smi numbering)"),
    ("--memory", "resources.memory", str, "memory limit of the task's processes, e.g. 8G; past it the task fails"),
    ("--priority", "resources.priority", int, "queue priority: higher starts first (default 0)"),
    ("--max-restarts", "resume.max_restarts", int, "automatic restarts after a crash or reboot (default 3)"),
    ("--preset", "preset", str, "start from a preset: cpu-demo, single-gpu-24gb, low-memory"),
]
assert all(CLI_FLAGS.get(path) == flag for flag, path, _, _ in SUBMIT_FLAGS)
assert CLI_FLAGS["resources.share_gpu"] == "--share-gpu"  # switches, added beside SUBMIT_FLAGS
assert CLI_FLAGS["resume.auto"] == "--no-auto-resume"


def _service() -> Any:
    from ftstudio.studio.service import Service

    return Service(Home.default())


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


def _fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def _progress(task: dict[str, Any]) -> str:
    step = f"{task['step']}/{task['total_steps']}" if task.get("total_steps") else str(task.get("step") or 0)
    loss = f"{task['loss']:.4f}" if isinstance(task.get("loss"), float) else "-"
    return f"step {step}  loss {loss}  eta {_fmt_duration(task.get('eta_s'))}"


# -- commands ----------------------------------------------------------------


def cmd_submit(args: argparse.Namespace) -> int:
    config: dict[str, Any] = {}
    if args.config:
        try:
            config = json.loads(Path(args.config).read_text())
        except (OSError, ValueError) as e:
            raise ValidationError(f"--config: cannot read {args.config}: {e}") from None
    for flag, path, _typ, _help in SUBMIT_FLAGS:
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if value is not None:
            set_path(config, path, value)
    if args.share_gpu:
        set_path(config, "resources.share_gpu", True)
    if args.no_auto_resume:
        set_path(config, "resume.auto", False)
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValidationError(f"--set: expected section.field=value, got {item!r}")
        set_path(config, key.strip(), _parse_value(value))
    service = _service()
    task = service.submit(config, args.name, trusted=True)
    if args.json:
        _print_json(service.task_json(task))
    else:
        print(task.id)
    if args.wait:
        return _wait(service, task.id, quiet=args.json)
    return 0


def _parse_value(text: str) -> Any:
    """`--set lora.target_modules=q_proj,v_proj` or `--set optim.seed=7`: JSON if it parses, else the text."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def _wait(service: Any, task_id: str, *, quiet: bool = False) -> int:
    """Follow a task to its end, with a progress bar on a terminal."""
    tty = sys.stderr.isatty() and not quiet
    while True:
        task = service.task_json(service.get(task_id))
        if tty:
            pct = task.get("percent") or 0
            bar = "#" * int(pct / 100 * 30)
            sys.stderr.write(f"\r{task['status']:<11} [{bar:<30}] {pct:5.1f}%  {_progress(task)}   ")
            sys.stderr.flush()
        status = TaskStatus(task["status"])
        if status == TaskStatus.PAUSED:
            if tty:
                sys.stderr.write("\n")
            if not quiet:
                print(f"task {task_id} is paused; continue it with `ftstudio resume {task_id}`", file=sys.stderr)
            return 1
        if status.is_final:
            if tty:
                sys.stderr.write("\n")
            if status == TaskStatus.FAILED and not quiet:
                print(f"task {task_id} failed: {printable(task['error'])}", file=sys.stderr)
            return 0 if status == TaskStatus.COMPLETED else 1
        time.sleep(0.5)


def cmd_tasks(args: argparse.Namespace) -> int:
    service = _service()
    tasks, total = service.page_of_tasks(limit=args.limit, offset=args.offset, status=args.status)
    if args.json:
        _print_json({"tasks": [service.task_json(t) for t in tasks], "total": total})
        return 0
    if not tasks:
        print("no tasks yet; start one with `ftstudio submit --preset cpu-demo`")
        return 0
    print(f"{'ID':<22} {'STATUS':<11} {'PROGRESS':<32} NAME")
    for t in tasks:
        view = service.task_json(t)
        print(f"{t.id:<22} {t.status:<11} {_progress(view):<32} {printable(t.name)}")
    if total > len(tasks) + args.offset:
        print(f"... {total - len(tasks) - args.offset} more (--offset {args.offset + len(tasks)})")
    return 0


def cmd_queue(args: argparse.Namespace) -> int:
    q = _service().queue()
    if args.json:
        _print_json(q)
        return 0
    gpus = ", ".join(map(str, q["gpus"])) or "none"
    print(f"training slots {q['slots']} (for tasks without a GPU; studio start --slots N), GPUs {gpus}")
    if not q["running"] and not q["waiting"] and not q["chats"]:
        print("nothing running or waiting")
        return 0
    for t in q["running"]:
        print(f"  running  {t['id']:<22} {', '.join(t['resources']) or '-':<12} {printable(t['name'])}")
    for c in q["chats"]:
        who = f"chat with task {c['task']}" if c["task"] else "chat"
        print(f"  chat     pid {c['pid']:<18} {printable(c['device'])}: {who}")
    for t in q["waiting"]:
        prio = f" priority {t['priority']}" if t["priority"] else ""
        print(f"  #{t['position']:<7} {t['id']:<22} {printable(t['reason'])}{prio}")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    service = _service()
    view = service.task_json(service.get(args.task))
    if args.json:
        _print_json(view)
        return 0
    for key in ("id", "name", "status", "model", "dataset", "attempt", "pid", "task_dir"):
        print(f"{key:<10} {printable(view.get(key))}")
    print(f"{'progress':<10} {_progress(view)}  epoch {view.get('epoch') or 0}/{view.get('total_epochs') or '?'}")
    if view.get("queue"):
        print(f"{'queue':<10} #{view['queue']['position']}: {printable(view['queue']['reason'])}")
    if view.get("resources"):
        print(f"{'holds':<10} {', '.join(view['resources'])}")
    if view.get("slurm"):
        job = view["slurm"]
        reason = f", reason: {job['reason']}" if job.get("reason") else ""
        now = f" ({job['state']}{reason})" if job.get("state") else ""
        print(f"{'slurm job':<10} {printable(job['job_id'])}{printable(now)}")
    if view.get("reattached"):
        print(f"{'note':<10} the studio restarted and reattached to this training")
    if view.get("stalled"):
        age = view["heartbeat_age_s"]
        print(f"{'note':<10} no heartbeat for {age:.0f}s: the training process is alive but not reporting")
    if view.get("error"):
        print(f"{'error':<10} {printable(view['error'])}")
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    service = _service()
    offset = 0
    while True:
        chunk = service.logs(args.task, offset)
        sys.stdout.write(chunk["text"])
        sys.stdout.flush()
        offset = chunk["next_offset"]
        if chunk["next_offset"] < chunk["size"]:
            continue
        if not args.follow or service.get(args.task).status.is_final:
            return 0
        time.sleep(0.5)


def cmd_cancel(args: argparse.Namespace) -> int:
    service = _service()
    task = service.cancel(args.task)
    print(f"task {task.id} {task.status}")
    return 0


def cmd_pause(args: argparse.Namespace) -> int:
    task = _service().pause(args.task, freeze=args.freeze)
    if task.status == TaskStatus.PAUSED:
        print(f"task {task.id} paused ({task.phase or 'held'})")
    else:
        print(f"task {task.id} pausing: it saves a checkpoint at its next step, then stops (ftstudio show {task.id})")
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    task = _service().resume(args.task)
    print(f"task {task.id} {task.status} (attempt {task.attempt})")
    return 0


def cmd_retry(args: argparse.Namespace) -> int:
    task = _service().retry(args.task)
    print(f"task {task.id} {task.status} (attempt {task.attempt})")
    return 0


def cmd_extend(args: argparse.Namespace) -> int:
    task = _service().extend(args.task, epochs=args.epochs, steps=args.steps)
    print(f"task {task.id} {task.status} (attempt {task.attempt})")
    return 0


def cmd_history(args: argparse.Namespace) -> int:
    history = _service().history(args.task)
    if args.json:
        _print_json(history)
        return 0
    for a in history["attempts"]:
        start = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(a["started_at"])) if a["started_at"] else "-"
        end = f"ended after {_fmt_duration(a['ended_at'] - a['started_at'])}" if a["ended_at"] else "running"
        resumed = f", resumed from step {a['resumed_from_step']}" if a["resumed_from_step"] else ""
        why = f": {printable(a['end_reason'])}" if a["end_reason"] else ""
        print(f"attempt {a['attempt']}  started {start}{resumed}, {end}{why}")
    for t in history["transitions"]:
        stamp = time.strftime("%H:%M:%S", time.localtime(t["ts"]))
        print(f"  {stamp}  {t['src'] or '-':>11} -> {t['dst']:<11} {printable(t['reason'] or '')}")
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    _service().delete(args.task)
    print(f"task {args.task} deleted")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from ftstudio.training import trainer as train

    return train.main([args.spec, *(["--output", args.output] if args.output else [])])


def cmd_demo(args: argparse.Namespace) -> int:
    home = Home.default()
    info = studio_mod.start(home, _server_options(args))
    service = _service()
    task = service.submit({"preset": "cpu-demo"}, "demo: builtin:tiny on builtin:sample", trusted=True)
    print(f"studio:  {info.login_url(load_or_create_token(home))}")
    print(f"task:    {task.id}  (ftstudio show {task.id}; ftstudio logs -f {task.id})")
    if args.wait or (sys.stderr.isatty() and not args.no_wait):
        print("training... (Ctrl-C stops watching; the training keeps running)", file=sys.stderr)
        try:
            return _wait(service, task.id)
        except KeyboardInterrupt:
            print(f"\nstill training; watch it at {info.url}", file=sys.stderr)
    return 0


def cmd_studio(args: argparse.Namespace) -> int:
    home = Home.default()
    if args.action in ("start", "restart", "serve") and args.executor:
        _use_executor(args)
    if args.action == "serve":
        return studio_mod.serve(home, _server_options(args))
    if args.action in ("stop", "restart"):
        stopped = studio_mod.stop(home)
        if args.action == "stop":
            print(f"studio stopped (pid {stopped.pid}); training keeps running" if stopped else "studio is not running")
            return 0
    if args.action in ("start", "restart"):
        options = _server_options(args)
        if options.slots is not None:  # remembered now, so a studio already running uses it at its next look
            _service().set_slots(options.slots)
        already = studio_mod.running_server(home)
        info = studio_mod.start(home, _server_options(args))
        token = load_or_create_token(home)
        print(f"studio {'already running' if already else 'running'} at {info.login_url(token)} (pid {info.pid})")
        if binds_beyond_loopback(info.host):
            print(f"warning: {studio_mod.exposure_warning(info.host, info.port, info.scheme)}", file=sys.stderr)
        return 0
    if args.action == "token":
        print(load_or_create_token(home))
        return 0
    if args.action == "url":
        running = studio_mod.running_server(home)
        if running is None:
            raise NotRunning("the studio is not running; start it with `ftstudio studio start` (it prints the URL)")
        print(running.login_url(load_or_create_token(home)))
        return 0
    st = studio_mod.status(home)
    if args.json:
        _print_json(st)
    elif st["running"]:
        print(f"studio running at {st['url']} (pid {st['pid']}, up {_fmt_duration(st['uptime_s'])}), home {st['home']}")
    else:
        print(f"studio is not running (home {st['home']}); start it with `ftstudio studio start`")
    return 0 if st["running"] or args.action != "status" else 3


def _use_executor(args: argparse.Namespace) -> None:
    """--executor and Slurm's flags: checked against the cluster, then remembered in the home."""
    slurm = None
    if args.executor == "slurm":
        from ftstudio.execution.slurm import SlurmSettings

        slurm = SlurmSettings(
            partition=args.partition or "",
            account=args.account,
            qos=args.qos,
            time=args.time,
            host=args.slurm_host,
            signal=args.slurm_signal,
            extra=tuple(args.sbatch_option),
        )
        problems = slurm.problems() + slurm.unworkable()
        if problems:
            raise ValidationError("; ".join(problems))
    print(_service().set_executor(args.executor, slurm))


def _server_options(args: argparse.Namespace) -> studio_mod.ServerOptions:
    """The studio's flags as one value; `start` hands them on to the background `serve` unchanged."""
    return studio_mod.ServerOptions.checked(
        host=args.host,
        port=args.port,
        certfile=args.certfile,
        keyfile=args.keyfile,
        allow_remote_code=args.allow_remote_code,
        allow_paths=args.allow_path,
        allow_hosts=args.allow_host,
        allow_origins=args.allow_origin,
        max_upload_mb=args.max_upload_mb,
        max_row_kb=args.max_row_kb,
        max_pending=args.max_pending,
        slots=getattr(args, "slots", None),
    )


def cmd_merge(args: argparse.Namespace) -> int:
    from ftstudio.training import adapters

    tdir = _task_dir(args.task)
    out = Path(args.out) if args.out else tdir.path / "merged"
    adapters.merge(tdir.adapter, out, home=Home.default().root)
    print(out)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from ftstudio.training import export

    tdir = _task_dir(args.task, "export")
    service = _service()
    task = service.get(args.task)
    out = Path(args.out) if args.out else Path.cwd() / f"{export.lora_name(task.name, task.id)}-{args.format}"
    wall = service.task_json(task).get("elapsed_s")  # every attempt's, not only the last one's
    print(export.export(task.id, task.name, tdir.path, out, args.format, Home.default().root, wall_s=wall))
    return 0


CHAT_HELP = (
    "/reset starts the conversation over; /beside answers even while training holds the machine; "
    "/quit or Ctrl-D ends it; Ctrl-C stops a reply"
)


def cmd_chat(args: argparse.Namespace) -> int:
    """An interactive chat in the terminal, through the same worker and code as the page's chat."""
    from ftstudio.chat.process import parse_request, weights_of
    from ftstudio.studio.service import require_task_dir

    service = _service()
    task = service.get(args.task)
    weights = weights_of(task.id, task.status, require_task_dir(service, task.id), args.checkpoint or "")
    what = "its adapter" if weights.name == "adapter" else weights.name.replace("-", " ")
    print(f"chatting with {task.name} ({task.id}), {what}. {CHAT_HELP}", file=sys.stderr, flush=True)
    history: list[dict[str, str]] = []
    settings = {
        "system": args.system or "",
        "temperature": args.temperature,
        "top_p": args.top_p,
        "max_new_tokens": args.max_new_tokens,
        "compare": args.compare,
        "checkpoint": weights.name if weights.name != "adapter" else "",
        "beside_training": args.beside_training,
    }
    try:
        while True:
            try:
                line = input("you> ")
            except EOFError:
                print(file=sys.stderr)
                return 0
            text = line.strip()
            if text in ("/quit", "/exit"):
                return 0
            if text == "/beside":
                settings["beside_training"] = True
                print("(answering beside training from now on: training slows some)", file=sys.stderr, flush=True)
                continue
            if text == "/reset":
                history = []
                print("(a new conversation)", file=sys.stderr, flush=True)
                continue
            if not text:
                continue
            req = parse_request({**settings, "messages": [*history, {"role": "user", "content": line}]})
            try:
                events = service.chat(task.id, req)
            except Conflict as e:  # training holds the machine, or the last reply is still stopping
                print(f"error: {printable(e)}", file=sys.stderr, flush=True)
                continue
            reply = _chat_reply(events)
            if reply is not None:
                history += [{"role": "user", "content": line}, {"role": "assistant", "content": reply}]
    finally:
        service.chat_worker.close()


def _chat_reply(events: Any) -> str | None:
    """Print one reply as it streams; the adapter's text, or None when it failed or was stopped."""
    own: list[str] = []
    who = None
    try:
        for ev in events:
            kind = ev.get("event")
            if kind == "loading":
                print(f"({ev.get('message', 'loading the model')}…)", file=sys.stderr, flush=True)
            elif kind == "token":
                if ev.get("who") != who:
                    who = ev.get("who")
                    print(("\n" if own else "") + ("model> " if who == "adapter" else "base>  "), end="", flush=True)
                if who == "adapter":
                    own.append(ev.get("text", ""))
                print(ev.get("text", ""), end="", flush=True)
            elif kind == "error":
                print(f"\nerror: {ev.get('message')}", file=sys.stderr, flush=True)
                return None
        print(flush=True)
        return "".join(own)
    except KeyboardInterrupt:
        events.cancel()  # stops the generation; the conversation goes on without this reply
        print("\n(stopped)", file=sys.stderr, flush=True)
        return None


def cmd_generate(args: argparse.Namespace) -> int:
    from ftstudio.training import adapters

    adapter = _task_dir(args.task).adapter
    print(adapters.generate(adapter, args.prompt, max_new_tokens=args.max_new_tokens, home=Home.default().root))
    return 0


def _task_dir(task_id: str, what: str = "merge and generate") -> Any:
    from ftstudio.studio.service import require_task_dir

    service = _service()
    task: Task = service.get(task_id)
    if task.status != TaskStatus.COMPLETED:
        need = "needs" if " and " not in what else "need"
        raise ValidationError(f"task {task_id} is {task.status}; {what} {need} a completed task (its adapter)")
    return require_task_dir(service, task_id)


# -- parser --------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ftstudio", description="Fine-tunes that survive restarts.")
    p.add_argument("--version", action="version", version=f"ftstudio {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func: Any, summary: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=summary, description=summary)
        sp.set_defaults(func=func)
        return sp

    def server_flags(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--host", default=studio_mod.DEFAULT_HOST, help="address to bind (default 127.0.0.1)")
        sp.add_argument("--port", type=int, default=studio_mod.DEFAULT_PORT, help="port (default 8765)")
        sp.add_argument(
            "--allow-remote-code",
            action="store_true",
            help="let requests over HTTP set model.trust_remote_code (runs a model repository's code as you)",
        )
        sp.add_argument(
            "--allow-path",
            action="append",
            default=[],
            metavar="DIR",
            help="also accept datasets and models under DIR (beside the data home and your home); repeatable",
        )
        sp.add_argument(
            "--allow-host",
            action="append",
            default=[],
            metavar="NAME",
            help="also answer requests for this host name (beside loopback names); repeatable",
        )
        sp.add_argument(
            "--allow-origin",
            action="append",
            default=[],
            metavar="URL",
            help="also accept changes from pages of this origin, e.g. https://box.lan when a TLS proxy serves the "
            "studio there; repeatable",
        )
        sp.add_argument(
            "--max-upload-mb",
            type=int,
            default=DEFAULT_MAX_UPLOAD_BYTES >> 20,
            help=f"largest dataset upload in MB (default {DEFAULT_MAX_UPLOAD_BYTES >> 20})",
        )
        sp.add_argument(
            "--max-row-kb",
            type=int,
            default=DEFAULT_MAX_ROW_BYTES >> 10,
            help=f"largest single row of an uploaded dataset in KB (default {DEFAULT_MAX_ROW_BYTES >> 10})",
        )
        sp.add_argument(
            "--max-pending",
            type=int,
            default=DEFAULT_MAX_PENDING,
            help=f"most fine-tunes queued or running that requests over HTTP may add (default {DEFAULT_MAX_PENDING})",
        )
        sp.add_argument(
            "--slots",
            type=int,
            help="training slots: how many tasks without a GPU train at once (default 1; remembered in the home "
            "until changed)",
        )
        sp.add_argument("--certfile", help="serve HTTPS with this certificate (PEM); needs --keyfile")
        sp.add_argument("--keyfile", help="the private key of --certfile (PEM)")

    sp = add("studio", cmd_studio, "start, stop, restart or check the studio server (training is never touched)")
    sp.add_argument(
        "action",
        choices=["start", "stop", "restart", "status", "serve", "token", "url"],
        help="token: print the token that every API request needs; url: print the login URL of the running studio",
    )
    server_flags(sp)
    sp.add_argument(
        "--executor",
        choices=["local", "slurm"],
        help="where new fine-tunes run: this machine (default) or Slurm jobs; remembered in the home until changed",
    )
    sp.add_argument("--partition", help="Slurm partition for the jobs (with --executor slurm; `sinfo` lists them)")
    sp.add_argument("--account", default="", help="Slurm account to charge (sbatch --account)")
    sp.add_argument("--qos", default="", help="Slurm quality of service (sbatch --qos)")
    sp.add_argument("--time", default="", help="each job's time limit, e.g. 24:00:00 (default: the partition's)")
    sp.add_argument(
        "--slurm-host", default="", help="run Slurm's commands on this login node over ssh (your ssh config and keys)"
    )
    sp.add_argument(
        "--slurm-signal",
        default="B:USR1@120",
        help="what Slurm sends the job's runner before its time limit or a preemption (sbatch --signal: B: and "
        "USR1, TERM or INT, @ seconds before; default B:USR1@120; B:USR1@0: no warning)",
    )
    sp.add_argument(
        "--sbatch-option",
        action="append",
        default=[],
        metavar="--FLAG=VALUE",
        help="another sbatch option for every job, from a known-safe list, written with = "
        "(--sbatch-option=--constraint=a100); repeatable",
    )
    sp.add_argument("--json", action="store_true", help="machine-readable output (status)")

    sp = add("submit", cmd_submit, "submit a fine-tune; prints the task id")
    for flag, _path, typ, help_ in SUBMIT_FLAGS:
        sp.add_argument(flag, type=typ, help=help_)
    sp.add_argument(
        "--no-auto-resume",
        action="store_true",
        help="after a crash, reboot or shutdown, wait for `ftstudio retry` instead of resuming by itself",
    )
    sp.add_argument(
        "--share-gpu", action="store_true", help="share GPUs with other tasks that share (default: one task per GPU)"
    )
    sp.add_argument("--name", help="a name to recognise the task by")
    sp.add_argument("--config", help="a JSON file with the training config (flags override it)")
    sp.add_argument("--set", action="append", metavar="FIELD=VALUE", help="any config field, e.g. --set lora.alpha=32")
    sp.add_argument("--wait", action="store_true", help="follow the task to its end (progress bar on a terminal)")
    sp.add_argument("--json", action="store_true", help="print the task as JSON")

    sp = add("tasks", cmd_tasks, "list tasks, newest first")
    sp.add_argument("--status", help="only tasks in this status")
    sp.add_argument("--limit", type=int, default=50)
    sp.add_argument("--offset", type=int, default=0)
    sp.add_argument("--json", action="store_true", help="machine-readable output")

    for name, func, help_ in (
        ("show", cmd_show, "show one task"),
        (
            "pause",
            cmd_pause,
            "pause a task: it saves a checkpoint at its next step and stops, freeing its slot or GPUs",
        ),
        ("resume", cmd_resume, "resume a paused task: back into the queue, continuing from its checkpoint"),
        ("retry", cmd_retry, "run a failed or cancelled task again as a new attempt, from its newest checkpoint"),
        ("extend", cmd_extend, "train a completed task further (--epochs N or --steps N more) as a new attempt"),
        ("history", cmd_history, "a task's attempts and every status it went through, with why"),
        ("cancel", cmd_cancel, "cancel a task: stops its training process and everything it started"),
        ("delete", cmd_delete, "delete a finished task and its files"),
    ):
        sp = add(name, func, help_)
        sp.add_argument("task", help="task id")
        if name in ("show", "history"):
            sp.add_argument("--json", action="store_true", help="machine-readable output")
        if name == "pause":
            sp.add_argument(
                "--freeze",
                action="store_true",
                help="stop the process where it is (SIGSTOP): instant, but its memory and GPUs stay held; "
                "single-process runs only",
            )
        if name == "extend":
            sp.add_argument("--epochs", type=float, help="train this many more epochs")
            sp.add_argument("--steps", type=int, help="train this many more steps (tasks bounded by max_steps)")

    sp = add("queue", cmd_queue, "what is running, what waits and for what, in the order it will start")
    sp.add_argument("--json", action="store_true", help="machine-readable output")

    sp = add("logs", cmd_logs, "print a task's training.log")
    sp.add_argument("task", help="task id")
    sp.add_argument("-f", "--follow", action="store_true", help="keep printing until the task ends")

    sp = add("train", cmd_train, "run a spec in the foreground (debugging; no studio involved)")
    sp.add_argument("spec", help="spec.json of a task, or a TrainingConfig JSON file")
    sp.add_argument("--output", help="output directory when SPEC is a bare config")

    sp = add("demo", cmd_demo, "start the studio and a demo fine-tune of builtin:tiny on builtin:sample")
    server_flags(sp)
    sp.add_argument("--wait", action="store_true", help="follow the demo to its end even without a terminal")
    sp.add_argument("--no-wait", action="store_true", help="return at once")

    sp = add("merge", cmd_merge, "write base model + adapter merged into one model (safetensors)")
    sp.add_argument("task", help="a completed task")
    sp.add_argument("--out", help="output directory (default: TASK_DIR/merged)")

    sp = add(
        "export", cmd_export, "write a completed task's result to a folder that stands on its own, with a model card"
    )
    sp.add_argument("task", help="a completed task")
    sp.add_argument(
        "--format",
        choices=["adapter", "merged"],
        default="adapter",
        help="adapter: the LoRA adapter (peft, vLLM); merged: base + adapter in one model (transformers, Ollama)",
    )
    sp.add_argument("--out", help="a new folder (default: ./NAME-FORMAT); an existing one is refused")

    sp = add("chat", cmd_chat, "chat with a task's adapter (or a checkpoint) in the terminal, replies streamed")
    sp.add_argument("task", help="a task with an adapter, or a checkpoint (paused, interrupted, failed)")
    sp.add_argument("--checkpoint", help="answer with this checkpoint, e.g. checkpoint-400 (default: the adapter)")
    sp.add_argument("--system", help="a system prompt")
    sp.add_argument("--temperature", type=float, default=0.7, help="0 answers the same way every time (default 0.7)")
    sp.add_argument("--top-p", type=float, default=0.9)
    sp.add_argument("--max-new-tokens", type=int, default=256)
    sp.add_argument("--compare", action="store_true", help="the base model answers too, after the adapter")
    sp.add_argument(
        "--beside-training",
        action="store_true",
        help="answer even while training holds every GPU and slot, with the CPU time it leaves idle "
        "(training slows some); without it such a message is refused",
    )

    sp = add("generate", cmd_generate, "generate text with base model + a task's adapter")
    sp.add_argument("task", help="a completed task")
    sp.add_argument("--prompt", required=True)
    sp.add_argument("--max-new-tokens", type=int, default=64)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except FtstudioError as e:
        # Messages quote what was sent (a name, a path): it must reach the terminal as text.
        print(f"error: {printable(e)}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
