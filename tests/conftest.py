"""Fixtures shared by the core tests: a temporary data home, real studio servers
as subprocesses, a sweep that leaves no training process of a test alive
(terminate -> wait -> kill, always), and the Slurm cluster. Helpers live in
support.py and slurm_cluster.py."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from slurm_cluster import NoCluster, SlurmCluster, connect, connect2, in_ci, use
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


def _cluster(open_cluster: Callable[[], SlurmCluster], what: str) -> Iterator[SlurmCluster]:
    """The cluster open_cluster() reaches, its submitted jobs cancelled at the end; a skip
    without it, saying why; a failure without it in CI."""
    try:
        cluster = open_cluster()
    except NoCluster as e:
        missing = str(e)
    else:
        yield cluster
        cluster.cancel_submitted()
        return
    if in_ci():
        pytest.fail(f"CI needs a {what}: {missing}", pytrace=False)
    pytest.skip(f"no {what}: {missing}")


@pytest.fixture(scope="session")
def slurm() -> Iterator[SlurmCluster]:
    """The Slurm cluster (slurm_cluster.py); skips without one, fails without one in CI."""
    yield from _cluster(connect, "Slurm cluster")


@pytest.fixture
def slurm_now(slurm: SlurmCluster) -> None:
    """The `slurm` cluster as slurm_cluster.current_cluster(), for module-level helpers (slurm_env(),
    cancel_tasks()); a module asks for it in every test with pytest.mark.usefixtures("slurm_now")."""
    use(slurm)


@pytest.fixture(scope="session")
def slurm2() -> Iterator[SlurmCluster]:
    """The emulated two-node Slurm cluster (scripts/slurm-dev-cluster up2); skips without it,
    fails without it in CI."""
    yield from _cluster(connect2, "two-node Slurm cluster")
