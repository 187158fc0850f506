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


# A CSI sequence (ESC [ parameters final-byte): colour, cursor moves, line clears. Layout, never text.
CSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]")
# Every control character but the tab, which moves the cursor right and nothing else.
CONTROL_BUT_TAB = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def last_redraw(line: str) -> str:
    """What a terminal shows last of a line redrawn with carriage returns (a progress bar): the text after
    the last one. A carriage return that ends the line (CRLF, a bar's final redraw) is kept: the line may
    go on in text not read yet."""
    return line[line.rstrip("\r").rfind("\r") + 1 :]


def printable_log(text: str) -> str:
    """A process's output (training.log) as lines to print: each line's last redraw, its colour and cursor
    sequences dropped and every other control character escaped (`printable`); newlines and tabs kept."""
    return "\n".join(
        CONTROL_BUT_TAB.sub(_escape, last_redraw(CSI.sub("", line)).rstrip("\r")) for line in text.split("\n")
    )
