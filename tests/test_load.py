"""Load: 32 concurrent sessions streaming embeddings for a bounded number of rounds against one server; no
errors, every batch delivered once, the server's memory stays bounded, and the p99 round latency is reported."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from selector_service.backends import LocalBackend
from selector_service.server import ServerConfig, start_server
from selector_service.session import Limits
from trainer_client.client import SelectionClient

pytestmark = pytest.mark.slow
SESSIONS, ROUNDS = 32, 4


def _rss_mib() -> float:
    """Resident memory of this process now (the server runs in it), from /proc."""
    with open("/proc/self/status", encoding="ascii") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return kib / 1024


def test_32_concurrent_sessions(capsys: pytest.CaptureFixture[str]) -> None:
    # Every job connects from 127.0.0.1 here: allow them all (the per-client limit guards real deployments).
    limits = Limits(max_sessions_per_client=SESSIONS + 1)
    running = start_server(
        ServerConfig(port=0, backend="local", grpc_threads=64), backend=LocalBackend(2), limits=limits
    )
    latencies: list[float] = []
    errors: list[BaseException] = []
    delivered: dict[str, list[tuple[int, int]]] = {}
    lock = threading.Lock()

    def job(seed: int) -> None:
        try:
            rng = np.random.default_rng(seed)
            with SelectionClient(running.target, timeout_s=120) as client:
                sid = client.create_session(
                    np.arange(20_000) % 10, subset_fraction=0.01, num_subsets=4, batch_size=40, seed=seed
                ).session_id
                for r in range(ROUNDS):
                    start = time.perf_counter()
                    plan = client.start_round(sid, r, r)
                    client.submit_embeddings(sid, r, plan.ids, rng.normal(size=(len(plan.ids), 10)).astype("f4"))
                    keys = [(b.round_id, b.subset_index) for b in client.stream_batches(sid, r)]
                    with lock:
                        latencies.append(time.perf_counter() - start)
                        delivered.setdefault(sid, []).extend(keys)
                client.close_session(sid)
        except BaseException as exc:
            with lock:
                errors.append(exc)

    try:
        job(999)  # warm-up, then measure how much the server's resident memory grows under load
        before = _rss_mib()
        threads = [threading.Thread(target=job, args=(s,)) for s in range(SESSIONS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        growth_mib = _rss_mib() - before
        open_sessions = running.manager.totals()["sessions"]
    finally:
        running.stop(grace=0)
    assert errors == []
    assert len(delivered) == SESSIONS + 1
    for keys in delivered.values():
        assert sorted(keys) == [(r, s) for r in range(ROUNDS) for s in range(4)]  # each batch exactly once
    assert open_sessions == 0  # closed sessions free their state
    assert growth_mib < 500, growth_mib  # bounded: no per-round accumulation
    p50, p99 = (1e3 * float(np.percentile(latencies[ROUNDS:], q)) for q in (50, 99))
    with capsys.disabled():
        print(
            f"\n32 sessions x {ROUNDS} rounds: round latency p50 {p50:.0f} ms, p99 {p99:.0f} ms, "
            f"memory growth {growth_mib:.0f} MiB"
        )
