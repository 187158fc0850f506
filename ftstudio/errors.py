"""The one exception tree of ftstudio.

    FtstudioError                 any error a person should read (one line, names the fix)
    ├── UserError                 the request is wrong: HTTP 4xx, CLI exit 2
    │   ├── ValidationError       bad config / dataset / model reference (carries field problems)
    │   ├── NotFound              unknown task, dataset or model (HTTP 404)
    │   ├── TooLarge              an upload over the studio's limit (HTTP 413)
    │   ├── TooBusy               as many fine-tunes run as requests may start at once (HTTP 429)
    │   └── Conflict              the action is not allowed in the task's current state (HTTP 409)
    ├── IllegalTransition         a state change the transition table forbids (a bug or a lost race)
    ├── StudioAlreadyRunning      a second studio server on the same home
    ├── NotRunning                the command needs the studio server and none runs (exit 3)
    ├── StorageError              the data home cannot be written (full disk, permissions)
    ├── TrainingFailed            training ran but had to stop (NaN loss, divergence)
    └── LaunchError               the training process could not be started

Exceptions are mapped to HTTP status codes and exit codes only at the edges
(`web/api.py`, `cli/main.py`); everything below raises these.
"""

from __future__ import annotations

from dataclasses import dataclass


class FtstudioError(Exception):
    """Base class: `str(err)` is a one-line message for a person."""

    http_status = 500
    exit_code = 1
    code = ""
    """For a program (the page): which of the refusals that share an HTTP status this is, where it
    matters; sent as `code` beside `detail`."""


class UserError(FtstudioError):
    http_status = 400
    exit_code = 2


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a request: which field, and what to do about it."""

    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.field}: {self.message}" if self.field else self.message


class ValidationError(UserError):
    """Everything wrong with a request, gathered and raised once."""

    http_status = 422

    def __init__(self, problems: list[Problem] | Problem | str) -> None:
        if isinstance(problems, str):
            problems = [Problem("", problems)]
        elif isinstance(problems, Problem):
            problems = [problems]
        self.problems: list[Problem] = list(problems)
        super().__init__("; ".join(str(p) for p in self.problems))


class NotFound(UserError):
    http_status = 404


class TooLarge(UserError):
    http_status = 413


class TooBusy(UserError):
    http_status = 429


class Conflict(UserError):
    http_status = 409


class IllegalTransition(FtstudioError):
    http_status = 409


class DamagedFile(FtstudioError):
    """One of the home's own files (studio.db, studio.json) cannot be read; the message names it and the fix."""


class StudioAlreadyRunning(FtstudioError):
    http_status = 409
    exit_code = 3


class NotRunning(FtstudioError):
    exit_code = 3


class StorageError(FtstudioError):
    http_status = 507


class TrainingFailed(FtstudioError):
    """Training ran but had to stop: a loss that is not a number, or divergence. Exit code 1."""


class LaunchError(FtstudioError):
    http_status = 500
