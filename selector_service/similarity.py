"""Similarities between gradient embeddings for facility location: a dense kernel or a sparse kNN coverage.

Pure numpy, numba and FAISS. Both kernels are non-negative and decrease with Euclidean distance, so a point's
most similar candidate is its nearest one and every candidate covers itself best.

- dense: float32 (n, n) from blocked float32 GEMM distances, transformed in place (never an n x n float64);
- kNN: each point's K nearest neighbours by FAISS (exact flat index, IVF when asked, GPU when present), kept as
  *reverse* coverage: candidate j covers the points that have j among their K nearest. Memory O(nK).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numba import njit, prange

from selector_service._faiss import faiss, num_gpus
from selector_service.errors import InvalidArgument

# Name -> description; the keys are the accepted values of ``similarity=``.
KERNELS = {
    "exp": "exp(-||x_i - x_j|| / d), the released CREST kernel",
    "maxdist": "max distance minus distance, the CRAIG kernel (dense: max over all pairs; kNN: over the graph)",
}
# Rows of the GEMM computed at once: bounds the temporary per block, not the result.
BLOCK_ROWS = 2048


def check_kernel(kind: str) -> None:
    if kind not in KERNELS:
        raise InvalidArgument(f"unknown similarity {kind!r}; expected one of {sorted(KERNELS)}")


@njit(cache=True, parallel=True)
def _to_distance(g: np.ndarray, sq_rows: np.ndarray, sq_all: np.ndarray, row0: int, scale: float) -> None:
    """In place: dot products g[a, j] = x_(row0+a) . x_j become scale * Euclidean distance."""
    for a in prange(g.shape[0]):
        i = row0 + a
        for j in range(g.shape[1]):
            d2 = sq_rows[a] + sq_all[j] - 2.0 * g[a, j]
            g[a, j] = scale * math.sqrt(d2) if d2 > 0.0 and i != j else 0.0


def dense_similarity(x: np.ndarray, kind: str = "exp") -> np.ndarray:
    """Similarity s_ij between all rows of ``x`` (see ``KERNELS``).

    Args:
        x: float32 (n, d) finite embeddings.
        kind: a key of ``KERNELS``.

    Returns:
        float32 (n, n), non-negative; row j holds how well j covers each point; the diagonal is each row's max.
    """
    check_kernel(kind)
    x = np.ascontiguousarray(x, dtype=np.float32)
    n, d = x.shape
    sq = np.einsum("ij,ij->i", x, x)
    out = np.empty((n, n), dtype=np.float32)
    scale = -1.0 / d if kind == "exp" else 1.0
    for lo in range(0, n, BLOCK_ROWS):
        block = out[lo : lo + BLOCK_ROWS]
        np.matmul(x[lo : lo + BLOCK_ROWS], x.T, out=block)
        _to_distance(block, sq[lo : lo + BLOCK_ROWS], sq, lo, scale)
        if kind == "exp":
            np.exp(block, out=block)  # numpy's SIMD float32 exp, ~6x a scalar loop
    if kind == "maxdist":
        np.subtract(out.max(), out, out=out)
    return out


def similarity_matrix(x: np.ndarray, kind: str = "exp") -> np.ndarray:
    """Alias of ``dense_similarity`` (the dense kernel of a small ground set)."""
    return dense_similarity(x, kind)


@dataclass(frozen=True)
class Coverage:
    """Sparse facility-location kernel from a kNN graph.

    Attributes:
        neighbours: int64 (n, K) each point's nearest candidates, nearest first (the point itself included).
        sims: float32 (n, K) the matching similarities minus the point's K-th neighbour similarity (>= 0).
        indptr: int64 (n + 1,) candidate-major CSR over the same entries ...
        points: int64 (nnz,) ... the points each candidate covers ...
        values: float32 (nnz,) ... and how well.
    """

    neighbours: np.ndarray
    sims: np.ndarray
    indptr: np.ndarray
    points: np.ndarray
    values: np.ndarray

    def to_dense(self) -> np.ndarray:
        """float32 (n, n) with row j = what candidate j covers (zeros elsewhere); for tests on small n."""
        n = len(self.indptr) - 1
        out = np.zeros((n, n), dtype=np.float32)
        rows = np.repeat(np.arange(n), np.diff(self.indptr))
        out[rows, self.points] = self.values
        return out


@njit(cache=True)
def _ensure_self(neighbours: np.ndarray, dist: np.ndarray) -> None:
    """Put every point first among its own neighbours (FAISS may rank an exact duplicate, or IVF miss it)."""
    for i in range(neighbours.shape[0]):
        at = -1
        for t in range(neighbours.shape[1]):
            if neighbours[i, t] == i:
                at = t
                break
        if at == -1:
            at = neighbours.shape[1] - 1
        for t in range(at, 0, -1):
            neighbours[i, t] = neighbours[i, t - 1]
            dist[i, t] = dist[i, t - 1]
        neighbours[i, 0] = i
        dist[i, 0] = 0.0


@njit(cache=True)
def _transpose(neighbours: np.ndarray, sims: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Counting sort of the point-major kNN lists into candidate-major CSR (skips -1 = no neighbour)."""
    n, kk = neighbours.shape
    counts = np.zeros(n + 1, dtype=np.int64)
    for i in range(n):
        for t in range(kk):
            j = neighbours[i, t]
            if j >= 0:
                counts[j + 1] += 1
    indptr = np.cumsum(counts)
    fill = indptr[:-1].copy()
    points = np.empty(indptr[-1], dtype=np.int64)
    values = np.empty(indptr[-1], dtype=np.float32)
    for i in range(n):
        for t in range(kk):
            j = neighbours[i, t]
            if j >= 0:
                points[fill[j]] = i
                values[fill[j]] = sims[i, t]
                fill[j] += 1
    return indptr, points, values


