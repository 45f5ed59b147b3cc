"""The facility-location benchmark runs end to end (quick mode) against the real peers and writes its JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ("staleness", "offload")  # research harnesses (experiments/), run from the checkout


def _run_quick(bench: str, out: Path) -> tuple[dict[str, Any], str]:
    """Run ``crest bench <bench> --quick`` (or ``python -m experiments.<bench> --quick``); returns its JSON report
    and its stdout."""
    command = ["-m", f"experiments.{bench}"] if bench in EXPERIMENTS else ["-m", "crest_bench.cli", "bench", bench]
    run = subprocess.run(
        [sys.executable, *command, "--quick", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(out.read_text()), run.stdout


@pytest.mark.slow
def test_facility_location_benchmark_quick(tmp_path: Path) -> None:
    report, stdout = _run_quick("facility-location", tmp_path / "fl.json")
    rows = report["results"]
    assert {r["library"] for r in rows} == {"ours", "submodlib", "apricot"}
    for r in rows:
        assert "seconds" in r, r  # nothing skipped at these sizes
        assert r["seconds"] > 0 and 0 < r["objective_rel"] <= 1.0 + 1e-12
        assert r["first_seconds"] > 0 and r["runs"] == 3  # quick selections are all timed three times
    ours = [r for r in rows if r["library"] == "ours"]
    assert all(r["objective_rel"] >= 0.999 for r in ours)  # exact lazy greedy: as good as the peers
    crest = report["crest_workload"]
    assert crest["problems"] == 1000 and crest["submodlib_seconds"] > 0
    assert crest["ours_round_seconds"] > 0 and crest["ours_subset_seconds"] > 0
    assert all(len(times) == 10 for times in crest["blocks"].values())  # 20 rounds in 10 alternating blocks
    assert crest["objective_rel"]["round"] == crest["objective_rel"]["subset"] >= 0.999  # the same selections
    assert crest["throughput_ratio"] == crest["throughput_ratio_round"] > 0
    assert "speedup over the faster peer" in stdout


@pytest.mark.slow
def test_service_benchmark_quick(tmp_path: Path) -> None:
    report, _ = _run_quick("service", tmp_path / "service.json")
    assert report["in_process_selections_per_s"] > 0
    assert {(r["actors"], r["sessions"]) for r in report["results"]} == {(1, 1), (1, 4), (2, 1), (2, 4)}
    for r in report["results"]:
        assert r["selections_per_s"] > 0 and r["embeddings_per_s"] > 0
        assert 0 < r["round_p50_ms"] <= r["round_p99_ms"] and r["ratio_to_in_process"] > 0


def test_staleness_benchmark_quick(tmp_path: Path) -> None:
    """Every age is scored on every audited round; a fresh-enough embedding keeps more of the fresh coreset than a
    random pick does, and no pick beats the fresh coreset's objective by more than greedy's slack."""
    report, stdout = _run_quick("staleness", tmp_path / "staleness.json")
    assert report["config"]["ages"] == [5, 20] and [r["step"] for r in report["rounds"]] == [20, 30, 40]
    s = report["summary"]
    for name in ("age 5", "age 20", "random"):
        assert 0 <= s[f"{name} kept"]["min"] <= s[f"{name} kept"]["mean"] <= 1
        assert 0 < s[f"{name} objective"]["mean"] <= 1.05
    assert s["age 5 kept"]["mean"] > s["random kept"]["mean"]
    assert s["age 5 gain"]["mean"] > 0.5 > s["random gain"]["mean"]  # stale selection keeps most of the gain
    assert s["age 5 drift"]["mean"] > 0
    assert "| age 20 |" in stdout and "| random |" in stdout


def test_offload_benchmark_quick(tmp_path: Path) -> None:
    """Every mode is timed in every repetition on the threads it claims, the offloaded runs report their wait, and
    the table names each mode."""
    report, stdout = _run_quick("offload", tmp_path / "offload.json")
    runs, s = report["runs"], report["summary"]
    modes = ["baseline", "baseline, 1 thread", "inline", "offloaded", "offloaded, shared"]
    assert list(runs) == modes and all(len(runs[m]) == report["config"]["repetitions"] == 1 for m in modes)
    assert [runs[m][0]["threads"] for m in modes] == [2, 1, 2, 1, 2]
    for m in modes:
        assert s[m]["ms_per_step"] > 0 and s[m]["over_baseline"] > 0
        assert f"| {m} |" in stdout
    assert s["baseline"]["over_baseline"] == 1.0
    assert s["offloaded"]["wait_ms_per_round"] >= 0 and s["offloaded, shared"]["wait_ms_per_round"] >= 0
