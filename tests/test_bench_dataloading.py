"""``crest bench dataloading --quick`` runs end to end through the real command line: every arm at every worker
count trains, the transform's cost is measured, CREST trains on coresets throughout, and the JSON says whether each
target was met."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_dataloading_quick_measures_every_arm_at_every_worker_count(tmp_path: Path) -> None:
    out = tmp_path / "dataloading.json"
    command = [sys.executable, "-m", "crest_bench.cli", "bench", "dataloading", "--quick", "--out", str(out)]
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["date"] and report["machine"]["cpus"] and report["machine"]["torch"]
    assert report["transform_ms_per_example"] > 0 and report["model_step_ms"] > 0
    assert report["config"]["workers"] == [0, 1] and report["config"]["repeats"] == 1
    runs = {(r["arm"], r["workers"]): r for r in report["runs"]}
    assert set(runs) == {(arm, w) for arm in ("plain", "uniform", "crest") for w in (0, 1)}
    for r in runs.values():
        assert r["steps"] == 25 and r["batches_per_s"] > 0 and 0 <= r["input_wait_share"] <= 1
        assert r["input_wait_s"] <= r["next_wait_s"] + 1e-3  # a loader's input wait happens inside next()
    for w in (0, 1):
        crest = runs[("crest", w)]
        assert crest["fallback_batches"] == 0 and crest["regions"] >= 1  # coresets throughout, a switch timed
        assert runs[("uniform", w)]["fallback_batches"] == 0 and runs[("plain", w)]["embed_s"] == 0
        assert report["medians"]["crest"][str(w)]["batches_per_s"] == crest["batches_per_s"]  # one round
    assert set(report["uniform_to_plain_batches_per_s"]) == {"0", "1"}
    targets = report["targets"]
    assert set(targets["crest_input_wait"]["shares"]) == {"1"}  # judged at W >= 1 only
    assert all(isinstance(t["met"], bool) for t in targets.values())
    assert "transform:" in run.stdout and "uniform / plain batches/s" in run.stdout
