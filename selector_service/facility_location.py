"""Facility location: maximise F(S) = sum_i max_{j in S} s_ji, with cluster-size weights.

F is monotone submodular, so greedy selection is within (1 - 1/e) of the optimum (Nemhauser et al., 1978).
Optimizers, chosen by name from ``OPTIMIZERS``:

- ``naive``: recompute every marginal gain at every step (numpy; the reference, dense only in cost);
- ``lazy``: Minoux's lazy greedy, compiled; returns exactly the naive selection (ties to the lowest index);
- ``stochastic``: lazier-than-lazy greedy with parameter ``epsilon``, compiled and seeded.

Weights follow CRAIG/CREST: each selected point's weight is the size of its cluster, the number of ground-set
points whose most similar selected point it is (every selected point belongs to its own cluster).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit

from selector_service._greedy import cluster_sizes, dense_greedy, sparse_greedy
from selector_service.errors import InvalidArgument
from selector_service.similarity import Coverage, QuantizedKernel, nearest

OPTIMIZERS = ("naive", "lazy", "stochastic")


@dataclass(frozen=True)
class Coreset:
    """A weighted selection from a ground set.

    Attributes:
        indices: int64 (k,), positions in the ground set, unique, in selection order.
        weights: float32 (k,), cluster sizes: positive integers summing to the ground-set size.
        gains: float64 (k,), marginal gain F(S + j) - F(S) of each pick (non-increasing for naive and lazy).
    """

    indices: np.ndarray
    weights: np.ndarray
    gains: np.ndarray


def naive_greedy(sim: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Reference greedy on a dense (n, n) kernel: O(k n^2) numpy, first maximum wins a tie."""
    n = sim.shape[0]
    cover = np.zeros(n, dtype=np.float64)
    taken = np.zeros(n, dtype=bool)
    order: list[int] = []
    gains: list[float] = []
    for _ in range(k):
        g = np.maximum(sim - cover, 0.0).sum(axis=1, dtype=np.float64)  # row j: gain of adding j
        g[taken] = -np.inf
        j = int(np.argmax(g))
        order.append(j)
        gains.append(float(g[j]))
        taken[j] = True
        np.maximum(cover, sim[j], out=cover)
    return np.asarray(order, dtype=np.int64), np.asarray(gains, dtype=np.float64)


def objective(sim: np.ndarray, selected: np.ndarray) -> float:
    """F(S) on a dense kernel (0 for an empty S)."""
    if len(selected) == 0:
        return 0.0
    return float(sim[selected].max(axis=0).sum(dtype=np.float64))


def check_budget(n: int, k: int, method: str, epsilon: float) -> None:
    """Raise ``InvalidArgument`` unless 1 <= k <= n, ``method`` is known and 0 < epsilon < 1."""
    if not 1 <= k <= n:
        raise InvalidArgument(f"budget k={k} must be between 1 and the ground-set size {n}")
    check_method(method, epsilon)


def check_method(method: str, epsilon: float) -> None:
    """Raise ``InvalidArgument`` unless ``method`` is known and 0 < epsilon < 1."""
    if method not in OPTIMIZERS:
        raise InvalidArgument(f"unknown method {method!r}; expected one of {list(OPTIMIZERS)}")
    if not 0.0 < epsilon < 1.0:
        raise InvalidArgument(f"epsilon must be in (0, 1), received {epsilon}")


def facility_location(sim: np.ndarray, k: int, method: str = "lazy", *, epsilon: float = 0.1, seed: int = 0) -> Coreset:
    """Greedy facility location on a dense kernel.

    Args:
        sim: float32 (n, n), non-negative; row j = how well candidate j covers each point.
        k: number of points to select, 1 <= k <= n.
        method: a name in ``OPTIMIZERS``.
        epsilon: stochastic greedy's accuracy parameter in (0, 1).
        seed: stochastic greedy's sampling seed.
    """
    n = sim.shape[0]
    if sim.ndim != 2 or sim.shape[1] != n:
        raise InvalidArgument(f"similarity matrix must be square, received shape {sim.shape}")
    check_budget(n, k, method, epsilon)
    sim = np.ascontiguousarray(sim, dtype=np.float32)
    return _dense_coreset(sim, None, k, method, epsilon, seed)


def _dense_coreset(
    sim: np.ndarray, bounds: np.ndarray | None, k: int, method: str, epsilon: float, seed: int
) -> Coreset:
    if method == "naive":
        order, gains = naive_greedy(sim, k)
    else:
        order, gains, _ = dense_greedy(sim, k, method, epsilon, seed, bounds)
    owner = np.argmax(sim[order], axis=0)  # first pick wins a tie
    return Coreset(indices=order, weights=cluster_sizes(owner, order), gains=gains)


def quantized_facility_location(
    kernel: QuantizedKernel, k: int, method: str = "lazy", *, epsilon: float = 0.1, seed: int = 0
) -> Coreset:
    """Greedy facility location on a fixed-point kernel (``similarity.quantized_similarity``).

    Every gain is an exact integer number of steps, so lazy greedy returns the naive selection bit for bit.
    Gains are reported in similarity units. Arguments as ``facility_location``.
    """
    n = kernel.steps.shape[0]
    check_budget(n, k, method, epsilon)
    coreset = _dense_coreset(kernel.steps, kernel.row_sums, k, method, epsilon, seed)
    gains = coreset.gains * kernel.unit
    gains[0] += n * kernel.offset  # the offset counts once per point, in the first pick's gain
    return Coreset(indices=coreset.indices, weights=coreset.weights, gains=gains)


@njit(cache=True)
def _owner_from_graph(neighbours: np.ndarray, rank: np.ndarray) -> np.ndarray:
    """Each point's first selected neighbour (by selection rank), or -1 when none is in its kNN list."""
    owner = np.full(neighbours.shape[0], -1, dtype=np.int64)
    for i in range(neighbours.shape[0]):
        for t in range(neighbours.shape[1]):
            j = neighbours[i, t]
            if j >= 0 and rank[j] >= 0:
                owner[i] = rank[j]
                break
    return owner


def sparse_facility_location(
    coverage: Coverage, x: np.ndarray, k: int, method: str = "lazy", *, epsilon: float = 0.1, seed: int = 0
) -> Coreset:
    """Greedy facility location on a kNN coverage; ``x`` (float32 (n, d)) assigns points no pick covers."""
    n = len(coverage.indptr) - 1
    check_budget(n, k, method, epsilon)
    if method == "naive":
        order, gains = naive_greedy(coverage.to_dense(), k)
    else:
        order, gains, _ = sparse_greedy(coverage.indptr, coverage.points, coverage.values, n, k, method, epsilon, seed)
    rank = np.full(n, -1, dtype=np.int64)
    rank[order] = np.arange(k)
    owner = _owner_from_graph(coverage.neighbours, rank)
    orphans = np.flatnonzero(owner < 0)
    if len(orphans):
        owner[orphans] = nearest(x[orphans], x[order])
    return Coreset(indices=order, weights=cluster_sizes(owner, order), gains=gains)
