"""Provenance of every delivered batch, `crest inspect` over it, and the Prometheus endpoint (totals, and the
trainers' reports per session)."""

from __future__ import annotations

import csv
import math
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
from prometheus_client.parser import text_string_to_metric_families
from test_client_contract import REPORT

from selector_service.backends import LocalBackend
from selector_service.provenance import ProvenanceLog
from selector_service.server import ServerConfig, start_server
from trainer_client.client import SelectionClient


def test_every_delivered_batch_is_logged_inspectable_and_counted(tmp_path: Path) -> None:
    running = start_server(
        ServerConfig(port=0, backend="local", state_dir=str(tmp_path), metrics_port=0), backend=LocalBackend(2)
    )
    delivered = []
    try:
        with SelectionClient(running.target, timeout_s=30) as client:
            labels = np.random.default_rng(1).permutation(np.repeat(np.arange(10), 100)).astype(np.int64)
            sid = client.create_session(labels, subset_fraction=0.05, num_subsets=2, batch_size=20).session_id
            for r, step in ((0, 0), (1, 37)):
                plan = client.start_round(sid, r, step, trainer_wait_s=1.5 * r)
                emb = np.random.default_rng(r).normal(size=(len(plan.ids), 10)).astype(np.float32)
                client.submit_embeddings(sid, r, plan.ids, emb)
                delivered += list(client.stream_batches(sid, r))
        assert running.metrics.port is not None
        with urllib.request.urlopen(f"http://127.0.0.1:{running.metrics.port}/metrics", timeout=10) as reply:
            text = reply.read().decode()
    finally:
        running.stop(grace=0)
    records = ProvenanceLog(tmp_path).read(sid)
    assert len(records) == len(delivered) == 4
    assert len({(r["round_id"], r["subset_index"]) for r in records}) == 4  # none twice
    by_key = {(r["round_id"], r["subset_index"]): r for r in records}
    for b in delivered:
        r = by_key[(b.round_id, b.subset_index)]
        assert r["ids"] == b.ids.tolist() and np.allclose(r["weights"], b.weights, atol=1e-5)
        assert r["trainer_step"] == b.trainer_step and r["worker"] == b.worker
    assert [r["trainer_step"] for r in ProvenanceLog(tmp_path).read(sid, step=37)] == [37, 37]
    assert "crest_batches_delivered_total 4.0" in text
    assert "crest_examples_delivered_total 80.0" in text
    assert "crest_selection_seconds_count 4.0" in text
    assert "crest_sessions 1.0" in text and "crest_selector_workers 2.0" in text
    assert "crest_trainer_wait_seconds 1.5" in text  # the trainers' own report

    out = tmp_path / "batches.csv"
    cli = [sys.executable, "-m", "selector_service.cli", "inspect", "--state-dir", str(tmp_path), "--session", sid]
    shown = subprocess.run([*cli, "--step", "37", "--export", str(out)], capture_output=True, text=True, check=True)
    assert "2 batches, 40 examples" in shown.stdout
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 2 and all(len(r["ids"].split()) == 20 for r in rows)
    missing = subprocess.run([*cli[:-1], "nosuchsession"], capture_output=True, text=True, check=False)
    assert missing.returncode == 2 and "no provenance for session 'nosuchsession'" in missing.stderr


def _samples(text: str) -> dict[tuple[str, str], float]:
    """The exposition's per-session samples: (sample name, session label) -> value."""
    return {
        (sample.name, sample.labels["session"]): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if "session" in sample.labels
    }


def test_trainer_reports_are_exported_per_session_and_shown_by_inspect(tmp_path: Path) -> None:
    running = start_server(
        ServerConfig(port=0, backend="local", state_dir=str(tmp_path), metrics_port=0), backend=LocalBackend(2)
    )
    report = REPORT  # every field set: counts, an interval unbounded below, the control arm
    try:
        with SelectionClient(running.target, timeout_s=30) as client:
            labels = np.random.default_rng(1).permutation(np.repeat(np.arange(10), 100)).astype(np.int64)
            settings = dict(subset_fraction=0.05, num_subsets=2, batch_size=20)
            sid = client.create_session(labels, client_name="job-a", **settings).session_id
            quiet = client.create_session(labels, **settings).session_id  # reports nothing
            plan = client.start_round(sid, 0, 0, trainer_wait_s=2.0, report=report)
            client.start_round(quiet, 0, 0)
            client.submit_embeddings(sid, 0, plan.ids, np.ones((len(plan.ids), 10), np.float32))
            assert len(list(client.stream_batches(sid, 0))) == 2
        assert running.metrics.port is not None
        with urllib.request.urlopen(f"http://127.0.0.1:{running.metrics.port}/metrics", timeout=10) as reply:
            text = reply.read().decode()
    finally:
        running.stop(grace=0)
    got = _samples(text)
    assert got[("crest_trainer_fallback_batches_total", sid)] == 7
    assert got[("crest_trainer_service_errors_total", sid)] == 2
    assert got[("crest_trainer_control_steps_total", sid)] == 40
    assert got[("crest_payoff_measurements", sid)] == 3
    assert got[("crest_payoff_per_second", sid)] == 1.25
    assert got[("crest_payoff_per_second_lo", sid)] == -math.inf
    assert got[("crest_payoff_per_second_hi", sid)] == 2.5
    assert got[("crest_payoff_on_control", sid)] == 1
    assert got[("crest_trainer_fallback_batches_total", quiet)] == 0 and got[("crest_payoff_on_control", quiet)] == 0
    assert math.isnan(got[("crest_payoff_per_second", quiet)])  # not known
    assert 'client="job-a"' in text and 'client="unnamed"' in text
    assert "crest_trainer_wait_seconds 2.0" in text  # the unlabelled total, as before

    cli = [sys.executable, "-m", "selector_service.cli", "inspect", "--state-dir", str(tmp_path), "--session", sid]
    shown = subprocess.run(cli, capture_output=True, text=True, check=True).stdout
    assert f"session {sid} (job-a): next round 1, 1 completed, 2 batches delivered, trainer waited 2.0 s" in shown
    assert (
        "trainer: 7 fallback batches, 2 failed calls ridden out, 40 control steps; payoff 1.25x per second, "
        "90% interval [-inf, 2.5], over 3 measurements, training on control"
    ) in shown
    assert "2 batches, 40 examples" in shown
