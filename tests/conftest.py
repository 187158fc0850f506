"""Fixtures shared by the core tests: a temporary data home, real studio servers
as subprocesses, a sweep that leaves no training process of a test alive
(terminate -> wait -> kill, always), and the Slurm cluster. Helpers live in
support.py and slurm_cluster.py."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from slurm_cluster import NoCluster, SlurmCluster, connect, in_ci
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


@pytest.fixture(scope="session")
def slurm() -> Iterator[SlurmCluster]:
    """The Slurm cluster (slurm_cluster.py); skips without one, fails without one in CI."""
    try:
        cluster = connect()
    except NoCluster as e:
        missing = str(e)
    else:
        yield cluster
        cluster.cancel_submitted()
        return
    if in_ci():
        pytest.fail(f"CI needs a Slurm cluster: {missing}", pytrace=False)
    pytest.skip(f"no Slurm cluster: {missing}")
