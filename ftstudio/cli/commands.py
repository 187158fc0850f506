"""One function per `ftstudio` command: the parsed flags, a call to the service, what it printed.

The service is the one API that the HTTP routes call too (`ftstudio.studio.service`), so read commands
work while the studio is down; the studio server itself is started and stopped by `web.daemon`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ftstudio.cli.parser import SUBMIT_FLAGS
from ftstudio.config import set_path
from ftstudio.errors import NotRunning, UserError, ValidationError
from ftstudio.home import Home
from ftstudio.studio.task import TaskStatus
from ftstudio.text import last_redraw, printable, printable_log
from ftstudio.web import daemon as studio_mod
from ftstudio.web.auth import binds_beyond_loopback, load_or_create_token

if TYPE_CHECKING:
    from ftstudio.studio.service import Service


def open_service() -> Service:
    """The service on the home: the same one the studio serves, opened by this command alone."""
    # Imported here: `ftstudio --help` and `studio status` need none of the core.
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


def read_config(path: str | None) -> dict[str, Any]:
    """--config FILE: the training config's JSON, or an empty one."""
    if not path:
        return {}
    try:
        config = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ValidationError(f"--config: cannot read {path}: {e}") from None
    if not isinstance(config, dict):
        raise ValidationError(f'--config: {path} holds no JSON object; write the config as {{"model": ...}}')
    return config


def apply_sets(config: dict[str, Any], items: list[str] | None) -> None:
    """--set section.field=value, each in turn."""
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValidationError(f"--set: expected section.field=value, got {item!r}")
        set_path(config, key.strip(), _parse_value(value))


def cmd_submit(args: argparse.Namespace) -> int:
    config = read_config(args.config)
    for flag, path, _typ, _help in SUBMIT_FLAGS:
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if value is not None:
            set_path(config, path, value)
    if args.share_gpu:
        set_path(config, "resources.share_gpu", True)
    if args.no_auto_resume:
        set_path(config, "resume.auto", False)
    if args.reward:
        set_path(config, "rewards", list(args.reward))  # each as written: a pattern may hold a comma
    if args.auto_batch:
        set_path(config, "optim.auto_batch", True)
    apply_sets(config, args.set)
    service = open_service()
    if args.dry_run:
        checked = service.dry_run(config, trusted=True)
        if args.json:
            _print_json(checked)
        else:
            memory = checked["memory"]
            print("the settings pass every check; nothing was submitted")
            print(
                f"memory: {memory['line']}"
                if memory
                else "memory: not estimated: the model's config.json is not on this machine to count from"
            )
        return 0 if checked["memory"] is None or checked["memory"]["fits"] else 1
    task = service.submit(config, args.name, trusted=True, strict=args.strict)
    view = service.task_json(task)
    if args.json:
        _print_json(view)
    else:
        print(task.id)
        if view.get("time_estimate"):
            print(f"estimate: {printable(view['time_estimate']['line'])}", file=sys.stderr)
        for w in view["warnings"]:
            print(f"warning: {printable(w['message'])} (`ftstudio data inspect` shows the rows; --strict refuses)",
                  file=sys.stderr)  # fmt: skip
    if args.wait:
        return _wait(service, task.id, quiet=args.json)
    return 0


