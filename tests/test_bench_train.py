"""The training benchmark runs end to end (quick mode): real server subprocess, real training on Fashion-MNIST."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
METHODS = {"full", "random", "crest", "infobatch"}
RUN_FIELDS = {
    "method",
    "seed",
    "test_accuracy",
    "wall_s",
    "steps",
    "examples_backpropagated",
    "examples_forward_only",
    "examples_forwarded",
    "wait_s",
    "curve",
    "target_accuracy",
    "time_to_target_s",
    "speedup",
}


@pytest.mark.slow
def test_training_benchmark_quick(tmp_path: Path) -> None:
    out = tmp_path / "train.json"
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "train.py"), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
        cwd=ROOT,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(out.read_text())
    runs = report["runs"]
    assert {r["method"] for r in runs} == METHODS
    steps = report["config"]["steps"]
    for r in runs:
        assert set(r) >= RUN_FIELDS, sorted(RUN_FIELDS - set(r))
        assert r["test_accuracy"] > 0.5, r  # trained: chance is 0.1
        assert r["wall_s"] > 0 and r["steps"] == steps
        assert r["examples_backpropagated"] >= steps  # at least one example a step
        assert r["examples_forwarded"] == r["examples_backpropagated"] + r["examples_forward_only"]
        curve = r["curve"]
        assert curve[-1]["step"] == steps
        assert all(b["step"] > a["step"] for a, b in itertools.pairwise(curve))
        assert all(b["time_s"] >= a["time_s"] for a, b in itertools.pairwise(curve))
        assert all(0 <= p["accuracy"] <= 1 for p in curve)
        assert curve[-1]["time_s"] <= r["wall_s"] + 1e-6
    by_method = {r["method"]: r for r in runs}
    full, crest = by_method["full"], by_method["crest"]
    # Full data reaches its own target (final accuracy minus 1%) at or before its last step.
    assert full["target_accuracy"] == pytest.approx(full["curve"][-1]["accuracy"] - 0.01)
    assert full["time_to_target_s"] is not None and full["speedup"] >= 1.0
    # CREST went through the service: it embedded candidates and selected rounds.
    assert crest["examples_forward_only"] > 0 and crest["rounds"] >= 1
    assert all(by_method[m]["examples_forward_only"] == 0 for m in ("full", "random", "infobatch"))
    assert set(report["summary"]) == METHODS
    for s in report["summary"].values():
        assert s["test_accuracy"]["mean"] > 0.5
    table = out.with_suffix(".md").read_text()
    assert all(f"| {m} |" in table for m in METHODS)
    assert "| full |" in run.stdout
