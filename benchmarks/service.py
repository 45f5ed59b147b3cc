"""Service overhead: end-to-end selection through gRPC and Ray actors against the engine called in process.

    crest bench service            # 1/2/4 actors x 1/4/16 concurrent sessions
    crest bench service --quick    # a small grid, used by the test suite

Every configuration runs the same seeded rounds: each session (50,000 examples, 10 classes, as CIFAR-10)
starts R rounds of P = 5 class-balanced subsets of 1%, streams random 10-d embeddings for the round's ids and
reads the weighted batches back. Reported per configuration: subset selections per second, embeddings
ingested per second, and p50 / p99 round latency (StartRound to the last batch). The in-process baseline
selects the same kind of subsets with ``minibatch_coreset`` directly, one thread, so ``ratio`` = service
throughput / in-process throughput is the measured cost (or gain, with several actors) of the service.
Writes JSON (default results/service.json).
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from crest_bench.report import machine, write_json

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

# CIFAR-10-shaped sessions: 500-point subsets (50 per class), coresets of 128.
N, CLASSES, DIM, SUBSETS, FRACTION, BATCH = 50_000, 10, 10, 5, 0.01, 128


def _labels() -> np.ndarray:
    return (np.arange(N) % CLASSES).astype(np.int64)


def _job(
    target: str, seed: int, rounds: int, latencies: list[float], counts: dict[str, int], lock: threading.Lock
) -> None:
    from trainer_client.client import SelectionClient

    rng = np.random.default_rng(seed)
    with SelectionClient(target, timeout_s=300) as client:
        sid = client.create_session(
            _labels(), subset_fraction=FRACTION, num_subsets=SUBSETS, batch_size=BATCH, seed=seed
        ).session_id
        for r in range(rounds):
            start = time.perf_counter()
            plan = client.start_round(sid, r, r)
            client.submit_embeddings(sid, r, plan.ids, rng.normal(size=(len(plan.ids), DIM)).astype(np.float32))
            batches = list(client.stream_batches(sid, r))
            with lock:
                latencies.append(time.perf_counter() - start)
                counts["selections"] += len(batches)
                counts["embeddings"] += len(plan.ids)
        client.close_session(sid)


def service_run(actors: int, sessions: int, rounds: int) -> dict[str, Any]:
    from selector_service.ray_backend import RayBackend
    from selector_service.server import ServerConfig, start_server

    backend = RayBackend(num_workers=actors, cpus_per_worker=min(1.0, 2.0 / actors))
    running = start_server(ServerConfig(port=0, backend="ray"), backend=backend)
    try:
        _job(running.target, 999, 1, [], {"selections": 0, "embeddings": 0}, threading.Lock())  # warm-up
        latencies: list[float] = []
        counts = {"selections": 0, "embeddings": 0}
        lock = threading.Lock()
        threads = [
            threading.Thread(target=_job, args=(running.target, s, rounds, latencies, counts, lock))
            for s in range(sessions)
        ]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - start
    finally:
        running.stop(grace=0)
    return {
        "actors": actors,
        "sessions": sessions,
        "rounds_per_session": rounds,
        "seconds": wall,
        "selections_per_s": counts["selections"] / wall,
        "embeddings_per_s": counts["embeddings"] / wall,
        "round_p50_ms": 1e3 * float(np.percentile(latencies, 50)),
        "round_p99_ms": 1e3 * float(np.percentile(latencies, 99)),
    }


def in_process_rate(selections: int) -> float:
    """Subset selections per second of the engine called directly on the same kind of subsets."""
    from selector_service.coreset import minibatch_coreset
    from selector_service.subsets import class_balanced_subsets, per_class_quota

    labels = _labels()
    quota = per_class_quota(N, CLASSES, FRACTION)
    rng = np.random.default_rng(0)
    subsets = class_balanced_subsets(labels, np.ones(N, bool), quota, selections, rng)
    embeddings = [rng.normal(size=(len(s), DIM)).astype(np.float32) for s in subsets]
    minibatch_coreset(subsets[0], labels[subsets[0]], embeddings[0], BATCH)  # warm-up
    start = time.perf_counter()
    for ids, emb in zip(subsets, embeddings, strict=True):
        minibatch_coreset(ids, labels[ids], emb, BATCH)
    return selections / (time.perf_counter() - start)


def run(args: argparse.Namespace) -> int:
    """``crest bench service``: the grid of actors x sessions against the in-process engine; writes the JSON."""
    import ray

    ray.init(
        address="local",
        namespace="crest",
        _node_ip_address="127.0.0.1",
        include_dashboard=False,
        object_store_memory=512 * 1024**2,
        log_to_driver=False,
    )
    actor_grid, session_grid = ((1, 2), (1, 4)) if args.quick else ((1, 2, 4), (1, 4, 16))
    rounds = args.rounds or (2 if args.quick else 5)
    baseline = in_process_rate(200)
    print(f"in-process engine: {baseline:.0f} subset selections/s (one thread, {N // 100} points per subset)")
    print(f"{'actors':>6} {'sessions':>8} {'sel/s':>8} {'emb/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'ratio':>6}")
    rows = []
    try:
        for actors in actor_grid:
            for sessions in session_grid:
                row = service_run(actors, sessions, rounds)
                row["ratio_to_in_process"] = row["selections_per_s"] / baseline
                rows.append(row)
                print(
                    f"{actors:>6} {sessions:>8} {row['selections_per_s']:>8.1f} {row['embeddings_per_s']:>10.0f} "
                    f"{row['round_p50_ms']:>8.1f} {row['round_p99_ms']:>8.1f} {row['ratio_to_in_process']:>6.2f}"
                )
    finally:
        ray.shutdown()
    report = {
        **machine(),
        "quick": args.quick,
        "in_process_selections_per_s": baseline,
        "results": rows,
    }
    out = Path(args.out)
    write_json(out, report)
    print(f"wrote {out}")
    return 0
