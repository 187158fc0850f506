"""Text from people and from training processes, made safe to keep and to print.

A task name is shown in terminals (`ftstudio tasks`), in studio.log and on the
page. Control characters in it are commands to a terminal, not text: ESC starts
sequences that recolour, retitle or (OSC 52) write to the clipboard, and bidi
overrides make text read differently from what it is. Names lose them when
submitted (`plain`); everything the CLI and studio.log print from user data
shows them escaped (`printable`), so nothing sent to the studio reaches a
terminal as a command.
"""

from __future__ import annotations

import re

# C0, DEL and C1 (unicodedata category Cc), and the bidi embeddings, overrides and isolates.
CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def plain(text: str) -> str:
    """`text` without control characters (for names, which are kept and shown everywhere)."""
    return CONTROL.sub("", text)


def printable(text: object) -> str:
    """`str(text)` with each control character written as an escape (`\\x1b`), on one line."""
    return CONTROL.sub(_escape, str(text))


def _escape(m: re.Match[str]) -> str:
    code = ord(m.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"
