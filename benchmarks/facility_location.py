"""Facility location: this project against apricot and submodlib, side by side on the same seeded inputs.

    crest bench facility-location            # full grid (about 10-15 minutes on 2 cores)
    crest bench facility-location --quick    # small grid, used by the test suite

For each configuration every library gets its own fresh process, which generates the same clustered data from
the seed and warms its library up on a tiny input. The libraries are then timed in turns, one call each per
turn, for up to three turns (a library is called again while its calls so far took under REPEAT_BUDGET_S in
all), so their calls share the same stretches of time on a shared box. Reported: the median call, the first
(cold) call beside it, and the peak memory increase (VmHWM). Medians of interleaved calls make the ratio
robust to one slow call or one slow minute (first touches of fresh memory here cost from 0.02 to 0.3 s per
200 MB).

Every selection is then scored in the parent under one objective, CREST's facility location with
s_ij = exp(-||x_i - x_j|| / d) (submodlib's "euclidean" kernel; apricot optimises max - squared distance, so its
score can be a little lower), relative to the best library on that configuration. A library whose dense kernel
cannot fit in memory is skipped with the reason. Writes JSON (default results/facility_location.json).
Needs the bench extra: pip install '.[trainer,cpu,bench]' from a checkout.
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from crest_bench._workers import Worker, WorkerFailed, serve
from crest_bench.crest_workload import crest_workload, submodlib_lazy
from crest_bench.report import machine, write_json

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

LIBRARIES = ("ours", "submodlib", "apricot")
REPEAT_BUDGET_S = 20.0  # a selection is timed again only while the runs so far took less than this in all
MEMORY_BYTES = 20 * 1024**3  # what a dense peer may use on a 24 GiB box


@dataclass(frozen=True)
class Config:
    n: int
    d: int
    k: int
    seed: int = 0

    @property
    def name(self) -> str:
        return f"n={self.n} d={self.d} k={self.k}"


def clustered(config: Config) -> np.ndarray:
    """float32 (n, d): Gaussian blobs around sqrt(n) centres, the same for every library."""
    rng = np.random.default_rng(config.seed)
    centres = rng.normal(size=(max(2, int(math.sqrt(config.n))), config.d)).astype(np.float32) * 3
    return (centres[rng.integers(0, len(centres), config.n)] + rng.normal(size=(config.n, config.d))).astype(np.float32)


# Peak bytes per kernel entry measured at n = 10,000 (apricot: float64 kernel plus copies; submodlib: a numpy
# copy plus nested std::vector rows). Ours stays linear above the dense size limit (kNN path).
BYTES_PER_PAIR = {"apricot": 12, "submodlib": 52, "ours": 0}


def dense_bytes(library: str, n: int) -> int:
    """Memory a library's dense n x n kernel needs."""
    return BYTES_PER_PAIR[library] * n * n


def _select(library: str, x: np.ndarray, k: int) -> np.ndarray:
    if library == "ours":
        from selector_service import select_coreset

        return select_coreset(x, k).indices
    if library == "submodlib":
        return submodlib_lazy(x, k)
    import apricot

    return np.asarray(
        apricot.FacilityLocationSelection(k, metric="euclidean", optimizer="lazy", verbose=False).fit(x).ranking,
        dtype=np.int64,
    )


