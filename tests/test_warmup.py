"""The start-up warm-up: its synthetic rounds reach every selection path a round can, a local backend warms once per
process, a failed warm-up stops the server from starting, and (slow) `crest serve` on an empty numba cache serves its
first rounds without compiling."""

from __future__ import annotations

import os
import socket
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from selector_service import backends
from selector_service._greedy import BATCH_MAX
from selector_service.backends import LocalBackend
from selector_service.coreset import DENSE_MAX
from selector_service.errors import SelectorFailure
from selector_service.process import spawn_service
from selector_service.server import ServerConfig, start_server
from selector_service.similarity import KERNELS
from selector_service.tasks import Batch, SelectionTask, chunks, run_task
from selector_service.warmup import warmup_rounds, warmup_tasks
from trainer_client.client import SelectionClient


def _largest_group(labels: np.ndarray, rows: np.ndarray) -> int:
    return int(np.bincount(labels[rows]).max())


def test_warmup_rounds_reach_both_kernels_and_both_selection_paths() -> None:
    reached = set()
    for work in warmup_rounds():
        assert len(chunks(work.sizes, 1)) == 1  # one share: every worker runs the whole round
        assert work.embeddings.dtype == np.float32 and work.labels.dtype == work.ids.dtype == np.int64
        largest = max(_largest_group(work.labels, rows) for rows in work.subset_rows)
        assert largest <= DENSE_MAX  # the kNN path is left out on purpose (see warmup's docstring)
        reached.add((work.similarity, "groups" if largest <= BATCH_MAX else "dense"))
    assert reached == {(s, p) for s in KERNELS for p in ("groups", "dense")}


def test_warmup_tasks_select_valid_batches() -> None:
    for task in warmup_tasks():
        batches = run_task(task, "test")
        assert [b.subset_index for b in batches] == list(range(task.num_subsets))
        for i, batch in enumerate(batches):
            subset = set(task.ids[task.offsets[i] : task.offsets[i + 1]].tolist())
            assert len(set(batch.ids.tolist())) == len(batch.ids) == task.batch_size
            assert set(batch.ids.tolist()) <= subset and np.all(batch.weights > 0)


def test_local_backends_warm_once_per_process(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []

    def counted(task: SelectionTask, worker: str) -> list[Batch]:
        calls.append(worker)
        return run_task(task, worker)

    monkeypatch.setattr(backends, "_local_warm", threading.Event())  # as in a fresh process
    monkeypatch.setattr(backends, "run_task", counted)
    first, second = LocalBackend(2), LocalBackend(1)
    try:
        assert first.describe()["warmup_s"] is None  # not warmed until asked
        first.warm_up()
        assert len(calls) == len(warmup_tasks())
        second.warm_up()
        assert len(calls) == len(warmup_tasks())  # numba's kernels belong to the process: nothing left to do
        assert first.describe()["warmup_s"] >= second.describe()["warmup_s"] >= 0
    finally:
        first.close()
        second.close()


class _ColdBackend(LocalBackend):
    def warm_up(self) -> float:
        raise SelectorFailure("a selector actor could not start")


def test_a_failed_warm_up_stops_the_start_and_closes_the_backend() -> None:
    backend = _ColdBackend(1)
    with pytest.raises(SelectorFailure, match="could not start"):
        start_server(ServerConfig(port=0, backend="local"), backend=backend)
    with pytest.raises(SelectorFailure, match="no selector workers"):  # closed
        backend.submit(warmup_rounds()[0])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _metric(port: int, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    (line,) = [x for x in text.splitlines() if x.startswith(name + " ")]
    return float(line.split()[1])


def _first_round(client: SelectionClient, labels: np.ndarray, **config: Any) -> tuple[list[float], set[str]]:
    """(selection_ms of each batch, workers) of a new session's first round."""
    sid = client.create_session(labels, **config).session_id
    plan = client.start_round(sid, 0, 0)
    emb = np.random.default_rng(0).normal(size=(len(plan.ids), 10)).astype(np.float32)
    client.submit_embeddings(sid, 0, plan.ids, emb)
    batches = list(client.stream_batches(sid, 0))
    assert sorted(b.subset_index for b in batches) == list(range(plan.num_subsets))
    return [b.selection_ms for b in batches], {b.worker.split("@")[0] for b in batches}


@pytest.mark.slow
def test_first_rounds_on_a_fresh_numba_cache_do_not_compile(tmp_path: Path) -> None:
    """`crest serve` (embedded Ray, 2 actors) on an empty NUMBA_CACHE_DIR: once READY, the first round of a
    CREST-sized session, and of a session on the other kernel whose classes take the dense path, each select in
    milliseconds. Compiling takes seconds, so the bound of 1 s tells the two apart without timing anything finer."""
    cache = tmp_path / "numba-cache"
    cache.mkdir()
    metrics_port = _free_port()
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "RAY_AUTH_MODE": "disabled", "NUMBA_CACHE_DIR": str(cache)}
    args = ["--port", "0", "--num-workers", "2", "--metrics-port", str(metrics_port)]
    log_path = tmp_path / "serve.log"
    with log_path.open("w") as log:
        start = time.perf_counter()
        service = spawn_service(args, env=env, log_level="INFO", stderr=log, timeout_s=300)
        started_s = time.perf_counter() - start
        try:
            with SelectionClient(service.target, timeout_s=60) as client:
                crest_ms, crest_workers = _first_round(
                    client, np.arange(5000) % 10, subset_fraction=0.1, num_subsets=5, batch_size=64
                )  # 10 classes x 50 points per subset: CREST's shape
                dense_ms, _ = _first_round(
                    client,
                    np.arange(13000) % 10,
                    subset_fraction=0.5,
                    num_subsets=2,
                    batch_size=64,
                    similarity="maxdist",
                )  # 650 points per class: the fixed-point dense path
            warmup_s = _metric(metrics_port, "crest_selector_warmup_seconds")
            workers = _metric(metrics_port, "crest_selector_workers")
        finally:
            service.stop(timeout_s=60)
    assert max(crest_ms) < 1000, crest_ms
    assert max(dense_ms) < 1000, dense_ms
    assert crest_workers == {"selector-0", "selector-1"}  # the round was dealt to both actors, both warm
    assert workers == 2 and 0 < warmup_s < started_s
    assert "warmed 2 selector actors in" in log_path.read_text()
    # The actors compiled into the empty cache: the embedded Ray's workers inherit the service's environment.
    assert any(p.name.startswith("_greedy.") for p in cache.rglob("*.nbi")), sorted(cache.rglob("*"))[:10]
