"""Which files a task may read: the root rule.

A request over HTTP names files on the studio's machine (`data.path`, `model.name`,
`data.validation`, `evaluation.prompts`, `checkpoint.resume_from`). Whoever can reach the API must not be
able to make the studio read `~/.ssh` of another user, `/etc/shadow` or a device,
so such paths must lie under an allowed root: the data home, the user's home
directory, or a folder the owner allowed with `ftstudio studio start --allow-path`.
Paths are resolved (symlinks followed) before the check, and a directory is
refused when a link inside it leads out of the roots, so neither a planted link
nor `..` leaves them.

`/`, `/proc`, `/sys` and `/dev` are never read, not even for the CLI: reading them
hangs (`/dev/zero`, fifos), walks the whole machine, or leaks another process's
memory; no dataset or model lives there.

The person at the terminal (the CLI, `trusted`) may name any other path. The
trainer's own preflight does not call this: by then the studio has decided.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from ftstudio.errors import Problem
from ftstudio.studio.policy import Policy

if TYPE_CHECKING:
    from ftstudio.config import TrainingConfig

NAME_MAX = 255  # bytes in one path component on Linux file systems
NEVER_READ = (Path("/proc"), Path("/sys"), Path("/dev"))
# A directory given as a dataset or a model is walked to find links leading out; past this many
# entries it is not a dataset or model folder a person meant.
MAX_WALK_ENTRIES = 20_000


def roots(home: Path, policy: Policy) -> list[Path]:
    """The folders a request over HTTP may read from, resolved, in the order messages name them."""
    found: list[Path] = []
    for root in (Path(home), Path.home(), *policy.allow_paths):
        try:
            resolved = root.expanduser().resolve()
        except (OSError, RuntimeError):
            continue
        if resolved not in found and not _never_read(resolved):
            found.append(resolved)
    return found


def config_problems(config: TrainingConfig, *, home: Path, policy: Policy, trusted: bool) -> list[Problem]:
    """Every path in a config that this request may not read, each naming its field."""
    from ftstudio.config import custom_reward, label, validation_fraction

    named: list[tuple[str, str]] = []
    data = config.data.path.strip()
    if _is_path(data, home):
        named.append((data, label("data.path")))
    validation = config.data.validation.strip()
    if validation and validation_fraction(validation) is None and _is_path(validation, home):
        named.append((validation, "data.validation"))
    prompts = config.evaluation.prompts.strip()
    if _is_path(prompts, home):
        named.append((prompts, label("evaluation.prompts")))
    model = config.model.name.strip()
    if _is_path(model, home):
        named.append((model, label("model.name")))
    start = config.model.start_from.strip()
    if start and _is_path(start, home):
        named.append((start, label("model.start_from")))
    for spec in config.rewards:
        if (custom := custom_reward(spec)) and custom[0]:
            named.append((custom[0], label("rewards")))
    problems = [path_problem(v, f, home=home, policy=policy, trusted=trusted) for v, f in named]
    resume = config.checkpoint.resume_from.strip()
    if resume not in ("", "auto"):
        if Path(resume).expanduser().is_absolute():
            problems.append(path_problem(resume, "checkpoint.resume_from", home=home, policy=policy, trusted=trusted))
        elif ".." in Path(resume).parts and not trusted:
            problems.append(
                Problem("checkpoint.resume_from", "give auto, a checkpoint-N of this task, or an absolute path")
            )
    return [p for p in problems if p is not None]


def anchor(config: TrainingConfig, home: Path) -> None:
    """Make the paths of a config absolute, against this process's directory, once, at submit.

    The root rule checks them here, and the trainer reads them from the task directory (its
    working directory): a relative path would name one file to the check and another to the
    trainer. `checkpoint.resume_from` stays relative: the trainer takes it inside the task's
    checkpoints folder."""
    from ftstudio.config import validation_fraction

    def absolute(ref: str) -> str:
        ref = ref.strip()
        if not _is_path(ref, home) or "\0" in ref:
            return ref
        # Joined, not normalised: `..` after a link means what the file system says, for the check and the trainer.
        expanded = os.path.expanduser(ref)
        return expanded if os.path.isabs(expanded) else str(Path.cwd() / expanded)

    config.data.path = absolute(config.data.path)
    if validation_fraction(config.data.validation) is None:
        config.data.validation = absolute(config.data.validation)
    config.evaluation.prompts = absolute(config.evaluation.prompts)
    config.model.name = absolute(config.model.name)
    config.model.start_from = absolute(config.model.start_from)
    config.rewards = [_anchored_reward(spec) for spec in config.rewards]


def _anchored_reward(spec: str) -> str:
    """A custom reward's file made absolute, like the data: the trainer runs in the task directory."""
    from ftstudio.config import custom_reward

    custom = custom_reward(spec)
    if not custom or not custom[0].strip() or "\0" in custom[0]:
        return spec
    expanded = os.path.expanduser(custom[0].strip())
    path = expanded if os.path.isabs(expanded) else str(Path.cwd() / expanded)
    return f"python:{path}:{custom[1]}"


