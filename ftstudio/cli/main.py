"""`ftstudio`: the command line. Thin: the parser (parser.py) reads the command, one function
(commands.py, chat.py) calls the service that the HTTP routes call too, and `main` turns what
went wrong into a one-line message and an exit code, here and nowhere else."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from ftstudio.cli import commands
from ftstudio.cli.chat import cmd_chat
from ftstudio.cli.parser import build_parser
from ftstudio.errors import FtstudioError
from ftstudio.home import keep_private
from ftstudio.text import printable

# The exit status a shell shows for a program that SIGPIPE ended (128 + 13), as `yes | head` gives.
BROKEN_PIPE = 141

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "studio": commands.cmd_studio,
    "submit": commands.cmd_submit,
    "tasks": commands.cmd_tasks,
    "show": commands.cmd_show,
    "pause": commands.cmd_pause,
    "resume": commands.cmd_resume,
    "retry": commands.cmd_retry,
    "extend": commands.cmd_extend,
    "history": commands.cmd_history,
    "cancel": commands.cmd_cancel,
    "delete": commands.cmd_delete,
    "queue": commands.cmd_queue,
    "logs": commands.cmd_logs,
    "train": commands.cmd_train,
    "demo": commands.cmd_demo,
    "merge": commands.cmd_merge,
    "export": commands.cmd_export,
    "data": commands.cmd_data,
    "chat": cmd_chat,
    "generate": commands.cmd_generate,
}


def main(argv: list[str] | None = None) -> int:
    keep_private()  # the studio it may start, and every file a command writes into the home
    args = build_parser().parse_args(argv)
    try:
        code = int(COMMANDS[args.command](args) or 0)
        sys.stdout.flush()  # now, while a reader that went away can still be answered quietly
        return code
    except BrokenPipeError:
        # The reader stopped early (`| head`, `| grep -m1`, `q` in less): not an error, and no traceback.
        # Whatever is still buffered would fail again when Python flushes stdout at exit: send it nowhere.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return BROKEN_PIPE
    except FtstudioError as e:
        # Messages quote what was sent (a name, a path): it must reach the terminal as text.
        print(f"error: {printable(e)}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
