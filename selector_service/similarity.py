"""Similarities between gradient embeddings for facility location: a dense kernel or a sparse kNN coverage.

Pure numpy, numba and FAISS. Both kernels are non-negative and decrease with Euclidean distance, so a point's
most similar candidate is its nearest one and every candidate covers itself best.

- dense: float32 (n, n) from blocked float32 GEMM distances, transformed in place (never an n x n float64);
- quantized: the same in 16-bit fixed point (``QuantizedKernel``), what the selection engine's dense path uses:
  half the memory and memory traffic, and greedy gains that are exact integers;
- kNN: each point's K nearest neighbours (exact: blocked GEMM and a compiled selection on CPU, FAISS flat on a
  GPU; approximate: FAISS IVF), kept as
  *reverse* coverage: candidate j covers the points that have j among their K nearest. Memory O(nK).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
from numba import njit, prange

from selector_service._faiss import GPU_MAX_K, faiss, num_gpus, to_gpu
from selector_service._greedy import STEPS_MAX, gram_to_similarity, gram_to_steps, mirror_steps
from selector_service.errors import InvalidArgument

# Name -> description; the keys are the accepted values of ``similarity=``.
KERNELS = {
    "exp": "exp(-||x_i - x_j|| / d), the released CREST kernel",
    "maxdist": "max distance minus distance, the CRAIG kernel (dense: max over all pairs; kNN: over the graph)",
}
# Rows of the GEMM computed at once: bounds the temporary per block, not the result.
BLOCK_ROWS = 2048
# Rows per block of the quantized kernel: its float32 scratch is this many rows (8 MiB at n = 4,096).
STEP_BLOCK_ROWS = 512


def check_kernel(kind: str) -> None:
    if kind not in KERNELS:
        raise InvalidArgument(f"unknown similarity {kind!r}; expected one of {sorted(KERNELS)}")


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
    xt = np.ascontiguousarray(x.T)  # a contiguous right operand runs SGEMM ~3x faster than the transposed view
    for lo in range(0, n, BLOCK_ROWS):
        block = out[lo : lo + BLOCK_ROWS]
        np.matmul(x[lo : lo + BLOCK_ROWS], xt, out=block)
        _mirror_diagonal(block, lo)
        gram_to_similarity(block, sq[lo : lo + BLOCK_ROWS], sq, lo, scale, kind == "exp")
        block[:, :lo] = out[:lo, lo : lo + BLOCK_ROWS].T  # the earlier blocks' entries: exactly symmetric
    if kind == "maxdist":
        np.subtract(out.max(), out, out=out)
    return out


@dataclass(frozen=True)
class QuantizedKernel:
    """A dense kernel in 16-bit fixed point: s_ij ~ offset + unit * steps[i, j], within unit / 2.

    Adding a constant to every entry changes no greedy choice (it shifts every first gain alike and cancels in
    every later one), so the steps alone decide the selection and ``offset`` only restores the gains' units.

    Attributes:
        steps: uint16 (n, n); row j = how well candidate j covers each point.
        unit: similarity per step (> 0).
        offset: similarity at step 0.
        row_sums: float64 (n,), each row's sum of steps: every candidate's gain on an empty selection.
    """

    steps: np.ndarray
    unit: float
    offset: float
    row_sums: np.ndarray


def _distance_bound(x: np.ndarray) -> float:
    """An upper bound on every pairwise distance: twice the largest distance to the mean, with a margin for
    float32 rounding; positive."""
    centred = x.astype(np.float64) - x.mean(axis=0, dtype=np.float64)
    radius = float(np.sqrt(np.einsum("ij,ij->i", centred, centred).max()))
    return max(2.0 * radius * 1.001, 1e-6)


def quantized_similarity(x: np.ndarray, kind: str = "exp", out: np.ndarray | None = None) -> QuantizedKernel:
    """The dense kernel of ``x`` (see ``KERNELS``) in 16-bit fixed point, in 2 n^2 bytes.

    The steps span the kernel's possible range on these points, bounded through the largest distance B <= 2 max
    ||x_i - mean||: [exp(-B / d), 1] for "exp"; for "maxdist", B - distance, shifted so the farthest pair is 0.

    Args:
        x: float32 (n, d) finite embeddings.
        kind: a key of ``KERNELS``.
        out: optional uint16 (n, n) C-contiguous array to hold the steps (every entry is overwritten).
    """
    check_kernel(kind)
    x = np.ascontiguousarray(x, dtype=np.float32)
    n, d = x.shape
    if out is not None and (out.shape != (n, n) or out.dtype != np.uint16 or not out.flags.c_contiguous):
        raise InvalidArgument(f"out must be a C-contiguous uint16 ({n}, {n}) array, received {out.dtype} {out.shape}")
    bound = _distance_bound(x)
    if kind == "exp":
        scale, base = -1.0 / d, math.exp(-bound / d)
        unit = (1.0 - base) / STEPS_MAX
    else:
        scale, base = -1.0, -bound  # the block holds -distance; -distance - (-B) = B - distance >= 0
        unit = bound / STEPS_MAX
    sq = np.einsum("ij,ij->i", x, x)
    xt = np.ascontiguousarray(x.T)
    steps = np.empty((n, n), dtype=np.uint16) if out is None else out
    sums = np.zeros(n, dtype=np.float64)
    lows = np.empty(n, dtype=np.int64)
    scratch = np.empty(min(STEP_BLOCK_ROWS, n) * n, dtype=np.float32)
    # The kernel is symmetric: each block of rows computes its diagonal block and the upper-triangle panel to its
    # right (half the GEMM and half the transform), and the panel is mirrored below the diagonal.
    for lo in range(0, n, STEP_BLOCK_ROWS):
        hi = min(lo + STEP_BLOCK_ROWS, n)
        g = scratch[: (hi - lo) * (n - lo)].reshape(hi - lo, n - lo)
        np.matmul(x[lo:hi], xt[:, lo:], out=g)
        _mirror_diagonal(g, 0)
        gram_to_steps(g, sq[lo:hi], sq[lo:], scale, kind == "exp", base, 1.0 / unit, steps, lo, sums, lows)
        mirror_steps(steps, lo, hi, sums)
    offset = base if kind == "exp" else -float(lows.min()) * unit
    return QuantizedKernel(steps=steps, unit=unit, offset=offset, row_sums=sums)


def _mirror_diagonal(gram: np.ndarray, col0: int) -> None:
    """Copy the upper triangle of a row block's diagonal block onto its lower one: ``gram`` float32 (b, m) holds
    the dot products of b consecutive rows of x with the columns from the one whose diagonal block starts at
    ``col0``. SGEMM is not symmetric on every CPU (on an AMD EPYC with OpenBLAS's Haswell kernels, x_i . x_j and
    x_j . x_i can differ in the last bit), and the greedy relies on s_ij = s_ji exactly."""
    b = gram.shape[0]
    diag = gram[:, col0 : col0 + b]
    np.copyto(diag, diag.T.copy(), where=_strictly_lower(b))


@functools.cache
def _strictly_lower(b: int) -> np.ndarray:
    """bool (b, b), True below the diagonal (one per block size: a few sizes per process)."""
    return np.tri(b, b, -1, dtype=bool)


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


@njit(cache=True, inline="always")
def _worse(da: float, ja: int, db: float, jb: int) -> bool:
    return da > db or (da == db and ja > jb)


@njit(cache=True)
def _sift_down(hd: np.ndarray, hj: np.ndarray, size: int, d: float, j: int) -> None:
    """Place (d, j) at the root of the max-heap hd/hj[:size] and restore the heap."""
    pos = 0
    while True:
        child = 2 * pos + 1
        if child >= size:
            break
        if child + 1 < size and _worse(hd[child + 1], hj[child + 1], hd[child], hj[child]):
            child += 1
        if not _worse(hd[child], hj[child], d, j):
            break
        hd[pos], hj[pos] = hd[child], hj[child]
        pos = child
    hd[pos], hj[pos] = d, j


@njit(cache=True, parallel=True)
def _topk_rows(
    g: np.ndarray, sq_rows: np.ndarray, sq_all: np.ndarray, row0: int, nbrs: np.ndarray, dist: np.ndarray
) -> None:
    """Rows row0.. of the exact kNN graph from their dot products ``g`` (b, n); each point first in its list.

    A size-K max-heap per row (worst kept neighbour on top): most candidates lose one comparison against the
    top, so a row costs about n comparisons. Equal distances are ordered by index.
    """
    kk = nbrs.shape[1]
    n = g.shape[1]
    for a in prange(g.shape[0]):
        i = row0 + a
        hd = np.empty(kk, dtype=np.float32)
        hj = np.empty(kk, dtype=np.int64)
        size = 0
        for j in range(n):
            d = max(sq_rows[a] + sq_all[j] - np.float32(2.0) * g[a, j], np.float32(0.0))
            if j == i:
                d = np.float32(-1.0)  # the point itself comes first
            if size < kk:
                pos = size  # sift up
                size += 1
                while pos > 0:
                    parent = (pos - 1) // 2
                    if not _worse(d, j, hd[parent], hj[parent]):
                        break
                    hd[pos], hj[pos] = hd[parent], hj[parent]
                    pos = parent
                hd[pos], hj[pos] = d, j
            elif _worse(hd[0], hj[0], d, j):
                _sift_down(hd, hj, kk, d, j)
        for u in range(kk - 1, -1, -1):  # pop the worst first, so the list ends up nearest first
            nbrs[i, u] = hj[0]
            dist[i, u] = np.sqrt(max(hd[0], np.float32(0.0)))
            _sift_down(hd, hj, u, hd[u], hj[u])


def exact_knn(x: np.ndarray, neighbours: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact kNN of every row of ``x`` among all rows (itself first), in O(n K) memory.

    Blocked float32 GEMM (numpy's BLAS) and a compiled per-row selection. Returns (int64 (n, K) indices,
    float32 (n, K) Euclidean distances), nearest first.
    """
    n = x.shape[0]
    kk = int(min(max(neighbours, 1), n))
    sq = np.einsum("ij,ij->i", x, x)
    xt = np.ascontiguousarray(x.T)
    nbrs = np.empty((n, kk), dtype=np.int64)
    dist = np.empty((n, kk), dtype=np.float32)
    block = np.empty((min(BLOCK_ROWS, n), n), dtype=np.float32)
    for lo in range(0, n, BLOCK_ROWS):
        rows = x[lo : lo + BLOCK_ROWS]
        g = block[: len(rows)]
        np.matmul(rows, xt, out=g)
        _topk_rows(g, sq[lo : lo + BLOCK_ROWS], sq, lo, nbrs, dist)
    return nbrs, dist


def knn_on_gpu(neighbours: int, gpus: int) -> bool:
    """Whether a kNN search of K = ``neighbours`` runs on a GPU, given the GPUs FAISS may use: when there is one
    and K is within FAISS's GPU k-selection limit (``GPU_MAX_K``); else the CPU path, which has no limit."""
    return gpus > 0 and neighbours < GPU_MAX_K


def _index(d: int, n: int, approximate: bool, gpu: bool) -> object:
    f = faiss()
    if approximate:
        nlist = max(1, int(4 * math.sqrt(n)))
        index = f.IndexIVFFlat(f.IndexFlatL2(d), d, nlist)
        index.nprobe = min(32, nlist)
    else:
        index = f.IndexFlatL2(d)
    return to_gpu(index) if gpu else index


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
    gpu = knn_on_gpu(kk, num_gpus())
    if not approximate and not gpu:
        nbrs, dist = exact_knn(x, kk)
    else:
        index = _index(d, n, approximate, gpu)
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
