"""The fuzz suite: schemathesis generates requests for every operation in the studio's own
/openapi.json and sends them, with the token, to a real studio server (scripted trainer).
No answer may be a server error, and every answer must fit the schema the route publishes.

A bounded number of examples per operation runs in CI; set FTSTUDIO_FUZZ_EXAMPLES for more
(e.g. FTSTUDIO_FUZZ_EXAMPLES=500 .venv/bin/python -m pytest tests/test_fuzz.py).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance
from support import Studio, home_env, sweep

EXAMPLES = int(os.environ.get("FTSTUDIO_FUZZ_EXAMPLES", "20"))

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def seeded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Studio, str]]:
    home: Path = tmp_path_factory.mktemp("fuzz") / "home"
    s = Studio(home, home_env(home, scripted=True)).start()
    # Something for the routes of one task to find: a finished task and an uploaded dataset.
    task = s.http.post("/api/tasks", json={"name": "scripted steps=2 delay=0.01", "config": {"preset": "cpu-demo"}})
    task.raise_for_status()
    s.wait_status(task.json()["id"], "completed")
    s.http.post("/api/datasets", files={"file": ("seed.jsonl", b'{"text": "hello"}\n')}).raise_for_status()
    try:
        yield s, task.json()["id"]
    finally:
        s.stop()
        sweep(home)


@pytest.fixture(scope="module")
def studio(seeded: tuple[Studio, str]) -> Studio:
    return seeded[0]


@pytest.fixture(scope="module")
def task_id(seeded: tuple[Studio, str]) -> str:
    return seeded[1]


@pytest.fixture(scope="module")
def api_schema(studio: Studio) -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_url(f"{studio.url}/openapi.json", headers=studio.auth)


def operations(schema: schemathesis.BaseSchema) -> list[object]:
    return [result.ok() for result in schema.get_all_operations()]


def fuzz(studio: Studio, strategy: object, label: str, tried: dict[str, int]) -> None:
    @given(case=strategy)
    @settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    def send(case: schemathesis.Case) -> None:
        tried[label] = tried.get(label, 0) + 1
        headers = {**(case.headers or {}), **studio.auth}
        if case.method.upper() in ("POST", "PUT", "PATCH", "DELETE"):
            headers["Origin"] = studio.url
        case.call_and_validate(
            base_url=studio.url, headers=headers, timeout=30, checks=[not_a_server_error, response_schema_conformance]
        )

    send()


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_server_errors_and_answers_fit_their_schema(
    studio: Studio, api_schema: schemathesis.BaseSchema, task_id: str, mode: GenerationMode
) -> None:
    """Every operation, with random path parameters and, where there is one, the real task or dataset."""
    ops = operations(api_schema)
    assert len(ops) >= 15
    tried: dict[str, int] = {}
    for op in ops:
        label = f"{op.method.upper()} {op.path}"  # type: ignore[attr-defined]
        fixed: list[dict[str, str] | None] = [None]
        if "{task_id}" in op.path and op.method.upper() != "DELETE":  # type: ignore[attr-defined]
            fixed.append({"task_id": task_id})
        if "{name}" in op.path:  # type: ignore[attr-defined]
            fixed.append({"name": "seed.jsonl"})
        for params in fixed:
            try:
                fuzz(studio, op.as_strategy(generation_mode=mode, path_parameters=params), label, tried)  # type: ignore[attr-defined]
            except Unsatisfiable:
                # No input of this operation can break its schema (no parameters, or only fixed ones).
                assert mode == GenerationMode.NEGATIVE, label
    print(f"fuzzed ({mode.value}): " + ", ".join(f"{k} x{v}" for k, v in sorted(tried.items())))
