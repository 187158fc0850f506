"""Only the lifecycle decides a status, and only the store writes one.

A status change is a `lifecycle.Move`, which only lifecycle.py makes; the store
applies it (`Store.apply`). This reads the source of every studio module and
fails if one makes a Move, calls the store's raw `transition`, or writes the
status column (or the history of moves) in SQL of its own.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from ftstudio.studio.lifecycle import Move, claim
from ftstudio.studio.store import Store
from ftstudio.studio.task import TaskStatus as S

PACKAGE = Path(__file__).resolve().parents[1] / "ftstudio"
# SQL that sets the status column, or adds a task or a history row.
STATUS_SQL = re.compile(
    r"\bSET\b(?:(?!\bWHERE\b).)*\bstatus\s*=|\bINSERT\s+(?:OR\s+\w+\s+)?INTO\s+(?:tasks|transitions)\b",
    re.IGNORECASE | re.DOTALL,
)
# Where the store writes a status: applying a move, a claim (a move with its leases), a new task's first, and a
# task put back from its folder (`restore`: the moves its journal recorded, or lifecycle.rebuilt's status).
STORE_WRITERS = {"transition", "claim", "create_task", "restore"}


def _called(node: ast.Call) -> str:
    func = node.func
    return func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""


def status_writes(source: str, module: str) -> list[str]:
    """Each place in `source` (the module named `module`, e.g. "service.py") that decides or writes a status."""
    found = []
    tree = ast.parse(source)
    # Which function each node is in, for the store's own SQL.
    owner: dict[ast.AST, str] = {}
    for fn in ast.walk(tree):
        if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
            for node in ast.walk(fn):
                owner.setdefault(node, fn.name)  # outer functions come first: a method, not a helper in it
    # Docstrings may quote SQL; they run nothing.
    docs = {n.value for n in ast.walk(tree) if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)}
    for node in ast.walk(tree):
        where = f"{module}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Call):
            name = _called(node)
            if name == "Move" and module != "lifecycle.py":
                found.append(f"{where} makes a Move (only lifecycle.py decides moves)")
            if name == "replace" and _is_dataclasses_replace(node.func):
                found.append(f"{where} calls replace(): a Move copied with another status is a decision too")
            if name == "transition" and module != "store.py":
                found.append(f"{where} calls transition(): apply a lifecycle Move with Store.apply")
            if name == "check_transition" and module not in ("lifecycle.py", "store.py", "task.py"):
                found.append(f"{where} checks a transition itself")
        sql = (
            isinstance(node, ast.Constant)
            and node not in docs
            and isinstance(node.value, str)
            and STATUS_SQL.search(node.value)
        )
        if sql and (module != "store.py" or owner.get(node) not in STORE_WRITERS):
            found.append(f"{where} writes the status in SQL: {node.value.strip()[:60]!r}")
    return found


def _is_dataclasses_replace(func: ast.expr) -> bool:
    """`replace(...)` as imported from dataclasses, or `dataclasses.replace(...)`; not str/Path/os.replace."""
    if isinstance(func, ast.Attribute):
        return isinstance(func.value, ast.Name) and func.value.id == "dataclasses"
    return isinstance(func, ast.Name)


def test_no_module_but_the_lifecycle_decides_a_status() -> None:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        found += status_writes(path.read_text(encoding="utf-8"), path.name)
    assert not found, "\n".join(found)


@pytest.mark.parametrize(
    "source",
    [
        "store.transition(task.id, S.QUEUED, S.CANCELLED)",
        "move = Move(S.TRAINING, S.FAILED, 'x')",
        "move = lifecycle.Move(S.TRAINING, S.FAILED, 'x')",
        "move = dataclasses.replace(lifecycle.claim(), dst=S.FAILED)",
        "c.execute('UPDATE tasks SET error = ?, status = ? WHERE id = ?', args)",
        "c.execute(f'UPDATE tasks SET status = ?, {cols} WHERE id = ?', args)",
        "c.execute('INSERT INTO transitions (task_id, dst) VALUES (?, ?)', args)",
        "check_transition(src, dst)",
    ],
)
def test_the_check_sees_a_status_written_elsewhere(source: str) -> None:
    assert status_writes(source, "service.py")


def test_the_check_lets_the_rest_be() -> None:
    fine = """
os.replace(tmp, path)
store.apply(task.id, lifecycle.claim())
c.execute("UPDATE tasks SET events_offset = ? WHERE id = ? AND status = ?", args)
c.execute("SELECT status FROM tasks WHERE id = ?", (task_id,))
"""
    assert status_writes(fine, "service.py") == []
    # The store's own writers may, and nothing else in it.
    store_like = "def transition():\n    c.execute('UPDATE tasks SET status = ? WHERE id = ?')\n"
    assert status_writes(store_like, "store.py") == []
    assert status_writes(store_like.replace("transition", "update"), "store.py")


def test_the_store_applies_only_moves(tmp_path: Path) -> None:
    store = Store(tmp_path / "studio.db")
    task = store.create_task(name="t", model="m", dataset="d", config={}, tasks_root=tmp_path)
    assert (task.status, store.history(task.id)[0]["reason"]) == ("queued", "submitted")
    with pytest.raises(TypeError, match="lifecycle Move"):
        store.apply(task.id, (S.QUEUED, S.CANCELLED))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="lifecycle moves"):
        store.update(task.id, status="cancelled")
    with pytest.raises(ValueError, match="the move's"):
        store.apply(task.id, claim(), status="training")
    moved = store.apply(task.id, claim(), pid=7)
    assert (moved.status, moved.phase, moved.pid) == ("preparing", "starting", 7)
    assert isinstance(claim(), Move)