def _index(d: int, n: int, approximate: bool) -> object:
    f = faiss()
    if approximate:
        nlist = max(1, int(4 * math.sqrt(n)))
        index = f.IndexIVFFlat(f.IndexFlatL2(d), d, nlist)
        index.nprobe = min(32, nlist)
    else:
        index = f.IndexFlatL2(d)
    if num_gpus() > 0:
        index = f.index_cpu_to_all_gpus(index)
    return index


def knn_coverage(
    x: np.ndarray, neighbours: int, kind: str = "exp", approximate: bool = False, seed: int = 0
) -> Coverage:
    """kNN coverage of the rows of ``x``.

    Args:
        x: float32 (n, d) finite embeddings.
        neighbours: K, neighbours per point (capped at n), the point itself included.
        kind: a key of ``KERNELS``; for "maxdist" the maximum is taken over the graph's distances.
        approximate: use an IVF index (nlist = 4 sqrt(n), nprobe 32) instead of the exact flat one.
        seed: seeds the IVF training sample.
    """
    check_kernel(kind)
    x = np.ascontiguousarray(x, dtype=np.float32)
    n, d = x.shape
    kk = int(min(max(neighbours, 1), n))
    index = _index(d, n, approximate)
    if approximate:
        train = x if n <= 100_000 else x[np.random.default_rng(seed).choice(n, 100_000, replace=False)]
        index.train(train)  # type: ignore[attr-defined]
    index.add(x)  # type: ignore[attr-defined]
    dist, nbrs = index.search(x, kk)  # type: ignore[attr-defined]
    np.sqrt(np.maximum(dist, 0.0, out=dist), out=dist)
    _ensure_self(nbrs, dist)
    valid = nbrs >= 0
    if kind == "exp":
        sims = np.exp(dist * np.float32(-1.0 / d))
    else:
        sims = float(dist[valid].max()) - dist
    sims[~valid] = 0.0
    # Coverage above each point's K-th neighbour similarity: a pick outside the list is worth about that
    # floor to the point anyway, so the graph scores only the improvement over it. Without the floor a wide
    # kernel (exp with scale d) loses most of its mass to truncation and greedy over-values re-covering points.
    floor = np.where(valid, sims, np.inf).min(axis=1, keepdims=True)
    sims = np.maximum(sims - floor, 0.0, out=sims)
    sims[:, 0] = np.maximum(sims[:, 0], np.float32(1e-6))  # a point always gains from itself
    indptr, points, values = _transpose(nbrs, sims)
    return Coverage(nbrs, sims, indptr, points, values)


def nearest(queries: np.ndarray, base: np.ndarray) -> np.ndarray:
    """Index into ``base`` of each query's nearest row (exact, FAISS flat): int64 (len(queries),)."""
    index = faiss().IndexFlatL2(base.shape[1])
    index.add(np.ascontiguousarray(base, dtype=np.float32))
    _, idx = index.search(np.ascontiguousarray(queries, dtype=np.float32), 1)
    return idx[:, 0].astype(np.int64)