def _is_path(ref: str, home: Path) -> bool:
    """Whether the trainer would take `ref` as a path: not a built-in or an uploaded dataset's name,
    and written like a path or naming something that exists (a hub id or a split name is not)."""
    from ftstudio.training.builtin import uploaded_dataset

    if not ref or ref.startswith("builtin:") or uploaded_dataset(ref, home) is not None:
        return False
    if ref.startswith((".", "/", "~")):
        return True
    try:
        return Path(ref).exists()
    except (OSError, ValueError):  # a name too long or with a NUL: let the check name the problem
        return True


def path_problem(value: str, field: str, *, home: Path, policy: Policy, trusted: bool) -> Problem | None:
    """Why the file or directory `value` may not be read for this request, or None when it may.

    Nothing is read here but directory entries and link targets: a refused path's
    content never reaches a message."""
    if "\0" in value or any(len(part.encode("utf-8", "surrogateescape")) > NAME_MAX for part in Path(value).parts):
        return Problem(field, f"{_short(value)} cannot be a path (a name over {NAME_MAX} bytes or a NUL); check it")
    try:
        path = Path(value).expanduser().resolve()
    except (OSError, RuntimeError) as e:  # a loop of links, a name the system refuses
        return Problem(field, f"{_short(value)} cannot be used as a path ({_reason(e)}); check the path")
    if _never_read(path):
        return _system(value, field, path)
    if trusted:
        return None
    allowed = roots(home, policy)
    if not _under(path, allowed):
        # Where a link leads is not named: the message must not map the machine for the caller.
        via = _plain(value) if _plain(value) != path else None
        return _outside(value, field, allowed, home, via=via)
    if path.is_dir():
        try:
            for link in _links(path):
                target = link.resolve()
                if not _under(target, allowed) or _never_read(target):
                    return _outside(value, field, allowed, home, via=link)
        except _TooBig:
            return Problem(
                field,
                f"{_short(value)} holds more than {MAX_WALK_ENTRIES} files and folders; "
                "give the folder of one dataset or model",
            )
        except (OSError, RuntimeError) as e:
            return Problem(field, f"{_short(value)} cannot be read ({_reason(e)}); check its permissions")
    return None


def _system(value: str, field: str, path: Path) -> Problem:
    if path == Path("/"):
        what = "the root of the file system"
    else:
        top = next(p for p in NEVER_READ if path == p or path.is_relative_to(p))
        what = f"in the system folder {top}"
    via = f" (it leads to {path})" if _plain(value) != path else ""
    return Problem(
        field,
        f"{_short(value)}{via} is {what}, which ftstudio never reads; give the file or folder of a dataset or model",
    )


def _outside(value: str, field: str, allowed: list[Path], home: Path, via: Path | None = None) -> Problem:
    named = ", ".join(_root_name(r, home) for r in allowed) or "none"
    link = (
        ""
        if via is None
        else " (through a link)"
        if via == Path(value).expanduser().absolute()
        else f" (through the link {via})"
    )
    return Problem(
        field,
        f"{_short(value)}{link} is outside the folders this studio may read ({named}); "
        "its owner can add one with `ftstudio studio start --allow-path DIR`, or submit from the terminal",
    )


def _root_name(root: Path, home: Path) -> str:
    if root == Path(home).resolve():
        return f"the data home {root}"
    if root == Path.home().resolve():
        return f"your home directory {root}"
    return str(root)


class _TooBig(Exception):
    pass


def _links(top: Path) -> Iterator[Path]:
    """Every symbolic link under `top`, without following any (a link to a folder is yielded, not entered)."""
    seen = 0
    stack = [top]
    while stack:
        with os.scandir(stack.pop()) as entries:
            for entry in entries:
                seen += 1
                if seen > MAX_WALK_ENTRIES:
                    raise _TooBig
                if entry.is_symlink():
                    yield Path(entry.path)
                elif entry.is_dir(follow_symlinks=False):
                    stack.append(Path(entry.path))


def _plain(value: str) -> Path:
    """The path as written, made absolute and with `..` folded, but no link followed."""
    return Path(os.path.abspath(Path(value).expanduser()))


def _under(path: Path, allowed: list[Path]) -> bool:
    return any(path == root or path.is_relative_to(root) for root in allowed)


def _never_read(path: Path) -> bool:
    return path == Path("/") or any(path == p or path.is_relative_to(p) for p in NEVER_READ)


def _short(value: str, limit: int = 120) -> str:
    """The path as the user wrote it, cut so that a 100 KB `path` does not become a 100 KB message."""
    value = value.replace("\n", "\\n").replace("\r", "\\r")
    return value if len(value) <= limit else f"{value[:limit]}… ({len(value)} characters)"


def _reason(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror.lower()
    return "a loop of symbolic links" if isinstance(e, RuntimeError) else type(e).__name__
