"""The training benchmark runs end to end (quick mode): real server subprocess, real training on Fashion-MNIST;
and on another dataset through the documented hook, started by the installed `crest` command."""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

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
    "batch_loss",
    "difficulty",
    "excluded",
    "target_accuracy",
    "time_to_target_s",
    "speedup",
}
PLOTS = ("accuracy_vs_time", "accuracy_vs_examples", "difficulty", "excluded")


def _bench(*args: str, out: Path, script: bool = False) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    # script: the installed console script; else the module, as `python -m crest_bench.cli`.
    entry = [str(Path(sys.executable).with_name("crest"))] if script else [sys.executable, "-m", "crest_bench.cli"]
    run = subprocess.run(
        [*entry, "bench", "train", *args, "--no-progress", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
        cwd=ROOT,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return run, json.loads(out.read_text())


def _check_run(r: dict[str, Any], steps: int, chance: float) -> None:
    assert set(r) >= RUN_FIELDS, sorted(RUN_FIELDS - set(r))
    assert r["test_accuracy"] > chance + 0.3, r["method"]  # trained, well above chance
    assert r["wall_s"] > 0 and r["steps"] == steps
    assert r["examples_backpropagated"] >= steps  # at least one example a step
    assert r["examples_forwarded"] == r["examples_backpropagated"] + r["examples_forward_only"]
    curve = r["curve"]
    assert curve[-1]["step"] == steps
    assert all(b["step"] > a["step"] for a, b in itertools.pairwise(curve))
    assert all(b["time_s"] >= a["time_s"] for a, b in itertools.pairwise(curve))
    assert all(0 <= p["accuracy"] <= 1 for p in curve)
    assert curve[-1]["time_s"] <= r["wall_s"] + 1e-6
    # One mean batch loss per curve window, falling as the model trains.
    assert [p["step"] for p in r["batch_loss"]] == [p["step"] for p in curve]
    assert all(math.isfinite(p["loss"]) and p["loss"] >= 0 for p in r["batch_loss"])
    assert r["batch_loss"][-1]["loss"] < r["batch_loss"][0]["loss"]


@pytest.mark.slow
def test_training_benchmark_quick(tmp_path: Path) -> None:
    out = tmp_path / "train.json"
    run, report = _bench("--quick", out=out)
    runs = report["runs"]
    assert {r["method"] for r in runs} == METHODS
    steps = report["config"]["steps"]
    for r in runs:
        _check_run(r, steps, chance=0.1)
    by_method = {r["method"]: r for r in runs}
    full, crest, info = by_method["full"], by_method["crest"], by_method["infobatch"]
    # Full data reaches its own target (final accuracy minus 1%) at or before its last step.
    assert full["target_accuracy"] == pytest.approx(full["curve"][-1]["accuracy"] - 0.01)
    assert full["time_to_target_s"] is not None and full["speedup"] >= 1.0
    # CREST went through the service: it embedded candidates and selected rounds.
    assert crest["examples_forward_only"] > 0 and crest["rounds"] >= 1
    assert all(by_method[m]["examples_forward_only"] == 0 for m in ("full", "random", "infobatch"))
    # Its difficulty per region: real selections (a coreset of 128 from r = 600 per subset), in step order.
    rounds = crest["difficulty"]
    assert len(rounds) >= 2 and all(b["step"] > a["step"] for a, b in itertools.pairwise(rounds))
    assert all(d["selected"] < d["embedded"] and 0 <= d["selected_percentile"] <= 1 for d in rounds)
    assert crest["difficulty_trend"]["rounds"] == len(rounds)
    # Left out of sampling: CREST's excluded fraction at every region (floor 0.8 N), InfoBatch's per epoch.
    assert [e["round"] for e in crest["excluded"]] == [d["round"] for d in rounds]
    assert all(0 <= e["fraction"] <= 0.2 for e in crest["excluded"])
    assert info["excluded"][0]["fraction"] == 0 and max(e["fraction"] for e in info["excluded"]) > 0.05
    assert full["excluded"] == [] and by_method["random"]["excluded"] == []
    assert set(report["summary"]) == METHODS
    for s in report["summary"].values():
        assert s["test_accuracy"]["mean"] > 0.5
    assert report["summary"]["crest"]["difficulty_seeds"] == 1
    table = out.with_suffix(".md").read_text()
    assert all(f"| {m} |" in table for m in METHODS)
    assert "Relative difficulty of CREST's selections" in table
    assert "| full |" in run.stdout
    for name in PLOTS:
        png = tmp_path / f"train_{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png  # exists, non-empty, a PNG


@pytest.mark.slow
def test_any_dataset_through_the_hook(tmp_path: Path) -> None:
    out = tmp_path / "blobs.json"
    hook = str(ROOT / "tests" / "bench_synthetic.py") + ":load"
    _, report = _bench("--dataset", hook, "--steps", "100", "--seeds", "1", out=out, script=True)
    assert report["dataset"] == "blobs, MLP" and report["train_examples"] == 3000
    assert {r["method"] for r in report["runs"]} == METHODS
    for r in report["runs"]:
        _check_run(r, 100, chance=1 / 3)
    crest = next(r for r in report["runs"] if r["method"] == "crest")
    assert crest["rounds"] >= 1 and crest["difficulty"]
    assert all((tmp_path / f"blobs_{name}.png").stat().st_size > 0 for name in PLOTS)
