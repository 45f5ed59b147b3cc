"""Compiled greedy maximisation of facility location (numba, cached on disk; no per-call JIT).

Two ground-set representations share one algorithm:

- dense: ``sim`` float32 (n, n); row j lists how well candidate j covers every point (a contiguous O(n) gain);
- sparse: CSR by candidate (``indptr`` int64 (n+1,), ``points`` int64 (nnz,), ``values`` float32 (nnz,)):
  candidate j covers exactly the listed points (reverse kNN coverage, see ``similarity.knn_coverage``).

Lazy greedy (Minoux) keeps a max-heap of stale upper bounds and re-evaluates only its top; it returns the
naive greedy selection exactly, with ties broken towards the lowest index. Stochastic greedy (Mirzasoleiman
et al., "Lazier than lazy greedy", 2015) picks the best of a random sample of (n/k)·ln(1/ε) remaining
candidates per step, evaluated lazily within the sample; expected value >= (1 - 1/e - ε)·OPT.

``select_groups`` solves many small problems (the CREST workload: 50 points, budget 13, per class) in one
compiled call: each group's kernel (direct float32 differences, no GEMM), greedy and cluster sizes.

Every compiled function that calls another lives in this file: numba's on-disk cache is invalidated per
source file, so a caller cached against a dependency in another file could run stale machine code.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

# -- a max-heap of (gain bound, candidate) with the lower candidate first on equal bounds --------------------


@njit(cache=True, inline="always")
def _before(ka: float, ia: int, kb: float, ib: int) -> bool:
    return ka > kb or (ka == kb and ia < ib)


@njit(cache=True)
def _sift_down(keys: np.ndarray, ids: np.ndarray, size: int, pos: int) -> None:
    while True:
        left = 2 * pos + 1
        if left >= size:
            return
        best = left
        right = left + 1
        if right < size and _before(keys[right], ids[right], keys[left], ids[left]):
            best = right
        if not _before(keys[best], ids[best], keys[pos], ids[pos]):
            return
        keys[pos], keys[best] = keys[best], keys[pos]
        ids[pos], ids[best] = ids[best], ids[pos]
        pos = best


@njit(cache=True)
def _heapify(keys: np.ndarray, ids: np.ndarray, size: int) -> None:
    for pos in range(size // 2 - 1, -1, -1):
        _sift_down(keys, ids, size, pos)


# -- gains -----------------------------------------------------------------------------------------------------


@njit(cache=True, fastmath=True)
def _dense_gain(sim: np.ndarray, j: int, cover: np.ndarray) -> float:
    # fastmath lets LLVM vectorise the reduction (reassociated sum: differs from numpy only in the last bits).
    row = sim[j]
    total = 0.0
    for i in range(row.shape[0]):
        total += max(row[i] - cover[i], 0.0)
    return total


@njit(cache=True)
def _sparse_gain(indptr: np.ndarray, points: np.ndarray, values: np.ndarray, j: int, cover: np.ndarray) -> float:
    total = 0.0
    for e in range(indptr[j], indptr[j + 1]):
        d = values[e] - cover[points[e]]
        if d > 0.0:
            total += d
    return total


@njit(cache=True, parallel=True)
def _dense_bounds(sim: np.ndarray) -> np.ndarray:
    # Called from Python only: a parallel function nested in another cached one crashes when loaded from cache.
    n = sim.shape[0]
    out = np.empty(n, dtype=np.float64)
    for j in prange(n):
        total = 0.0
        row = sim[j]
        for i in range(row.shape[0]):
            total += max(row[i], 0.0)
        out[j] = total
    return out


@njit(cache=True)
def _row_sums(sim: np.ndarray) -> np.ndarray:
    out = np.empty(sim.shape[0], dtype=np.float64)
    for j in range(sim.shape[0]):
        total = 0.0
        for i in range(sim.shape[1]):
            total += max(sim[j, i], 0.0)
        out[j] = total
    return out


@njit(cache=True)
def _sparse_bounds(indptr: np.ndarray, values: np.ndarray) -> np.ndarray:
    n = indptr.shape[0] - 1
    out = np.empty(n, dtype=np.float64)
    for j in range(n):
        total = 0.0
        for e in range(indptr[j], indptr[j + 1]):
            total += max(values[e], 0.0)
        out[j] = total
    return out


@njit(cache=True)
def _dense_cover(sim: np.ndarray, j: int, cover: np.ndarray) -> None:
    row = sim[j]
    for i in range(row.shape[0]):
        if row[i] > cover[i]:
            cover[i] = row[i]


@njit(cache=True)
def _sparse_cover(indptr: np.ndarray, points: np.ndarray, values: np.ndarray, j: int, cover: np.ndarray) -> None:
    for e in range(indptr[j], indptr[j + 1]):
        if values[e] > cover[points[e]]:
            cover[points[e]] = values[e]


# -- lazy greedy ---------------------------------------------------------------------------------------------


@njit(cache=True)
def _lazy(
    dense: bool,
    sim: np.ndarray,
    indptr: np.ndarray,
    points: np.ndarray,
    values: np.ndarray,
    bounds: np.ndarray,
    n_points: int,
    k: int,
) -> tuple[np.ndarray, np.ndarray, int]:
    n = bounds.shape[0]
    keys = bounds.copy()
    ids = np.arange(n)
    _heapify(keys, ids, n)
    size = n
    cover = np.zeros(n_points, dtype=np.float64)
    order = np.empty(k, dtype=np.int64)
    gains = np.empty(k, dtype=np.float64)
    evals = 0
    picked = 0
    while picked < k:
        j = ids[0]
        if dense:
            g = _dense_gain(sim, j, cover)
        else:
            g = _sparse_gain(indptr, points, values, j, cover)
        evals += 1
        # Take j if its fresh gain still comes first against the best stale bound among the others.
        if size == 1:
            take = True
        else:
            c = 1
            if size > 2 and _before(keys[2], ids[2], keys[1], ids[1]):
                c = 2
            take = not _before(keys[c], ids[c], g, j)
        if take:
            order[picked] = j
            gains[picked] = g
            picked += 1
            if dense:
                _dense_cover(sim, j, cover)
            else:
                _sparse_cover(indptr, points, values, j, cover)
            size -= 1
            keys[0], ids[0] = keys[size], ids[size]
        else:
            keys[0] = g
        _sift_down(keys, ids, size, 0)
    return order, gains, evals


# -- stochastic greedy ---------------------------------------------------------------------------------------


@njit(cache=True)
def _stochastic(
    dense: bool,
    sim: np.ndarray,
    indptr: np.ndarray,
    points: np.ndarray,
    values: np.ndarray,
    bounds: np.ndarray,
    n_points: int,
    k: int,
    sample: int,
    seed: int,
) -> tuple[np.ndarray, np.ndarray, int]:
    np.random.seed(seed)
    n = bounds.shape[0]
    bound = bounds.copy()
    remaining = np.arange(n)
    left = n
    cover = np.zeros(n_points, dtype=np.float64)
    order = np.empty(k, dtype=np.int64)
    gains = np.empty(k, dtype=np.float64)
    keys = np.empty(n, dtype=np.float64)
    ids = np.empty(n, dtype=np.int64)
    slots = np.empty(n, dtype=np.int64)
    evals = 0
    for step in range(k):
        s = min(sample, left)
        # Partial Fisher-Yates: the first s entries of `remaining` become a uniform sample without replacement.
        for a in range(s):
            b = a + np.random.randint(0, left - a)
            remaining[a], remaining[b] = remaining[b], remaining[a]
        for a in range(s):
            keys[a] = bound[remaining[a]]
            ids[a] = remaining[a]
            slots[remaining[a]] = a
        _heapify(keys, ids, s)
        # Lazy evaluation inside the sample: stop when a fresh gain beats every other stale bound.
        while True:
            j = ids[0]
            if dense:
                g = _dense_gain(sim, j, cover)
            else:
                g = _sparse_gain(indptr, points, values, j, cover)
            evals += 1
            bound[j] = g
            if s == 1:
                break
            c = 1
            if s > 2 and _before(keys[2], ids[2], keys[1], ids[1]):
                c = 2
            if not _before(keys[c], ids[c], g, j):
                break
            keys[0] = g
            _sift_down(keys, ids, s, 0)
        order[step] = j
        gains[step] = g
        if dense:
            _dense_cover(sim, j, cover)
        else:
            _sparse_cover(indptr, points, values, j, cover)
        # Remove j from `remaining` by swapping in the last live candidate.
        for a in range(s):
            if remaining[a] == j:
                left -= 1
                remaining[a], remaining[left] = remaining[left], remaining[a]
                break
    return order, gains, evals


def stochastic_sample_size(n: int, k: int, epsilon: float) -> int:
    """Candidates sampled per step: ceil((n / k) * ln(1 / epsilon)), at least 1, at most n."""
    return int(min(n, max(1, math.ceil(n / k * math.log(1.0 / epsilon)))))


_EMPTY_I = np.zeros(1, dtype=np.int64)
_EMPTY_F = np.zeros(1, dtype=np.float32)
_EMPTY_SIM = np.zeros((1, 1), dtype=np.float32)


def dense_greedy(
    sim: np.ndarray, k: int, method: str, epsilon: float = 0.1, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, int]:
    """Greedy on a dense float32 (n, n) similarity: (order int64 (k,), gains float64 (k,), gain evaluations)."""
    n = sim.shape[0]
    bounds = _dense_bounds(sim)
    if method == "lazy":
        return _lazy(True, sim, _EMPTY_I, _EMPTY_I, _EMPTY_F, bounds, n, k)
    return _stochastic(
        True, sim, _EMPTY_I, _EMPTY_I, _EMPTY_F, bounds, n, k, stochastic_sample_size(n, k, epsilon), seed
    )


def sparse_greedy(
    indptr: np.ndarray,
    points: np.ndarray,
    values: np.ndarray,
    n_points: int,
    k: int,
    method: str,
    epsilon: float = 0.1,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Greedy on a candidate-major CSR coverage graph; returns like ``dense_greedy``."""
    n = indptr.shape[0] - 1
    bounds = _sparse_bounds(indptr, values)
    if method == "lazy":
        return _lazy(False, _EMPTY_SIM, indptr, points, values, bounds, n_points, k)
    return _stochastic(
        False, _EMPTY_SIM, indptr, points, values, bounds, n_points, k, stochastic_sample_size(n, k, epsilon), seed
    )


