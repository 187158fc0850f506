"""The docs are part of the spec: generated pages match the code, and the README
opens with the two commands a fresh machine needs."""

from pathlib import Path

from ftstudio.cli import doc as clidoc
from ftstudio.cli.parser import build_parser

ROOT = Path(__file__).resolve().parents[1]


def test_cli_reference_is_current():
    assert clidoc.DOC_PATH.read_text() == clidoc.render(), "run: python -m ftstudio.cli.doc"


def test_every_command_and_flag_is_in_the_reference():
    text = clidoc.DOC_PATH.read_text()
    subs = clidoc._subcommands(build_parser())
    assert set(subs) >= {"studio", "submit", "tasks", "show", "logs", "cancel", "delete", "train", "demo"}
    for name, sub in subs.items():
        assert f"## ftstudio {name}" in text
        for action in sub._actions:
            for flag in action.option_strings:
                assert flag in text, f"{name} {flag}"


def test_readme_starts_with_the_two_commands():
    lines = (ROOT / "README.md").read_text().splitlines()
    block = lines[lines.index("```sh") + 1 : lines.index("```", lines.index("```sh"))]
    commands = [line.split("#")[0].strip() for line in block if line.strip() and not line.startswith("#")]
    assert commands == ["make demo", "make test"]
    makefile = (ROOT / "Makefile").read_text()
    assert "\ndemo:" in makefile and "\ntest:" in makefile
    assert "make test" in (ROOT / ".ci" / "run").read_text()
