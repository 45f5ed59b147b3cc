"""Facility location: maximise F(S) = sum_i max_{j in S} s_ij over a dense similarity matrix.

F is monotone submodular, so greedy selection is within (1 - 1/e) of the optimum (Nemhauser et al., 1978).
Two optimizers, chosen by name from ``OPTIMIZERS``:

- ``naive``: recompute every marginal gain at every step (the reference);
- ``lazy``: Minoux's lazy greedy; re-evaluates only the top of a max-heap of stale upper bounds. It returns
  exactly the naive selection, ties broken towards the lowest index in both.

Weights follow CRAIG/CREST: each selected point's weight is the size of its cluster, the number of ground-set
points whose most similar selected point it is.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from selector_service.errors import InvalidArgument


@dataclass(frozen=True)
class Coreset:
    """A weighted selection from a ground set.

    Attributes:
        indices: int64 (k,), positions in the ground set, unique, in selection order.
        weights: float32 (k,), cluster sizes: positive integers summing to the ground-set size.
        gains: float64 (k,), marginal gain F(S + j) - F(S) of each pick, non-increasing.
    """

    indices: np.ndarray
    weights: np.ndarray
    gains: np.ndarray


def _naive_greedy(sim: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    n = sim.shape[0]
    cover = np.zeros(n, dtype=np.float64)
    taken = np.zeros(n, dtype=bool)
    order: list[int] = []
    gains: list[float] = []
    for _ in range(k):
        g = np.maximum(sim - cover, 0.0).sum(axis=1, dtype=np.float64)  # row j: gain of adding j
        g[taken] = -np.inf
        j = int(np.argmax(g))  # first maximum: lowest index wins a tie
        order.append(j)
        gains.append(float(g[j]))
        taken[j] = True
        np.maximum(cover, sim[j], out=cover)
    return np.asarray(order, dtype=np.int64), np.asarray(gains, dtype=np.float64)


def _lazy_greedy(sim: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    n = sim.shape[0]
    cover = np.zeros(n, dtype=np.float64)
    # Heap of (-upper bound on gain, index): gains only shrink as the cover grows (submodularity).
    bounds = sim.sum(axis=1, dtype=np.float64)
    heap = [(-float(b), j) for j, b in enumerate(bounds)]
    heapq.heapify(heap)
    order: list[int] = []
    gains: list[float] = []
    while len(order) < k:
        _, j = heapq.heappop(heap)
        g = float(np.maximum(sim[j] - cover, 0.0).sum(dtype=np.float64))
        entry = (-g, j)
        # Fresh gain still beats every stale bound (lower index on a tie): it is the naive argmax.
        if not heap or entry <= heap[0]:
            order.append(j)
            gains.append(g)
            np.maximum(cover, sim[j], out=cover)
        else:
            heapq.heappush(heap, entry)
    return np.asarray(order, dtype=np.int64), np.asarray(gains, dtype=np.float64)


OPTIMIZERS: dict[str, Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]] = {
    "naive": _naive_greedy,
    "lazy": _lazy_greedy,
}


def cluster_sizes(sim: np.ndarray, selected: np.ndarray) -> np.ndarray:
    """Number of ground-set points assigned to each selected point.

    Each point goes to its most similar selected point (the earliest pick wins a tie); each selected point is
    assigned to itself, so every size is >= 1 even when embeddings repeat.

    Args:
        sim: float (n, n) similarity matrix.
        selected: int64 (k,) unique positions.

    Returns:
        float32 (k,), positive integers summing to n.
    """
    owner = np.argmax(sim[:, selected], axis=1)
    owner[selected] = np.arange(len(selected))
    return np.bincount(owner, minlength=len(selected)).astype(np.float32)


def objective(sim: np.ndarray, selected: np.ndarray) -> float:
    """F(S) = sum_i max_{j in S} s_ij (0 for an empty S)."""
    if len(selected) == 0:
        return 0.0
    return float(sim[:, selected].max(axis=1).sum(dtype=np.float64))


def facility_location(sim: np.ndarray, k: int, method: str = "lazy") -> Coreset:
    """Greedy facility location on a dense similarity matrix.

    Args:
        sim: float32 (n, n), symmetric, non-negative.
        k: number of points to select, 1 <= k <= n.
        method: a key of ``OPTIMIZERS``.
    """
    n = sim.shape[0]
    if sim.ndim != 2 or sim.shape[1] != n:
        raise InvalidArgument(f"similarity matrix must be square, received shape {sim.shape}")
    if not 1 <= k <= n:
        raise InvalidArgument(f"budget k={k} must be between 1 and the ground-set size {n}")
    if method not in OPTIMIZERS:
        raise InvalidArgument(f"unknown method {method!r}; expected one of {sorted(OPTIMIZERS)}")
    order, gains = OPTIMIZERS[method](sim, k)
    return Coreset(indices=order, weights=cluster_sizes(sim, order), gains=gains)