# -- many small groups in one call -----------------------------------------------------------------------

# Groups up to this size take the batched path (its kernel is m^2 float32 per group, built serially without
# BLAS, so larger groups are faster through the blocked GEMM path).
BATCH_MAX = 512


@njit(cache=True, fastmath=True)
def _exp_nonpositive(v: np.ndarray, bits: np.ndarray) -> None:
    """In place v = exp(v) for v <= 0 in two vectorisable passes (float32; relative error about 1e-7 for
    v >= -4, the kernel's usual range, growing to 4e-6 at v = -80 from rounding v log2 e).

    exp(v) = 2^n * 2^f with n = round(v log2 e) and f in [-1/2, 1/2]; 2^f by its degree-6 Taylor polynomial,
    2^n by writing the float32 exponent bits into ``bits`` (int32, same length). A scalar libm exp per entry
    was most of the small-group kernel's time.
    """
    for i in range(v.shape[0]):
        t = max(v[i] * np.float32(1.4426950408889634), np.float32(-125.0))
        n = np.floor(t + np.float32(0.5))
        f = (t - n) * np.float32(0.6931471805599453)  # 2^(t - n) = e^f
        p = np.float32(1.0 / 720.0)
        p = p * f + np.float32(1.0 / 120.0)
        p = p * f + np.float32(1.0 / 24.0)
        p = p * f + np.float32(1.0 / 6.0)
        p = p * f + np.float32(0.5)
        p = p * f + np.float32(1.0)
        p = p * f + np.float32(1.0)
        v[i] = p
        bits[i] = (np.int32(n) + np.int32(127)) << np.int32(23)
    scale = bits.view(np.float32)
    for i in range(v.shape[0]):
        v[i] *= scale[i]


