"""`ftstudio chat`: a conversation in the terminal, through the same worker and code as the page's chat."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from typing import Any, Protocol

from ftstudio.cli.commands import open_service
from ftstudio.errors import Conflict
from ftstudio.text import printable

CHAT_HELP = (
    "/reset starts the conversation over; /beside answers even while training holds the machine; "
    "/quit or Ctrl-D ends it; Ctrl-C stops a reply"
)


class Reply(Protocol):
    """A reply as the service streams it (chat.process.ChatReply): its events, and a way to stop it."""

    def __iter__(self) -> Iterator[dict[str, Any]]: ...

    def cancel(self) -> None: ...


def cmd_chat(args: argparse.Namespace) -> int:
    """An interactive chat in the terminal, through the same worker and code as the page's chat."""
    service = open_service()
    task = service.get(args.task)
    weights = service.chat_weights(task.id, args.checkpoint or "")
    what = "its adapter" if weights == "adapter" else weights.replace("-", " ")
    print(f"chatting with {task.name} ({task.id}), {what}. {CHAT_HELP}", file=sys.stderr, flush=True)
    history: list[dict[str, str]] = []
    settings: dict[str, Any] = {
        "system": args.system or "",
        "temperature": args.temperature,
        "top_p": args.top_p,
        "max_new_tokens": args.max_new_tokens,
        "compare": args.compare,
        "checkpoint": weights if weights != "adapter" else "",
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
            try:
                events = service.chat_message(
                    task.id, {**settings, "messages": [*history, {"role": "user", "content": line}]}
                )
            except Conflict as e:  # training holds the machine, or the last reply is still stopping
                print(f"error: {printable(e)}", file=sys.stderr, flush=True)
                continue
            reply = _chat_reply(events)
            if reply is not None:
                history += [{"role": "user", "content": line}, {"role": "assistant", "content": reply}]
    finally:
        service.close_chat()


def _chat_reply(events: Reply) -> str | None:
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