def _parse_value(text: str) -> Any:
    """`--set lora.target_modules=q_proj,v_proj` or `--set optim.seed=7`: JSON if it parses, else the text."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def _wait(service: Service, task_id: str, *, quiet: bool = False) -> int:
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
    service = open_service()
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
    q = open_service().queue()
    if args.json:
        _print_json(q)
        return 0
    gpus = ", ".join(map(str, q["gpus"])) or "none"
    print(f"training slots {q['slots']} (for tasks without a GPU; studio start --slots N), GPUs {gpus}")
    if not q["running"] and not q["waiting"] and not q["chats"] and not q["exports"]:
        print("nothing running or waiting")
        return 0
    for t in q["running"]:
        print(f"  running  {t['id']:<22} {', '.join(t['resources']) or '-':<12} {printable(t['name'])}")
    for c in q["chats"]:
        who = f"chat with task {c['task']}" if c["task"] else "chat"
        print(f"  chat     pid {c['pid']:<18} {printable(c['device'])}: {who}")
    for e in q["exports"]:
        print(f"  export   {e['task']:<22} {e['quant']:<12} {e['status']}: {printable(e['progress'] or '')}")
    for t in q["waiting"]:
        prio = f" priority {t['priority']}" if t["priority"] else ""
        print(f"  #{t['position']:<7} {t['id']:<22} {printable(t['reason'])}{prio}")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    service = open_service()
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
    if view.get("resumes"):
        at = time.strftime("%H:%M:%S", time.localtime(view["resumes"]["at"]))
        print(
            f"{'waiting':<10} the machine stopped {view['resumes']['stalled']} attempts in a row before they progressed;"
            f" the next starts by itself at {at} (not counted against the restart budget)"
        )
    causes = [a.get("end_cause") for a in view.get("attempts") or []]
    if "machine" in causes or "run" in causes:
        budget = (view.get("config") or {}).get("resume", {}).get("max_restarts", 3)
        print(
            f"{'stopped':<10} {causes.count('machine')} time(s) by the machine (a reboot, a shutdown, a preemption:"
            f" never counted), {causes.count('run')} by the run itself ({view.get('restarts') or 0} of"
            f" {budget} automatic restarts used)"
        )
    timing = view.get("time_estimate")
    if timing and timing.get("line"):
        print(f"{'estimate':<10} {printable(timing['line'])}")
        if timing.get("line_measured"):
            print(f"{'':<10} {printable(timing['line_measured'])}")
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    """training.log as text (`printable_log`): always, not only on a terminal, since the log holds what
    datasets and model repositories print, and a pipe into `less -R` or a file shown later reaches a
    terminal all the same. The bytes as written stay in TASK_DIR/training.log."""
    service = open_service()
    offset, partial = 0, ""
    while True:
        chunk = service.logs(args.task, offset)
        # Whole lines only: a line still being written (a progress bar between redraws) waits for its end.
        lines, newline, partial = (partial + chunk["text"]).rpartition("\n")
        if newline:
            sys.stdout.write(printable_log(lines) + "\n")
            sys.stdout.flush()
        partial = last_redraw(partial)
        offset = chunk["next_offset"]
        if chunk["next_offset"] < chunk["size"]:
            continue
        if not args.follow or service.get(args.task).status.is_final:
            sys.stdout.write(printable_log(partial))  # the last line, unended, as the log has it
            return 0
        time.sleep(0.5)


def cmd_cancel(args: argparse.Namespace) -> int:
    service = open_service()
    task = service.cancel(args.task)
    print(f"task {task.id} {task.status}")
    return 0


def cmd_pause(args: argparse.Namespace) -> int:
    task = open_service().pause(args.task, freeze=args.freeze)
    if task.status == TaskStatus.PAUSED:
        print(f"task {task.id} paused ({task.phase or 'held'})")
    else:
        print(f"task {task.id} pausing: it saves a checkpoint at its next step, then stops (ftstudio show {task.id})")
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    task = open_service().resume(args.task)
    print(f"task {task.id} {task.status} (attempt {task.attempt})")
    return 0


def cmd_retry(args: argparse.Namespace) -> int:
    task = open_service().retry(args.task)
    print(f"task {task.id} {task.status} (attempt {task.attempt})")
    return 0


def cmd_extend(args: argparse.Namespace) -> int:
    task = open_service().extend(args.task, epochs=args.epochs, steps=args.steps)
    print(f"task {task.id} {task.status} (attempt {task.attempt})")
    return 0


CAUSES = {
    "machine": " (stopped by the machine: not counted against resume.max_restarts)",
    "run": " (stopped by the run itself: counted against resume.max_restarts)",
}


def cmd_history(args: argparse.Namespace) -> int:
    history = open_service().history(args.task)
    if args.json:
        _print_json(history)
        return 0
    for a in history["attempts"]:
        start = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(a["started_at"])) if a["started_at"] else "-"
        end = f"ended after {_fmt_duration(a['ended_at'] - a['started_at'])}" if a["ended_at"] else "running"
        resumed = f", resumed from step {a['resumed_from_step']}" if a["resumed_from_step"] else ""
        why = f": {printable(a['end_reason'])}" if a["end_reason"] else ""
        by = CAUSES.get(a.get("end_cause") or "", "")
        print(f"attempt {a['attempt']}  started {start}{resumed}, {end}{by}{why}")
    for t in history["transitions"]:
        stamp = time.strftime("%H:%M:%S", time.localtime(t["ts"]))
        print(f"  {stamp}  {t['src'] or '-':>11} -> {t['dst']:<11} {printable(t['reason'] or '')}")
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    open_service().delete(args.task)
    print(f"task {args.task} deleted")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    # No studio, no home: the trainer itself in this process, by the entry point every task's train.py calls.
    from ftstudio import train

    return train.main([args.spec, *(["--output", args.output] if args.output else [])])


def cmd_demo(args: argparse.Namespace) -> int:
    home = Home.default()
    info = studio_mod.start(home, _server_options(args))
    service = open_service()
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
            open_service().set_slots(options.slots)
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
    if args.action == "repair":
        running = studio_mod.running_server(home)
        if running is not None:
            raise UserError(
                f"the studio is running (pid {running.pid}); stop it first with `ftstudio studio stop` (training "
                "keeps running). A start re-indexes the folders studio.db does not know by itself"
            )
        from ftstudio.studio.service import Service as TheService  # imported here, as in open_service

        done = TheService.repair(home)
        if done["moved_aside"]:
            print(f"studio.db could not be opened: moved aside to {done['moved_aside']}")
        print(f"rebuilt {len(done['rebuilt'])} task(s) from their folders; the index holds {done['tasks']}")
        for line in done["skipped"]:
            print(f"left out: {printable(line)}")
        return 0
    if args.action == "backup":
        if not args.dir:
            raise UserError("studio backup needs a folder: `ftstudio studio backup DIR` writes DIR/studio.db")
        made = open_service().backup(Path(args.dir))
        print(f"backed up {made['tasks']} task(s) to {made['path']} ({made['bytes'] / 1e6:.1f} MB)")
        return 0
    if args.action == "url":
        running = studio_mod.running_server(home)
        if running is None:
            raise NotRunning("the studio is not running; start it with `ftstudio studio start` (it prints the URL)")
        print(running.login_url(load_or_create_token(home)))
        return 0
    st = studio_mod.status(home)
    if home.db.exists():
        st["executor"] = open_service().executor_state()
    if args.json:
        _print_json(st)
    else:
        if st["running"]:
            up = _fmt_duration(st["uptime_s"])
            print(f"studio running at {st['url']} (pid {st['pid']}, up {up}), home {st['home']}")
        else:
            print(f"studio is not running (home {st['home']}); start it with `ftstudio studio start`")
        for line in executor_lines(st.get("executor")):
            print(line)
    return 0 if st["running"] or args.action != "status" else 3


def executor_lines(state: dict[str, Any] | None) -> list[str]:
    """Where new fine-tunes go, and the check of changed Slurm settings: pending, or how the last one went."""
    if not state:
        return []
    where = f"Slurm partition {state.get('partition')}" if state.get("kind") == "slurm" else "this machine"
    lines = [f"new fine-tunes: {where}"]
    pending = state.get("pending")
    if pending:
        since = time.strftime("%H:%M", time.localtime(pending.get("since") or 0))
        meanwhile = (
            "they wait in the queue until it passes" if state.get("held") else f"they go to {where} until it passes"
        )
        lines.append(
            f"Slurm partition {pending.get('partition')}: its check job has been waiting since {since}; {meanwhile}"
        )
    check = state.get("last_check")
    if check and not pending:
        at = time.strftime("%Y-%m-%d %H:%M", time.localtime(check.get("at") or 0))
        said = "passed" if check.get("passed") else "failed, nothing changed"
        lines.append(f"last Slurm check ({at}): {said}: {printable(str(check.get('line') or ''))}")
    return lines


def _use_executor(args: argparse.Namespace) -> None:
    """--executor and Slurm's flags: checked against the cluster, then remembered in the home."""
    slurm = {
        "partition": args.partition or "",
        "account": args.account,
        "qos": args.qos,
        "time": args.time,
        "host": args.slurm_host,
        "signal": args.slurm_signal,
        "extra": tuple(args.sbatch_option),
    }
    print(open_service().use_executor(args.executor, slurm if args.executor == "slurm" else None))


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
    print(open_service().merge(args.task, Path(args.out) if args.out else None))
    return 0