@njit(cache=True, parallel=True, fastmath=True)
def gram_to_similarity(
    g: np.ndarray, sq_rows: np.ndarray, sq_all: np.ndarray, row0: int, scale: float, exp_kernel: bool
) -> None:
    """In place, one block of the dense kernel: the dot products g[a, j] = x_(row0+a) . x_j (float32 (b, n)) become
    exp(scale * ||x_i - x_j||) when ``exp_kernel`` (scale = -1/d), else scale * ||x_i - x_j||.

    One parallel pass: distance, scale and the vectorised exp together (a separate numpy exp pass over the block
    was a third of the dense kernel's time). Called from Python only, never nested in another compiled kernel.
    """
    m = g.shape[1]
    s32 = np.float32(scale)
    for a in prange(g.shape[0]):
        row = g[a]
        for j in range(m):
            d2 = sq_rows[a] + sq_all[j] - np.float32(2.0) * row[j]
            row[j] = np.sqrt(max(d2, np.float32(0.0))) * s32
        row[row0 + a] = 0.0
        if exp_kernel:
            _exp_nonpositive(row, np.empty(m, dtype=np.int32))


@njit(cache=True, fastmath=True)
def _group_kernel(x: np.ndarray, rows: np.ndarray, exp_kernel: bool) -> np.ndarray:
    """Dense kernel of the rows ``rows`` of ``x``: float32 (m, m), exactly symmetric in distance."""
    m = rows.shape[0]
    d = x.shape[1]
    xt = np.empty((d, m), dtype=np.float32)  # transposed gather: the inner loop runs over contiguous points
    for a in range(m):
        for c in range(d):
            xt[c, a] = x[rows[a], c]
    sim = np.empty((m, m), dtype=np.float32)
    acc = np.empty(m, dtype=np.float32)
    bits = np.empty(m, dtype=np.int32)
    neg_inv_d = np.float32(-1.0 / d)
    top = np.float32(0.0)
    for a in range(m):
        acc[:] = 0.0
        for c in range(d):
            v = xt[c, a]
            for b in range(m):
                diff = v - xt[c, b]
                acc[b] += diff * diff
        acc[a] = 0.0
        row = sim[a]
        for b in range(m):
            row[b] = np.sqrt(acc[b])
        if exp_kernel:
            for b in range(m):
                row[b] *= neg_inv_d
            _exp_nonpositive(row, bits)
            row[a] = 1.0
        else:
            for b in range(m):
                top = max(top, row[b])
    if not exp_kernel:
        for a in range(m):
            for b in range(m):
                sim[a, b] = top - sim[a, b]
    return sim


