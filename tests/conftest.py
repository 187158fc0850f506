"""Fixtures shared by the core tests: a temporary data home, real studio servers
as subprocesses, and a sweep that leaves no training process of a test alive
(terminate -> wait -> kill, always). Helpers live in support.py."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from support import ROOT, SCRIPTED, Studio, home_env, sweep


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    h = tmp_path / "home"
    for k in list(os.environ):
        if k.startswith("FTSTUDIO_"):
            monkeypatch.delenv(k)
    monkeypatch.setenv("FTSTUDIO_HOME", str(h))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    yield h
    sweep(h)


@pytest.fixture
def scripted(home: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """In-process services and the processes they start use the scripted trainer."""
    monkeypatch.setenv("FTSTUDIO_TRAINER_MODULE", "scripted_trainer")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), str(SCRIPTED)]))
    return home


@pytest.fixture
def studio_factory(home: Path) -> Iterator[Callable[..., Studio]]:
    made: list[Studio] = []

    def make(*, scripted: bool = False, port: int | None = None, **extra: str) -> Studio:
        s = Studio(home, home_env(home, scripted=scripted, **extra), port)
        made.append(s)
        return s

    yield make
    for s in made:
        s.stop()
