"""Where a run starts: the checkpoint it resumes from, and a checkpoints folder cleared of what it must not load."""

from __future__ import annotations

import shutil
from pathlib import Path

from ftstudio import checkpoints
from ftstudio.errors import Problem, ValidationError


def resolve_resume(value: str, checkpoints_dir: Path) -> Path | None:
    """The checkpoint to resume from: none, the newest complete one (`auto`), or the one named."""
    if not value:
        return None
    if value == "auto":
        return checkpoints.find_resume_checkpoint(checkpoints_dir)
    path = Path(value).expanduser()
    if not path.is_absolute() and (checkpoints_dir / path).exists():
        path = checkpoints_dir / path
    if not checkpoints.is_complete(path):
        raise ValidationError(
            Problem(
                "checkpoint.resume_from",
                f"{value} is not a complete checkpoint (missing, partial or damaged); use auto for the newest complete one",
            )
        )
    return path.resolve()


def tidy_checkpoints(checkpoints_dir: Path, resume: Path | None) -> None:
    """Partial checkpoints go; a fresh start also clears an earlier attempt's checkpoints."""
    checkpoints.remove_incomplete(checkpoints_dir)
    limit = (checkpoints.step_of(resume) or 0) if resume else -1
    for path in checkpoints.list_checkpoints(checkpoints_dir):
        if (checkpoints.step_of(path) or 0) > limit:
            shutil.rmtree(path, ignore_errors=True)
