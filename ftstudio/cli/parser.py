"""The `ftstudio` command line's grammar: every command, flag and help text, argparse only.

`main.py` runs the command a parse names (`args.command`) and `doc.py` renders this parser as
docs/cli.md, so the page documents exactly what the parser accepts.
"""

from __future__ import annotations

import argparse

from ftstudio import __version__
from ftstudio.config import CLI_FLAGS
from ftstudio.studio.policy import DEFAULT_MAX_PENDING, DEFAULT_MAX_ROW_BYTES, DEFAULT_MAX_UPLOAD_BYTES
from ftstudio.web.daemon import DEFAULT_HOST, DEFAULT_PORT

# Flags of `submit` that map onto config fields: (flag, field path, type, help).
SUBMIT_FLAGS: list[tuple[str, str, type, str]] = [
    ("--model", "model.name", str, "base model: hub id, local directory or builtin:tiny"),
    ("--dataset", "data.path", str, "dataset: builtin:sample, builtin:preferences, an uploaded name or a file path"),
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
    (
        "--method",
        "method",
        str,
        "sft (default: instructions, conversations), pretrain (raw text, .txt files), dpo, orpo, kto "
        "(preference pairs; builtin:preferences unless --dataset), or grpo (prompts and --reward; builtin:math)",
    ),
    ("--beta", "preference.beta", float, "dpo, orpo, kto: how far from the starting model (default 0.1)"),
    ("--loss", "preference.loss", str, "dpo's variant: sigmoid (DPO, the default), ipo or simpo"),
    ("--adapter", "adapter", str, "lora (default), qlora (4-bit base, CUDA), dora, rslora, pissa, full or freeze"),
    ("--start-from", "model.start_from", str, "go on from a completed task's adapter (its id), e.g. SFT then DPO"),
    ("--kernels", "model.kernels", str, "none (default) or liger: fused GPU kernels, less memory (CUDA, liger-kernel)"),
    ("--optimizer", "optim.optimizer", str, "adamw (default), adamw_8bit or paged_adamw_8bit (CUDA, bitsandbytes)"),
]
assert all(CLI_FLAGS.get(path) == flag for flag, path, _, _ in SUBMIT_FLAGS)
assert CLI_FLAGS["resources.share_gpu"] == "--share-gpu"  # switches, added beside SUBMIT_FLAGS
assert CLI_FLAGS["resume.auto"] == "--no-auto-resume"
assert CLI_FLAGS["rewards"] == "--reward"  # repeatable, added beside SUBMIT_FLAGS
assert CLI_FLAGS["optim.auto_batch"] == "--auto-batch"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ftstudio", description="Fine-tunes that survive restarts.")
    p.add_argument("--version", action="version", version=f"ftstudio {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, summary: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=summary, description=summary)

    def server_flags(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--host", default=DEFAULT_HOST, help="address to bind (default 127.0.0.1)")
        sp.add_argument("--port", type=int, default=DEFAULT_PORT, help="port (default 8765)")
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

    sp = add("studio", "start, stop, restart or check the studio server (training is never touched)")
    sp.add_argument(
        "action",
        choices=["start", "stop", "restart", "status", "serve", "token", "url", "backup", "repair"],
        help="token: print the token that every API request needs; url: print the login URL of the running studio; "
        "backup DIR: a consistent copy of the task index (studio.db) in DIR, safe while tasks train; "
        "repair: rebuild the index from the task folders (a damaged studio.db is moved aside first)",
    )
    sp.add_argument("dir", nargs="?", help="backup: the folder to write studio.db into (it must not hold one yet)")
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

    sp = add("submit", "submit a fine-tune; prints the task id")
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
    sp.add_argument(
        "--reward",
        action="append",
        metavar="NAME[:ARG]",
        help="grpo: a reward function, repeatable: exact, numeric, regex:PATTERN, length:TOKENS, json, or "
        "python:PATH:FUNC (your own; numeric unless given)",
    )
    sp.add_argument(
        "--auto-batch",
        action="store_true",
        help="out of memory: split batches in halves (same effective batch and curve) instead of failing",
    )
    sp.add_argument(
        "--strict",
        action="store_true",
        help="refuse the fine-tune when its data warns (over 5%% of the response tokens cut by max_length, "
        "held-out prompts found in the training rows) instead of recording the warning with it",
    )
    sp.add_argument(
        "--dry-run",
        action="store_true",
        help="check everything and print the memory estimate; submit nothing",
    )
    sp.add_argument("--name", help="a name to recognise the task by")
    sp.add_argument("--config", help="a JSON file with the training config (flags override it)")
    sp.add_argument("--set", action="append", metavar="FIELD=VALUE", help="any config field, e.g. --set lora.alpha=32")
    sp.add_argument("--wait", action="store_true", help="follow the task to its end (progress bar on a terminal)")
    sp.add_argument("--json", action="store_true", help="print the task as JSON")

    sp = add("tasks", "list tasks, newest first")
    sp.add_argument("--status", help="only tasks in this status")
    sp.add_argument("--limit", type=int, default=50)
    sp.add_argument("--offset", type=int, default=0)
    sp.add_argument("--json", action="store_true", help="machine-readable output")

    for name, help_ in (
        ("show", "show one task"),
        (
            "pause",
            "pause a task: it saves a checkpoint at its next step and stops, freeing its slot or GPUs",
        ),
        ("resume", "resume a paused task: back into the queue, continuing from its checkpoint"),
        ("retry", "run a failed or cancelled task again as a new attempt, from its newest checkpoint"),
        ("extend", "train a completed task further (--epochs N or --steps N more) as a new attempt"),
        ("history", "a task's attempts and every status it went through, with why"),
        ("cancel", "cancel a task: stops its training process and everything it started"),
        ("delete", "delete a finished task and its files"),
    ):
        sp = add(name, help_)
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

    sp = add("queue", "what is running, what waits and for what, in the order it will start")
    sp.add_argument("--json", action="store_true", help="machine-readable output")

    sp = add(
        "logs",
        "print a task's training.log as text: control characters escaped, colours dropped, a progress bar at its last state",
    )
    sp.add_argument("task", help="task id")
    sp.add_argument("-f", "--follow", action="store_true", help="keep printing until the task ends")

    sp = add("train", "run a spec in the foreground (debugging; no studio involved)")
    sp.add_argument("spec", help="spec.json of a task, or a TrainingConfig JSON file")
    sp.add_argument("--output", help="output directory when SPEC is a bare config")

    sp = add("demo", "start the studio and a demo fine-tune of builtin:tiny on builtin:sample")
    server_flags(sp)
    sp.add_argument("--wait", action="store_true", help="follow the demo to its end even without a terminal")
    sp.add_argument("--no-wait", action="store_true", help="return at once")

    sp = add("merge", "write base model + adapter merged into one model (safetensors)")
    sp.add_argument("task", help="a completed task")
    sp.add_argument("--out", help="output directory (default: TASK_DIR/merged)")

    sp = add("export", "write a completed task's result to a folder that stands on its own, with a model card")
    sp.add_argument("task", help="a completed task")
    sp.add_argument(
        "--format",
        choices=["adapter", "merged", "gguf"],
        default="adapter",
        help="adapter: the LoRA adapter (peft, vLLM); merged: base + adapter in one model (transformers); "
        "gguf: one file for llama.cpp, Ollama and LM Studio, with a Modelfile (needs `make gguf` once)",
    )
    sp.add_argument(
        "--quant",
        choices=["f16", "q8_0", "q4_k_m"],
        help="with --format gguf: f16 (as trained), q8_0 (half of that) or q4_k_m (a third; the default)",
    )
    sp.add_argument("--out", help="a new folder (default: ./NAME-FORMAT); an existing one is refused")

    sp = add("data", "see what a model will learn from a dataset: the rows as trained, lengths, duplicates, leakage")
    sp.add_argument("action", choices=["inspect"], help="inspect: the report (nothing is changed)")
    sp.add_argument("path", help="a dataset file or folder, an uploaded dataset's name, or builtin:sample")
    sp.add_argument("--model", help="whose tokenizer and chat template, as on submit (default builtin:tiny)")
    sp.add_argument("--max-length", type=int, help="data.max_length, as on submit (default: the config's)")
    sp.add_argument("--method", help="sft, pretrain, dpo, orpo, kto or grpo, as on submit (default sft)")
    sp.add_argument("--format", help="the data shape, as on submit (default: detected)")
    sp.add_argument("--eval-prompts", default="", help="held-out prompts to look for among the training rows")
    sp.add_argument("--validation", default="", help="a validation file to look for among the training rows")
    sp.add_argument("--rows", type=int, default=3, help="rows of the training view to print (default 3)")
    sp.add_argument("--config", help="a JSON file with the training config, as on submit (the flags override it)")
    sp.add_argument(
        "--set", action="append", metavar="FIELD=VALUE", help="any config field, e.g. --set optim.batch_size=8"
    )
    sp.add_argument(
        "--estimate",
        action="store_true",
        help="time a few training steps of the model at these settings here, for the time per epoch "
        "(kept per model and settings; a submit with the same settings records it)",
    )
    sp.add_argument(
        "--measure-again",
        action="store_true",
        help="like --estimate, but time the steps anew even when these settings were measured already "
        "(say, while other fine-tunes slowed the machine)",
    )
    sp.add_argument("--json", action="store_true", help="the whole report as JSON")

    sp = add("chat", "chat with a task's adapter (or a checkpoint) in the terminal, replies streamed")
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

    sp = add("generate", "generate text with base model + a task's adapter")
    sp.add_argument("task", help="a completed task")
    sp.add_argument("--prompt", required=True)
    sp.add_argument("--max-new-tokens", type=int, default=64)
    return p