def peak_rss_mib() -> float:
    """This process's peak resident memory in MiB: VmHWM where Linux reports it (it starts afresh at exec),
    else ru_maxrss, which a spawned process inherits from its parent's size at fork (a parent that loaded torch
    would hide a worker's kernel under that)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _worker(library: str, config: Config, conn: Any) -> None:
    """Worker: ``"warm"`` makes the data and warms the library up on a tiny input (imports, JIT, caches);
    ``"run"`` times one selection; ``"peak"`` reports the peak memory added since the warm-up (``peak_rss_mib``)."""
    state: dict[str, Any] = {}

    def answer(request: Any) -> dict[str, Any]:
        if request == "warm":
            state["x"] = clustered(config)
            _select(library, clustered(Config(200, config.d, 5, seed=99)), 5)
            state["base"] = peak_rss_mib()
            return {"ready": True}
        if request == "run":
            start = time.perf_counter()
            picks = _select(library, state["x"], config.k)
            return {"seconds": time.perf_counter() - start, "picks": picks}
        if request == "peak":
            return {"peak_mib": peak_rss_mib() - state["base"]}
        raise ValueError(f"unknown request {request!r}")

    serve(conn, answer)


def run_config(config: Config, libraries: tuple[str, ...], timeout_s: float) -> dict[str, dict[str, Any]]:
    """Time every library on one configuration, interleaved: a call of each in turn, up to three turns (a
    library is called again while its calls so far took under REPEAT_BUDGET_S in all). Returns per library its
    median, first (cold) call, number of calls, peak MiB and picks, or why it has none (``skipped``)."""
    results: dict[str, dict[str, Any]] = {}
    workers: dict[str, Worker] = {}
    for lib in libraries:
        need = dense_bytes(lib, config.n)
        if need > MEMORY_BYTES:
            results[lib] = {"skipped": f"dense n x n kernel needs ~{need / 1024**3:.0f} GiB"}
        else:
            workers[lib] = Worker(_worker, (lib, config), timeout_s)
    runs: dict[str, list[float]] = {lib: [] for lib in workers}
    picks: dict[str, np.ndarray] = {}

    def ask(lib: str, request: str) -> dict[str, Any] | None:
        try:
            return workers[lib].ask(request)
        except WorkerFailed as exc:
            results[lib] = {"skipped": str(exc)}
            workers.pop(lib).close()
            return None

    try:
        for lib in list(workers):
            ask(lib, "warm")
        for _ in range(3):
            for lib in [lib for lib in workers if sum(runs[lib]) < REPEAT_BUDGET_S]:
                if (reply := ask(lib, "run")) is not None:
                    runs[lib].append(reply["seconds"])
                    picks[lib] = reply["picks"]
        for lib in list(workers):
            if (reply := ask(lib, "peak")) is not None:
                results[lib] = {
                    "seconds": float(np.median(runs[lib])),
                    "first_seconds": runs[lib][0],
                    "runs": len(runs[lib]),
                    "peak_mib": reply["peak_mib"],
                    "picks": picks[lib],
                }
    finally:
        for w in workers.values():
            w.close()
    return {lib: results[lib] for lib in libraries}


def score(x: np.ndarray, picks: np.ndarray) -> tuple[float, float]:
    """(F_exp(S), k-medoid cost) of a selection: every point counted at its nearest pick."""
    from selector_service.similarity import nearest

    owner = nearest(x, x[picks])
    dist = np.linalg.norm(x - x[picks][owner], axis=1).astype(np.float64)
    return float(np.exp(-dist / x.shape[1]).sum()), float(dist.sum())


def grid(quick: bool) -> list[Config]:
    if quick:
        return [Config(2000, 10, 20), Config(2000, 128, 200)]
    return [
        Config(n, d, max(1, round(n * f)))
        for n in (2000, 10_000, 50_000, 200_000)
        for d in (10, 128)
        for f in (0.01, 0.1)
    ]


def run(args: argparse.Namespace) -> int:
    """``crest bench facility-location``: the grid, then the CREST-shaped workload; writes the JSON."""
    libraries = tuple(lib for lib in args.libraries.split(",") if lib)
    unknown = set(libraries) - set(LIBRARIES)
    if unknown:
        print(f"crest bench facility-location: unknown libraries {sorted(unknown)}; choose from {LIBRARIES}")
        return 2
    rows = []
    header = f"{'time s':>9}{'cold s':>9}{'peak MiB':>10}{'F rel':>9}{'cost rel':>10}"
    print(f"{'configuration':<24}{'library':<11}{header}  note")
    sizes = {int(v) for v in args.sizes.split(",") if v}
    for config in (c for c in grid(args.quick) if not sizes or c.n in sizes):
        x = clustered(config)
        results = run_config(config, libraries, args.timeout)
        scored = {lib: score(x, r["picks"]) for lib, r in results.items() if "picks" in r}
        best_f = max((f for f, _ in scored.values()), default=1.0)
        best_cost = min((c for _, c in scored.values()), default=1.0)
        for lib, r in results.items():
            row: dict[str, Any] = {**asdict(config), "library": lib}
            if lib in scored:
                f, cost = scored[lib]
                row |= {
                    "seconds": r["seconds"],
                    "first_seconds": r["first_seconds"],
                    "runs": r["runs"],
                    "peak_mib": r["peak_mib"],
                    "objective": f,
                    "objective_rel": f / best_f,
                    "kmedoid_cost": cost,
                    "cost_rel": cost / best_cost,
                }
                print(
                    f"{config.name:<24}{lib:<11}{r['seconds']:>9.3f}{r['first_seconds']:>9.3f}{r['peak_mib']:>10.0f}"
                    f"{f / best_f:>9.4f}{cost / best_cost:>10.4f}"
                )
            else:
                row["skipped"] = r.get("skipped") or r.get("error")
                print(f"{config.name:<24}{lib:<11}{'-':>9}{'-':>9}{'-':>10}{'-':>9}{'-':>10}  {row['skipped']}")
            rows.append(row)
        peers = [r["seconds"] for r in rows[-len(libraries) :] if r["library"] != "ours" and "seconds" in r]
        ours = next((r for r in rows[-len(libraries) :] if r["library"] == "ours" and "seconds" in r), None)
        if peers and ours:
            print(f"{'':<24}speedup over the faster peer: {min(peers) / ours['seconds']:.1f}x")
    repeats = args.crest_repeats if args.crest_repeats is not None else (20 if args.quick else 1000)
    crest = crest_workload(repeats, libraries, args.timeout) if repeats else {"problems": 0}
    print(f"CREST-shaped workload ({crest['problems']} problems of 50 points, budget 13, alternating blocks):")
    for key, value in crest.items():
        if key not in ("problems", "protocol", "blocks"):
            print(f"  {key}: {value:.3f}" if isinstance(value, float) else f"  {key}: {value}")
    report = {
        "machine": machine(),
        "quick": args.quick,
        "results": rows,
        "crest_workload": crest,
    }
    out = Path(args.out)
    write_json(out, report)
    print(f"wrote {out}")
    return 0
