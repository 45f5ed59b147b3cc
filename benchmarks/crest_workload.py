"""The CREST-shaped workload: many small per-class facility-location problems, ours against submodlib.

One round is 5 random subsets x 10 classes x 50 points (d = 10, the logit-gradient width on CIFAR-10), budget 13
per class: what the released CREST code selects per round, calling submodlib once per class. Ours selects it
two ways: one ``select_coresets`` call per round (all 50 groups in one compiled call, as a selector does with
its share of a round) and one ``select_coreset`` call per subset.

Each library runs in its own long-lived process, warmed up first. The parent alternates between them in
``BLOCKS`` blocks of equal repeats, so both are timed in the same stretches of time; the ratio reported is the
median over blocks of submodlib's block time over ours in the neighbouring block. On a shared box the load
changes from minute to minute, and one slow stretch then moves one block instead of the whole figure; the
total-time ratio is reported beside it. Both libraries' selections of one round are scored in the parent under
CREST's objective (exp kernel, per class).

Part of ``crest bench facility-location``; runs alone too:

    crest bench workload --repeats 1000
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

import numpy as np

from crest_bench._workers import Worker, WorkerFailed, serve

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

SUBSETS, CLASSES, PER_CLASS, BUDGET, DIM = 5, 10, 50, 13, 10
BLOCKS = 10  # alternating blocks per library (fewer when there are fewer repeats)


def round_inputs() -> tuple[list[np.ndarray], np.ndarray]:
    """The round every library selects: SUBSETS float32 (500, 10) arrays and their int64 (500,) labels."""
    rng = np.random.default_rng(1)
    subsets = [rng.normal(size=(CLASSES * PER_CLASS, DIM)).astype(np.float32) for _ in range(SUBSETS)]
    return subsets, np.repeat(np.arange(CLASSES), PER_CLASS)


def _ours() -> tuple[dict[str, Any], dict[str, list[np.ndarray]]]:
    from selector_service import select_coreset, select_coresets

    subsets, labels = round_inputs()
    k, round_labels = CLASSES * BUDGET, [labels] * SUBSETS

    def per_round() -> list[np.ndarray]:
        return [c.indices for c in select_coresets(subsets, k, labels=round_labels)]

    def per_subset() -> list[np.ndarray]:
        return [select_coreset(x, k, labels=labels).indices for x in subsets]

    return {"ours_round": per_round, "ours_subset": per_subset}, {"round": per_round(), "subset": per_subset()}


def submodlib_lazy(x: np.ndarray, k: int) -> np.ndarray:
    """submodlib's dense facility location (its "euclidean" kernel, CREST's exp) by lazy greedy, as the released
    CREST code calls it: int64 (k,) rows in selection order."""
    from submodlib import FacilityLocationFunction

    f = FacilityLocationFunction(n=len(x), data=x, mode="dense", metric="euclidean")
    picks = f.maximize(
        budget=k,
        optimizer="LazyGreedy",
        stopIfZeroGain=False,
        stopIfNegativeGain=False,
        verbose=False,
        show_progress=False,
    )
    return np.array([i for i, _ in picks], dtype=np.int64)


def _submodlib() -> tuple[dict[str, Any], dict[str, list[np.ndarray]]]:
    subsets, labels = round_inputs()
    classes = [np.flatnonzero(labels == c) for c in range(CLASSES)]

    def per_class() -> list[np.ndarray]:
        picks = []
        for x in subsets:
            rows = []
            for members in classes:  # one call per class, as the released CREST code makes
                rows.append(members[submodlib_lazy(x[members], BUDGET)])
            picks.append(np.concatenate(rows))
        return picks

    return {"submodlib": per_class}, {"submodlib": per_class()}


WORKERS = {"ours": _ours, "submodlib": _submodlib}


def _worker(library: str, conn: Any) -> None:
    """Worker: ``"warm"`` builds and warms the library and answers one round's picks; ``R`` times R rounds in
    each of the library's modes."""
    modes: dict[str, Any] = {}

    def answer(request: Any) -> dict[str, Any]:
        if request == "warm":
            built, picks = WORKERS[library]()
            modes.update(built)
            return {"picks": picks}
        seconds = {}
        for name, run in modes.items():
            start = time.perf_counter()
            for _ in range(request):
                run()
            seconds[name] = time.perf_counter() - start
        return {"seconds": seconds}

    serve(conn, answer)


def objective(picks: list[np.ndarray]) -> float:
    """CREST's facility location of one round's selections: per subset and class, sum over its points of the
    exp kernel to the nearest pick in its class."""
    subsets, labels = round_inputs()
    total = 0.0
    for x, chosen in zip(subsets, picks, strict=True):
        for c in range(CLASSES):
            members, mine = np.flatnonzero(labels == c), chosen[labels[chosen] == c]
            dist = np.linalg.norm(x[members, None, :].astype(np.float64) - x[None, mine, :], axis=2)
            total += float(np.exp(-dist / DIM).max(axis=1).sum())
    return total


def _ask(library: str, worker: Worker, request: Any) -> dict[str, Any]:
    try:
        return worker.ask(request)
    except WorkerFailed as exc:
        raise RuntimeError(f"CREST-shaped workload, {library}: {exc}") from exc


def crest_workload(repeats: int, libraries: tuple[str, ...], timeout_s: float = 600) -> dict[str, Any]:
    """Time ``repeats`` rounds per library in alternating blocks; ratios as the module docstring says."""
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, received {repeats}")
    out: dict[str, Any] = {"problems": repeats * SUBSETS * CLASSES, "protocol": "alternating blocks"}
    workers = {lib: Worker(_worker, (lib,), timeout_s) for lib in WORKERS if lib in libraries}
    try:
        scores: dict[str, float] = {}
        for lib, w in workers.items():
            scores |= {name: objective(picks) for name, picks in _ask(lib, w, "warm")["picks"].items()}
        blocks = min(BLOCKS, repeats)
        sizes = [repeats // blocks + (b < repeats % blocks) for b in range(blocks)]
        times: dict[str, list[float]] = {}
        for size in sizes:
            for lib, w in workers.items():
                for name, seconds in _ask(lib, w, size)["seconds"].items():
                    times.setdefault(name, []).append(seconds)
    finally:
        for w in workers.values():
            w.close()
    for name, series in times.items():
        out[f"{name}_seconds"] = sum(series)
    out["blocks"] = {name: [round(s, 5) for s in series] for name, series in times.items()}
    if "ours_round" in times and "submodlib" in times:
        best = max(scores.values())
        out["objective_rel"] = {name: score / best for name, score in scores.items()}
        peer = times["submodlib"]
        for mode in ("round", "subset"):
            mine = times[f"ours_{mode}"]
            out[f"throughput_ratio_{mode}"] = float(np.median([p / m for p, m in zip(peer, mine, strict=True)]))
            out[f"throughput_ratio_{mode}_total"] = sum(peer) / sum(mine)
        out["throughput_ratio"] = out["throughput_ratio_round"]
    return out


def run(args: argparse.Namespace) -> int:
    """``crest bench workload``: both libraries' blocks, printed as JSON."""
    print(json.dumps(crest_workload(args.repeats, tuple(WORKERS), args.timeout), indent=1))
    return 0