def data_config(args: argparse.Namespace) -> dict[str, Any]:
    """A config holding what `data inspect` was asked: --config and --set, then the flags, as on submit."""
    config = read_config(args.config)
    apply_sets(config, args.set)
    set_path(config, "data.path", args.path)
    for value, path in (
        (args.model, "model.name"),
        (args.method, "method"),
        (args.format, "data.format"),
        (args.max_length, "data.max_length"),
        (args.validation or None, "data.validation"),
        (args.eval_prompts or None, "evaluation.prompts"),
    ):
        if value is not None:
            set_path(config, path, value)
    return config


def cmd_data(args: argparse.Namespace) -> int:
    service = open_service()
    config = data_config(args)
    report = service.inspect_data(config, trusted=True, view_rows=max(args.rows, 0))
    if args.measure_again:
        args.estimate = True
    if args.estimate and not args.json:
        for line in inspection_lines(report, args.rows):
            print(line)
        model = report["model"]
        print(f"timing a few training steps of {printable(model)} here ...", flush=True)
    try:
        timing = service.time_estimate(
            config, trusted=True, start=args.estimate, wait=args.estimate, again=args.measure_again
        )
    except UserError as e:
        if args.estimate:
            raise
        timing = {"state": "unsupported", "message": f"no time estimate: {e}"}
    code = 1 if args.estimate and timing["state"] != "done" else 0
    if args.json:
        _print_json({**report, "time_estimate": timing})
        return code
    if not args.estimate:
        for line in inspection_lines(report, args.rows):
            print(line)
    print(timing_line(timing, report["model"]))
    return code


