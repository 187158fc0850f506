"""Fixtures shared by the core tests: a temporary data home, real studio servers
as subprocesses, a sweep that leaves no training process of a test alive
(terminate -> wait -> kill, always), and the Slurm cluster. Helpers live in
support.py and slurm_cluster.py.

The tests come in two tiers. The fast tier (`make check`) starts no process, browser or
cluster: logic over real files and SQLite, with the in-memory executor
(ftstudio.execution.inmemory) where a task must "run". Everything else is marked
`process` (and `browser`, `slurm`) from the fixtures it uses, below, or by hand where its
body starts a process itself; a test left unmarked that starts one fails, saying so, so
the fast tier stays free of them.
"""

from __future__ import annotations

import _posixsubprocess
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from _pytest.nodeid import coerce_node_id
from slurm_cluster import NoCluster, SlurmCluster, connect, connect2, in_ci, use
from support import ROOT, SCRIPTED, Studio, home_env, sweep

# One thread for torch in every test process and every trainer the tests start (they inherit it): on two cores
# shared with a second test worker (make test runs two), or with anything else, two OpenMP threads per trainer
# spin against each other and a step takes several times as long (28-56 s against 13.5 s for the same 30
# steps of cpu-demo on this 2-core machine at load 6); one each, as the chaos suite already gave its two
# trainers, proves the same things. Set before anything imports torch.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# Fixtures that start something: a test that asks for one (directly or through another) is marked for it.
PROCESS_FIXTURES = frozenset({"scripted", "studio_factory", "studio", "scripted_studio", "chaos", "seeded"})
BROWSER_FIXTURES = frozenset({"browser", "page"})
SLURM_FIXTURES = frozenset({"slurm", "slurm2", "slurm_now"})


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the xdist_group marks (--dist loadgroup)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark each test for what it starts, from its fixtures: `browser`, `slurm`, and `process` for all of them;
    and keep together, on one pytest-xdist worker, the tests that must not run beside each other."""
    no_gpu = gpu_missing() if any(item.get_closest_marker("gpu") for item in items) else None
    for item in items:
        used = set(getattr(item, "fixturenames", ()))
        if no_gpu and item.get_closest_marker("gpu"):
            item.add_marker(pytest.mark.skip(reason=no_gpu))
        if used & BROWSER_FIXTURES:
            item.add_marker(pytest.mark.browser)
        if used & SLURM_FIXTURES:
            item.add_marker(pytest.mark.slurm)
        if used & PROCESS_FIXTURES or any(item.get_closest_marker(m) for m in ("browser", "slurm")):
            item.add_marker(pytest.mark.process)
        group = xdist_group_of(item, used)
        if group and not item.get_closest_marker("xdist_group"):
            item.add_marker(pytest.mark.xdist_group(group))
        if getattr(config.option, "loadgroup", False):  # a pytest-xdist worker under --dist loadgroup
            keep_grouped(item)


def gpu_missing() -> str | None:
    """Why the `gpu` tests cannot run here, or None when a CUDA GPU is there (scripts/gpu-check runs them)."""
    import torch

    if not torch.cuda.is_available():
        return "needs a CUDA GPU, and torch sees none here; scripts/gpu-check runs these on a GPU machine"
    return None


def keep_grouped(item: pytest.Item) -> None:
    """Put the item's xdist_group in its node id (`path::test@group`), which is how pytest-xdist's scheduler
    tells groups apart. pytest-xdist 3.8 writes it to `item._nodeid`, which pytest 9.2 no longer reads (the
    id lives in `item._id`): without this every test was scheduled alone, and two Slurm tests ran side by side
    (one restarting slurmctld while the other waited on its job's progress)."""
    names = sorted(
        {str(m.args[0] if m.args else m.kwargs.get("name", "default")) for m in item.iter_markers("xdist_group")}
    )
    nodeid = item.nodeid
    if names and nodeid.rfind("@") <= nodeid.rfind("]"):
        item._id = coerce_node_id(f"{nodeid}@{'_'.join(names)}")  # type: ignore[attr-defined]


def xdist_group_of(item: pytest.Item, used: set[str]) -> str | None:
    """Where `make test` (-n 2 --dist loadgroup) keeps a test with others, on one worker, one at a time:

    - every job on the one-node Slurm cluster, and every one on the two-node cluster: a cluster's jobs wait
      for each other's CPUs, and a test that waits on a job would count another worker's as its own delay;
    - the tests that share a module-scoped fixture (a trained model, a studio, the chaos suite's figures):
      built once, on one worker, instead of once on each.
    """
    if "slurm2" in used:
        return "slurm2"
    if used & SLURM_FIXTURES or item.get_closest_marker("slurm"):
        return "slurm"
    definitions = getattr(getattr(item, "_fixtureinfo", None), "name2fixturedefs", {})
    for name in used:
        defs = definitions.get(name)
        if defs and defs[-1].scope in ("module", "class", "package") and isinstance(item, pytest.Function):
            return f"module:{item.module.__name__}"
    return None


class StartsAProcess(Exception):
    """A test outside the `process` tier started a process."""


@pytest.fixture(autouse=True)
def _fast_tier_starts_no_process(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """A test not marked `process` may not start one (subprocess, multiprocessing, fork, posix_spawn): it would
    slow the fast tier down and make it depend on the machine. The message says how to mark it."""
    if request.node.get_closest_marker("process"):
        return

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise StartsAProcess(
            f"{request.node.nodeid} starts a process but is not marked `process`: mark it "
            "(pytest.mark.process) or use the in-memory executor (ftstudio.execution.inmemory)"
        )

    monkeypatch.setattr(subprocess.Popen, "_execute_child", refuse)
    monkeypatch.setattr(_posixsubprocess, "fork_exec", refuse)
    for name in ("fork", "posix_spawn", "posix_spawnp"):
        monkeypatch.setattr(os, name, refuse)


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
