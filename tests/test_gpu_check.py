"""The prepared GPU check (benchmarks/gpu_check.py) in its CPU mode: one call starts ``crest serve``, trains the
demo's CNN with CREST and with full data on the device it finds, records the GPU parts it could not run with the
reason, and writes its JSON. On a CUDA machine the same call is the GPU check itself."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch


@pytest.mark.slow
def test_the_gpu_check_runs_in_cpu_mode_and_writes_what_it_measured(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.json"
    cmd = [sys.executable, "-m", "crest_bench.gpu_check", "--steps", "40", "--train-limit", "3000"]
    cmd += ["--no-tests", "--out", str(out)]
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report == json.loads(proc.stdout)  # printed and written alike
    crest, full = report["crest"], report["full_data"]
    assert crest["fallback_batches"] == 0 and crest["rounds"] >= 2 and 0 < crest["embed_share"] < 1
    assert 0.1 < crest["test_accuracy"] <= 1 and 0.1 < full["test_accuracy"] <= 1
    assert report["crest_step_time_ratio"] == pytest.approx(crest["step_ms"] / full["step_ms"])
    if not torch.cuda.is_available():
        assert report["machine"]["device"] == "cpu" and report["cuda"].startswith("skipped: ")
        assert report["ddp_nccl"]["skipped"].startswith("needs 2 CUDA devices")
        assert crest["memory_peak_bytes"] is None
    assert report["tests"] == {"skipped": "--no-tests"}