def timing_line(timing: dict[str, Any], model: str) -> str:
    state = timing["state"]
    if state == "done":
        return printable(timing["line"])
    if state == "failed":
        return f"time per epoch: {printable(timing['message'])}"
    if state == "running":
        return "time per epoch: being measured (another command or the page asked); ask again in a minute"
    if state == "unsupported":
        return f"time per epoch: {printable(timing['message'])}"
    return (
        f"time per epoch: not measured for these settings; add --estimate to time "
        f"{timing.get('steps', 'a few')} training steps of {printable(model)} here"
    )


def inspection_lines(r: dict[str, Any], rows: int) -> list[str]:
    """The report as a person reads it in a terminal; trained tokens are marked [+like this+]."""
    name = Path(r["path"]).name
    t, d, lengths = r["truncation"], r["duplicates"], r["lengths"]
    out = [
        f"{name}: {r['format']}, {r['rows']:,} rows ({r['usable_rows']:,} usable, {r['skipped_rows']:,} skipped), "
        f"for {r['method']} with {r['model']}'s tokenizer at max_length {r['max_length']:,}",
    ]
    out += [f"  skipped: {printable(p)}" for p in r["problems"][:3]]
    for part in ("prompt", "response", "total"):
        f = lengths[part]
        out.append(
            f"  {part + ' tokens':<16} median {f['median']:,}, 95th percentile {f['p95']:,}, longest {f['max']:,}"
        )
    out.append(
        f"truncation: {t['rows']:,} rows exceed max_length, {t['whole_response_lost']:,} of them lose their whole "
        f"response; {t['response_tokens_lost']:,} of {t['response_tokens']:,} response tokens lost "
        f"({t['share_lost'] * 100:.1f}%)"
    )
    out.append(
        f"duplicates: {d['exact']:,} exact, {d['near']:,} near (among the first {d['compared_for_near']:,} distinct rows)"
    )
    out += [f"  {printable(e['row'])} = {printable(e['same_as'])}" for e in d["exact_examples"][:3]]
    out += [f"  {printable(e['row'])} ~ {printable(e['like'])}" for e in d["near_examples"][:3]]
    for kind, leak in r["leakage"].items():
        what = "held-out prompts" if kind == "held_out" else "validation rows"
        out.append(f"leakage: {leak['leaked']:,} of {leak['rows']:,} {what} appear in the training rows")
        out += [
            f"  {printable(e['row'])} {'=' if e['exact'] else '~'} {printable(e['training_row'])}"
            for e in leak["examples"][:3]
        ]
    out.append(f"cost: {r['cost']['tokens_per_epoch']:,} tokens per epoch")
    out += [f"warning: {printable(w['message'])}" for w in r["warnings"]]
    for row in r["view"][:rows]:
        text = "".join(
            f"[+{run['text']}+]" if run["trained"] else run["text"] for run in row["runs"] if not run.get("dropped")
        )
        cut = f" ... {row['dropped_tokens']} tokens cut by max_length" if row["dropped_tokens"] else ""
        out.append(f"--- {printable(row['where'])} (trained tokens in [+ +]){cut}\n{printable_log(text)}")
    return out


def cmd_export(args: argparse.Namespace) -> int:
    if args.quant and args.format != "gguf":
        raise ValidationError(f"--quant is for --format gguf; --format {args.format} has no quantization")
    out = Path(args.out) if args.out else None
    print(open_service().export(args.task, args.format, out, quant=args.quant or "q4_k_m"))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    print(open_service().generate(args.task, args.prompt, max_new_tokens=args.max_new_tokens))
    return 0