@njit(cache=True)
def _select_groups(
    x: np.ndarray,
    members: np.ndarray,
    offsets: np.ndarray,
    budgets: np.ndarray,
    exp_kernel: bool,
    stochastic: bool,
    sample_mult: float,
    seed: int,
    out_idx: np.ndarray,
    out_w: np.ndarray,
    out_gain: np.ndarray,
) -> None:
    out = 0
    for g in range(offsets.shape[0] - 1):
        rows = members[offsets[g] : offsets[g + 1]]
        m = rows.shape[0]
        k = budgets[g]
        sim = _group_kernel(x, rows, exp_kernel)
        bounds = _row_sums(sim)
        if stochastic:
            sample = min(m, max(1, int(math.ceil(m / k * sample_mult))))  # noqa: RUF046 (numba typing)
            order, gains, _ = _stochastic(True, sim, _EMPTY_I, _EMPTY_I, _EMPTY_F, bounds, m, k, sample, seed + g)
        else:
            order, gains, _ = _lazy(True, sim, _EMPTY_I, _EMPTY_I, _EMPTY_F, bounds, m, k)
        counts = np.zeros(k, dtype=np.int64)
        rank = np.full(m, -1, dtype=np.int64)
        for t in range(k):
            rank[order[t]] = t
        for i in range(m):
            if rank[i] >= 0:
                counts[rank[i]] += 1
                continue
            best = 0
            for t in range(1, k):  # the earliest pick wins a tie
                if sim[order[t], i] > sim[order[best], i]:
                    best = t
            counts[best] += 1
        for t in range(k):
            out_idx[out + t] = rows[order[t]]
            out_w[out + t] = counts[t]
            out_gain[out + t] = gains[t]
        out += k


def select_groups(
    x: np.ndarray,
    members: np.ndarray,
    offsets: np.ndarray,
    budgets: np.ndarray,
    similarity: str,
    method: str,
    epsilon: float,
    seed: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Select ``budgets[g]`` points from each group ``members[offsets[g]:offsets[g + 1]]`` of rows of ``x``.

    Args:
        x: float32 (n, d) embeddings.
        members: int64 row indices, grouped.
        offsets: int64 (g + 1,) group boundaries in ``members``.
        budgets: int64 (g,) per-group budgets, 1 <= budget <= group size.
        similarity: "exp" or "maxdist"; method: "lazy" or "stochastic" (seeded with seed + group number).

    Returns:
        (indices int64, weights float32, gains float64), each (sum(budgets),), groups in order.
    """
    total = int(budgets.sum())
    idx = np.empty(total, dtype=np.int64)
    w = np.empty(total, dtype=np.float32)
    gains = np.empty(total, dtype=np.float64)
    sample_mult = math.log(1.0 / epsilon)
    _select_groups(
        np.ascontiguousarray(x, dtype=np.float32),
        members,
        offsets,
        budgets,
        similarity == "exp",
        method == "stochastic",
        sample_mult,
        seed,
        idx,
        w,
        gains,
    )
    return idx, w, gains
