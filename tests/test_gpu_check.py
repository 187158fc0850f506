"""The one-call GPU check stays runnable between the times a GPU is lent: its dry run on the CPU (as CI runs it)
goes through the same steps, the GPU tests skip saying why, and the report is written; the wheel script fails with
one line where it cannot reach the package index."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from support import ROOT

pytestmark = [pytest.mark.process, pytest.mark.slow]


def test_the_dry_run_runs_every_step_and_writes_the_report(tmp_path: Path) -> None:
    out = tmp_path / "report"
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gpu-check"), "--dry-run", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        env={k: v for k, v in os.environ.items() if not k.startswith("FTSTUDIO_")},
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["dry_run"] and report["ok"]
    tests = report["tests"]
    assert tests["passed"] == 0 and not tests["failed"] and len(tests["skipped"]) >= 8
    assert all("CUDA GPU" in s["reason"] or "bitsandbytes" in s["reason"] for s in tests["skipped"])
    runs = {r["config"]: r for r in report["bench"]["runs"]}
    for name in ("baseline", "ftstudio", "ftstudio at full length"):
        assert runs[name]["tokens_per_s"] > 0 and runs[name]["peak_bytes"] > 0, runs[name]
    assert runs["ftstudio+liger"]["skipped"] == "Liger's kernels need a CUDA GPU"
    assert runs["ftstudio+qlora"]["skipped"] == "QLoRA needs a CUDA GPU"
    assert runs["unsloth"]["skipped"].startswith("not run: ")
    # The estimate is held to the measured peak of the full-length run, here on the CPU's RSS.
    assert abs(report["bench"]["estimate_errors"]["0.5b"]) < 0.15
    md = (out / "report.md").read_text()
    assert md.startswith("# GPU check (dry run on the CPU)") and "| 0.5b | ftstudio |" in md
    assert {p.name for p in out.iterdir()} == {"report.json", "report.md", "gpu-tests.xml", "bench.json", "check.log"}


def test_the_wheel_script_says_in_one_line_when_the_index_cannot_be_reached(tmp_path: Path) -> None:
    script = ROOT / "scripts" / "gpu-wheels"
    usage = subprocess.run([str(script)], capture_output=True, text=True, timeout=30)
    assert usage.returncode == 2 and "scripts/gpu-wheels DIR" in usage.stderr
    env = {**os.environ, "PIP_INDEX_URL": "http://127.0.0.1:9/simple", "PYTHON": sys.executable}
    done = subprocess.run([str(script), str(tmp_path / "w")], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stderr.strip().count("\n") == 0 and "cannot reach the package index" in done.stderr, done.stderr
