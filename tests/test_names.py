"""Names are text, not terminal commands: control characters never reach a terminal or studio.log."""

import json
import logging

import pytest
from support import cli_json, in_memory, run_cli, wait_for

from ftstudio.home import Home
from ftstudio.studio.service import OneLineFormatter, Service
from ftstudio.text import last_redraw, plain, printable, printable_log

EVIL = "scripted steps=1 \x1b]0;pwned\x07\x1b[31mred\x9b2J\u202egnp.exe\x7f\x00 end"
CONTROL_BYTES = (b"\x1b", b"\x07", b"\x9b", "\x9b".encode(), "\u202e".encode(), b"\x7f", b"\x00")


def clean(output: str | bytes) -> bool:
    data = output.encode() if isinstance(output, str) else output
    return not any(c in data for c in CONTROL_BYTES)


def test_text_helpers():
    assert plain(EVIL) == "scripted steps=1 ]0;pwned[31mred2Jgnp.exe end"
    assert printable("a\x1b[31mb\u202ec\n") == "a\\x1b[31mb\\u202ec\\x0a"
    assert printable("naïve 日本語 العربية") == "naïve 日本語 العربية"


def test_a_log_prints_as_lines_of_text():
    bar = "Map:   0%|    | 0/8\rMap:  50%|##  | 4/8\rMap: 100%|####| 8/8\r"
    assert printable_log(f"{bar}\nnext\r\n") == "Map: 100%|####| 8/8\nnext\n"  # each line's last state
    assert printable_log("\x1b[1;31mred\x1b[0m\tcell") == "red\tcell"  # colour is layout; a tab is harmless
    assert printable_log(EVIL) == "scripted steps=1 \\x1b]0;pwned\\x07red\\x9b2J\\u202egnp.exe\\x7f\\x00 end"
    assert clean(printable_log(EVIL))
    # A line cut where the log was read so far keeps a carriage return at its end: more of it may follow.
    assert last_redraw("a\rb\rc") == "c" and last_redraw("a\rb\r") == "b\r" and last_redraw("plain") == "plain"


def test_a_name_loses_its_control_characters_at_submit(home):
    """In the in-memory executor (the real runner and trainer with this name: the CLI test below)."""
    service = in_memory(home)
    task = service.submit({"preset": "cpu-demo"}, EVIL)
    assert task.name == "scripted steps=1 ]0;pwned[31mred2Jgnp.exe end"
    assert json.loads((task.dir.spec).read_text())["name"] == task.name
    service.executor.runner(task.id).complete(steps=1)
    assert service.get(task.id).status == "completed"


@pytest.mark.process
def test_the_cli_and_studio_log_print_user_data_as_text(home):
    r = run_cli(home, "submit", "--preset", "cpu-demo", "--name", EVIL.replace("\x00", ""), scripted=True)
    assert r.returncode == 0, r.stderr
    task_id = r.stdout.strip()
    # A name stored before names were cleaned (or written by another tool) is escaped when printed.
    service = Service(Home(home))
    wait_for(lambda: service.get(task_id).status == "completed", what="completed")
    service.store._conn().execute("UPDATE tasks SET name = ?, error = ? WHERE id = ?", (EVIL, EVIL, task_id))
    for args in (["tasks"], ["show", task_id], ["show", "\x1b[2J"], ["cancel", "\x1b]0;x\x07"]):
        out = run_cli(home, *args, scripted=True)
        assert clean(out.stdout) and clean(out.stderr), (args, out.stdout, out.stderr)
    shown = run_cli(home, "show", task_id).stdout
    assert "\\x1b]0;pwned\\x07" in shown  # visible, so a person sees what was sent
    bad = run_cli(home, "submit", "--model", "/no/\x1b]52;c;ZWNobyBwd25lZA==\x07model", scripted=True)
    assert bad.returncode == 2 and clean(bad.stderr), bad.stderr
    log = (home / "studio.log").read_bytes()
    assert b"submitted" in log and clean(log), log[-500:]


def test_studio_log_lines_escape_what_they_quote():
    formatter = OneLineFormatter("%(levelname)s %(message)s")
    record = logging.LogRecord("ftstudio", logging.INFO, __file__, 1, "task %s: %s", ("t1", EVIL), None)
    line = formatter.format(record)
    assert clean(line) and "\\x1b]0;pwned\\x07" in line and "\n" not in line


@pytest.mark.process
def test_logs_print_the_trainers_output_as_text(home):
    task_id = run_cli(home, "submit", "--name", "scripted steps=1", scripted=True).stdout.strip()
    wait_for(lambda: cli_json(home, "show", task_id)["status"] == "completed", what="completed")
    log = Home(home).task(task_id).log
    with log.open("a") as f:
        # The progress bar below straddles the 64 KiB that `logs` reads at a time.
        f.write("x" * (65536 - log.stat().st_size - 20) + "\n")
        f.write("Map:   0%|          | 0/8\rMap:  50%|#####     | 4/8\rMap: 100%|##########| 8/8\n")
        f.write("\x1b[31mred\x1b[0m\tcell\r\n")
        f.write(f"{EVIL}\n")
        f.write("half a line")
    out = run_cli(home, "logs", task_id).stdout
    assert clean(out) and "\r" not in out, out[-500:]
    assert "\nMap: 100%|##########| 8/8\n" in out and "50%" not in out and " 0%" not in out
    assert "training completed" in out and "\nred\tcell\n" in out
    assert "\\x1b]0;pwned\\x07" in out  # visible, so a person sees what was sent
    assert out.endswith("\nhalf a line")
