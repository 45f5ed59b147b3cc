"""Compiled greedy maximisation of facility location (numba, cached on disk; no per-call JIT).

Two ground-set representations share one algorithm:

- dense: ``sim`` float32 (n, n); row j lists how well candidate j covers every point (a contiguous O(n) gain);
- steps: the same in 16-bit fixed point, ``sim`` uint16 (n, n) integer steps (``similarity.QuantizedKernel``):
  half the memory traffic, and every gain is an exact integer, so no summation order can change a choice;
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


@njit(cache=True)
def _sift_up(keys: np.ndarray, ids: np.ndarray, pos: int) -> None:
    while pos > 0:
        parent = (pos - 1) // 2
        if not _before(keys[pos], ids[pos], keys[parent], ids[parent]):
            return
        keys[pos], keys[parent] = keys[parent], keys[pos]
        ids[pos], ids[parent] = ids[parent], ids[pos]
        pos = parent


# -- gains -----------------------------------------------------------------------------------------------------


@njit(cache=True, fastmath=True)
def _dense_gain(sim: np.ndarray, j: int, cover: np.ndarray) -> float:
    # fastmath lets LLVM vectorise the reduction (reassociated sum: differs from numpy only in the last bits).
    row = sim[j]
    total = 0.0
    for i in range(row.shape[0]):
        total += max(row[i] - cover[i], 0.0)
    return total


# Steps kernels keep the cover as integers in float32 and add 256 entries at a time: a partial sum stays below
# 256 * 65535 < 2^24, so float32 adds it exactly and LLVM may reorder and vectorise freely (16 lanes, half the
# bytes of a float32 row). Measured at n=10k: 2.6 us per evaluation from DRAM against 6.0 us for float32.
_CHUNK = 256


@njit(cache=True, fastmath=True)
def _steps_gain(sim: np.ndarray, j: int, cover: np.ndarray) -> float:
    row = sim[j]
    m = row.shape[0]
    full = m - m % _CHUNK
    total = 0.0
    for lo in range(0, full, _CHUNK):
        part = np.float32(0.0)
        for i in range(lo, lo + _CHUNK):
            part += max(np.float32(row[i]) - cover[i], np.float32(0.0))
        total += float(part)
    part = np.float32(0.0)
    for i in range(full, m):
        part += max(np.float32(row[i]) - cover[i], np.float32(0.0))
    return total + float(part)


@njit(cache=True, fastmath=True)
def _steps_gains4(sim: np.ndarray, cand: np.ndarray, cover: np.ndarray, out: np.ndarray) -> None:
    """``_steps_gain`` of the four candidates ``cand`` into ``out`` (float64 (4,)), the rows streamed together:
    2.0 us per gain at n=10k against 3.1 us one by one (four memory streams, the cover read once)."""
    r0, r1, r2, r3 = sim[cand[0]], sim[cand[1]], sim[cand[2]], sim[cand[3]]
    m = r0.shape[0]
    full = m - m % _CHUNK
    zero = np.float32(0.0)
    t0 = t1 = t2 = t3 = 0.0
    for lo in range(0, full, _CHUNK):
        p0 = p1 = p2 = p3 = np.float32(0.0)
        for i in range(lo, lo + _CHUNK):
            c = cover[i]
            p0 += max(np.float32(r0[i]) - c, zero)
            p1 += max(np.float32(r1[i]) - c, zero)
            p2 += max(np.float32(r2[i]) - c, zero)
            p3 += max(np.float32(r3[i]) - c, zero)
        t0 += float(p0)
        t1 += float(p1)
        t2 += float(p2)
        t3 += float(p3)
    for i in range(full, m):
        c = cover[i]
        t0 += float(max(np.float32(r0[i]) - c, zero))
        t1 += float(max(np.float32(r1[i]) - c, zero))
        t2 += float(max(np.float32(r2[i]) - c, zero))
        t3 += float(max(np.float32(r3[i]) - c, zero))
    out[0], out[1], out[2], out[3] = t0, t1, t2, t3


@njit(cache=True)
def _sparse_gain(indptr: np.ndarray, points: np.ndarray, values: np.ndarray, j: int, cover: np.ndarray) -> float:
    total = 0.0
    for e in range(indptr[j], indptr[j + 1]):
        d = values[e] - cover[points[e]]
        if d > 0.0:
            total += d
    return total


@njit(cache=True, parallel=True)
def _dense_bounds(steps: bool, sim: np.ndarray, zeros: np.ndarray) -> np.ndarray:
    """Every candidate's gain on an empty selection (``zeros``: an all-zero cover), by the same arithmetic as
    its later evaluations. Called from Python only: a parallel function nested in another cached one crashes
    when loaded from cache."""
    n = sim.shape[0]
    out = np.empty(n, dtype=np.float64)
    for j in prange(n):
        out[j] = _steps_gain(sim, j, zeros) if steps else _dense_gain(sim, j, zeros)
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


# Ground-set representations (see the module docstring); the greedy loops branch on them at run time.
DENSE, STEPS, SPARSE = 0, 1, 2


@njit(cache=True)
def _gain(
    kind: int, sim: np.ndarray, indptr: np.ndarray, points: np.ndarray, values: np.ndarray, j: int, cover: np.ndarray
) -> float:
    if kind == SPARSE:
        return _sparse_gain(indptr, points, values, j, cover)
    if kind == STEPS:
        return _steps_gain(sim, j, cover)
    return _dense_gain(sim, j, cover)


@njit(cache=True)
def _cover(
    kind: int, sim: np.ndarray, indptr: np.ndarray, points: np.ndarray, values: np.ndarray, j: int, cover: np.ndarray
) -> None:
    if kind == SPARSE:
        _sparse_cover(indptr, points, values, j, cover)
    else:
        _dense_cover(sim, j, cover)


# -- lazy greedy ---------------------------------------------------------------------------------------------


@njit(cache=True)
def _lazy(
    kind: int,
    sim: np.ndarray,
    indptr: np.ndarray,
    points: np.ndarray,
    values: np.ndarray,
    bounds: np.ndarray,
    cover: np.ndarray,
    k: int,
) -> tuple[np.ndarray, np.ndarray, int]:
    """``cover`` (zeros: float64, float32 for STEPS) is updated in place to each point's best coverage."""
    n = bounds.shape[0]
    keys = bounds.copy()
    ids = np.arange(n)
    _heapify(keys, ids, n)
    size = n
    order = np.empty(k, dtype=np.int64)
    gains = np.empty(k, dtype=np.float64)
    evals = 0
    picked = 0
    while picked < k:
        j = ids[0]
        g = _gain(kind, sim, indptr, points, values, j, cover)
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
            _cover(kind, sim, indptr, points, values, j, cover)
            size -= 1
            keys[0], ids[0] = keys[size], ids[size]
        else:
            keys[0] = g
        _sift_down(keys, ids, size, 0)
    return order, gains, evals


@njit(cache=True)
def _lazy_steps(sim: np.ndarray, bounds: np.ndarray, cover: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, int]:
    """``_lazy`` on a fixed-point kernel (uint16 (n, n); ``bounds`` the exact gains on an empty selection),
    re-evaluating the top stale candidates four at a time.

    The selection is the same: a candidate is taken only when its fresh gain comes first (ties to the lower
    index) against every other bound, stale or fresh. On wide kernels most picks re-evaluate hundreds of
    candidates (at n=10k, d=128 the second pick re-evaluates all of them), so a batch rarely wastes work.
    """
    n = bounds.shape[0]
    keys = bounds.copy()
    ids = np.arange(n)
    _heapify(keys, ids, n)
    size = n
    fresh = np.zeros(n, dtype=np.int64)  # the pick number each key was computed for; the bounds are exact
    order = np.empty(k, dtype=np.int64)
    gains = np.empty(k, dtype=np.float64)
    cand = np.empty(4, dtype=np.int64)
    got = np.empty(4, dtype=np.float64)
    evals = 0
    picked = 0
    while picked < k:
        if fresh[ids[0]] == picked:
            j = ids[0]
            order[picked] = j
            gains[picked] = keys[0]
            picked += 1
            _dense_cover(sim, j, cover)
            size -= 1
            keys[0], ids[0] = keys[size], ids[size]
            _sift_down(keys, ids, size, 0)
            continue
        b = 0
        while b < 4 and size > 0 and fresh[ids[0]] != picked:
            cand[b] = ids[0]
            b += 1
            size -= 1
            keys[0], ids[0] = keys[size], ids[size]
            _sift_down(keys, ids, size, 0)
        if b == 4:
            _steps_gains4(sim, cand, cover, got)
        else:
            for t in range(b):
                got[t] = _steps_gain(sim, cand[t], cover)
        evals += b
        for t in range(b):
            fresh[cand[t]] = picked
            keys[size], ids[size] = got[t], cand[t]
            _sift_up(keys, ids, size)
            size += 1
    return order, gains, evals


# -- stochastic greedy ---------------------------------------------------------------------------------------


@njit(cache=True)
def _stochastic(
    kind: int,
    sim: np.ndarray,
    indptr: np.ndarray,
    points: np.ndarray,
    values: np.ndarray,
    bounds: np.ndarray,
    cover: np.ndarray,
    k: int,
    sample: int,
    seed: int,
) -> tuple[np.ndarray, np.ndarray, int]:
    np.random.seed(seed)
    n = bounds.shape[0]
    bound = bounds.copy()
    remaining = np.arange(n)
    left = n
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
            g = _gain(kind, sim, indptr, points, values, j, cover)
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
        _cover(kind, sim, indptr, points, values, j, cover)
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
    sim: np.ndarray,
    k: int,
    method: str,
    epsilon: float = 0.1,
    seed: int = 0,
    bounds: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Greedy on a dense kernel: float32 (n, n) similarities, or uint16 (n, n) steps (exact integer gains).

    ``bounds`` float64 (n,): each row's sum (the gain of each candidate on an empty selection), when known.
    Returns (order int64 (k,), gains float64 (k,) in the kernel's units, gain evaluations).
    """
    n = sim.shape[0]
    kind = STEPS if sim.dtype == np.uint16 else DENSE
    cover = np.zeros(n, dtype=np.float32 if kind == STEPS else np.float64)
    if bounds is None:
        bounds = _dense_bounds(kind == STEPS, sim, cover)
    if method == "lazy" and kind == STEPS:
        return _lazy_steps(sim, bounds, cover, k)
    if method == "lazy":
        return _lazy(kind, sim, _EMPTY_I, _EMPTY_I, _EMPTY_F, bounds, cover, k)
    sample = stochastic_sample_size(n, k, epsilon)
    return _stochastic(kind, sim, _EMPTY_I, _EMPTY_I, _EMPTY_F, bounds, cover, k, sample, seed)


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
    cover = np.zeros(n_points, dtype=np.float64)
    if method == "lazy":
        return _lazy(SPARSE, _EMPTY_SIM, indptr, points, values, bounds, cover, k)
    sample = stochastic_sample_size(n, k, epsilon)
    return _stochastic(SPARSE, _EMPTY_SIM, indptr, points, values, bounds, cover, k, sample, seed)


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


@njit(cache=True, fastmath=True)
def _distance_row(
    row: np.ndarray, sq_a: float, sq_all: np.ndarray, self_at: int, scale: float, exp_kernel: bool, bits: np.ndarray
) -> None:
    """In place: dot products of one point with all (float32 (n,)) become exp(scale * distance) when
    ``exp_kernel``, else scale * distance; the point's own entry is distance 0."""
    s32 = np.float32(scale)
    for j in range(row.shape[0]):
        d2 = sq_a + sq_all[j] - np.float32(2.0) * row[j]
        row[j] = np.sqrt(max(d2, np.float32(0.0))) * s32
    row[self_at] = 0.0
    if exp_kernel:
        _exp_nonpositive(row, bits)


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
    for a in prange(g.shape[0]):
        _distance_row(g[a], sq_rows[a], sq_all, row0 + a, scale, exp_kernel, np.empty(m, dtype=np.int32))


STEPS_MAX = 65535  # the largest fixed-point step (uint16)


@njit(cache=True, parallel=True, fastmath=True)
def gram_to_steps(
    g: np.ndarray,
    sq_rows: np.ndarray,
    sq_cols: np.ndarray,
    scale: float,
    exp_kernel: bool,
    base: float,
    inv_unit: float,
    steps: np.ndarray,
    row0: int,
    sums: np.ndarray,
    lows: np.ndarray,
) -> None:
    """One block of the fixed-point kernel, rows row0.. from column row0 on (the diagonal block and the
    upper triangle's panel to its right): the dot products g[a, j] = x_(row0+a) . x_(row0+j) (float32 (b, m),
    overwritten) become values as in ``gram_to_similarity``, then
    steps[row0 + a, row0 + j] = round((value - base) * inv_unit), clipped to [0, STEPS_MAX].

    Adds each row's sum of these steps to sums[row0 + a] (float64, exact: integers) and writes its smallest
    step to lows[row0 + a] (int64).
    """
    m = g.shape[1]
    b32 = np.float32(base)
    i32 = np.float32(inv_unit)
    top = np.float32(STEPS_MAX)
    for a in prange(g.shape[0]):
        row = g[a]
        _distance_row(row, sq_rows[a], sq_cols, a, scale, exp_kernel, np.empty(m, dtype=np.int32))
        out = steps[row0 + a, row0 : row0 + m]
        total = np.int64(0)
        low = np.int64(STEPS_MAX)
        for j in range(m):
            q = np.int64(min(max((row[j] - b32) * i32 + np.float32(0.5), np.float32(0.0)), top))
            out[j] = q
            total += q
            low = min(low, q)
        sums[row0 + a] += total
        lows[row0 + a] = low


# Columns mirrored together: the block's rows share their cache lines across this many uint16 columns.
_MIRROR_COLS = 32


@njit(cache=True, parallel=True)
def mirror_steps(steps: np.ndarray, lo: int, hi: int, sums: np.ndarray) -> None:
    """steps[hi:, lo:hi] = steps[lo:hi, hi:].T (the lower triangle's panel from the upper's), adding each
    mirrored row's part to sums (float64 (n,), exact)."""
    n = steps.shape[0]
    tiles = (n - hi + _MIRROR_COLS - 1) // _MIRROR_COLS
    for t in prange(tiles):
        c0 = hi + t * _MIRROR_COLS
        for c in range(c0, min(c0 + _MIRROR_COLS, n)):
            dst = steps[c]
            total = 0
            for r in range(lo, hi):
                v = steps[r, c]
                dst[r] = v
                total += v
            sums[c] += total


@njit(cache=True, fastmath=True)
def _group_kernel(x: np.ndarray, rows: np.ndarray, exp_kernel: bool) -> np.ndarray:
    """Dense kernel of the rows ``rows`` of ``x``: float32 (m, m), exactly symmetric in distance."""
    m = rows.shape[0]
    d = x.shape[1]
    # Transposed gather, zero-padded to whole vectors: the inner loop runs over contiguous points with no
    # scalar remainder. With the exp over the whole matrix at once, about 40% faster at 50 points.
    mp = (m + 15) // 16 * 16
    xt = np.zeros((d, mp), dtype=np.float32)
    for a in range(m):
        for c in range(d):
            xt[c, a] = x[rows[a], c]
    sim = np.empty((m, m), dtype=np.float32)
    acc = np.empty(mp, dtype=np.float32)
    for a in range(m):
        for b in range(mp):
            acc[b] = 0.0
        for c in range(d):
            v = xt[c, a]
            xc = xt[c]
            for b in range(mp):
                diff = v - xc[b]
                acc[b] += diff * diff
        acc[a] = 0.0
        row = sim[a]
        for b in range(m):
            row[b] = np.sqrt(acc[b])
    flat = sim.reshape(m * m)
    if exp_kernel:
        neg_inv_d = np.float32(-1.0 / d)
        for i in range(m * m):
            flat[i] *= neg_inv_d
        _exp_nonpositive(flat, np.empty(m * m, dtype=np.int32))
    else:
        top = flat.max()
        for i in range(m * m):
            flat[i] = top - flat[i]
    return sim


@njit(cache=True, fastmath=True)
def _tracked_greedy(sim: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Greedy on a small symmetric kernel (float32 (m, m)) with every candidate's gain kept current:
    (order int64 (k,), gains float64 (k,), cluster sizes float32 (k,)), the lowest index winning a tie.

    Row i is also column i, so when point i's coverage rises from ``old`` to ``new`` one contiguous pass
    updates every candidate's gain by what it can no longer add to i. On the CREST groups (50 points, budget
    13) the gains are close together and lazy evaluation re-evaluates about 10 candidates per pick; this
    costs about half as much, and matches lazy greedy up to 512 points. The same pass records which pick
    covers each point best (the earliest on a tie), so the cluster sizes need no second search.
    """
    m = sim.shape[0]
    cover = np.zeros(m, dtype=np.float32)
    gains = np.zeros(m, dtype=np.float64)
    taken = np.zeros(m, dtype=np.bool_)
    owner = np.zeros(m, dtype=np.int64)  # a point no pick covers above 0 (maxdist's farthest) joins the first
    order = np.empty(k, dtype=np.int64)
    picked = np.empty(k, dtype=np.float64)
    for i in range(m):
        row = sim[i]
        for c in range(m):
            gains[c] += max(row[c], np.float32(0.0))
    for step in range(k):
        best = -1
        for c in range(m):
            if not taken[c] and (best < 0 or gains[c] > gains[best]):
                best = c
        order[step] = best
        picked[step] = gains[best]
        taken[best] = True
        pick = sim[best]
        for i in range(m):
            new, old = pick[i], cover[i]
            if new > old:
                cover[i] = new
                owner[i] = step
                row = sim[i]
                for c in range(m):
                    gains[c] -= max(row[c] - old, np.float32(0.0)) - max(row[c] - new, np.float32(0.0))
    return order, picked, cluster_sizes(owner, order)


@njit(cache=True)
def cluster_sizes(owner: np.ndarray, order: np.ndarray) -> np.ndarray:
    """Cluster sizes, float32 (k,), from each point's covering pick (int64 (m,) positions in ``order``);
    a selected point always belongs to its own cluster (``owner`` is overwritten at the picks)."""
    k = order.shape[0]
    for t in range(k):
        owner[order[t]] = t
    counts = np.zeros(k, dtype=np.float32)
    for i in range(owner.shape[0]):
        counts[owner[i]] += 1
    return counts


@njit(cache=True)
def _nearest_pick(sim: np.ndarray, order: np.ndarray) -> np.ndarray:
    """For each point, the position in ``order`` of the pick most similar to it (the earliest on a tie):
    int64 (m,)."""
    m = sim.shape[0]
    owner = np.zeros(m, dtype=np.int64)
    best = np.full(m, -np.inf, dtype=np.float32)
    for t in range(order.shape[0]):
        row = sim[order[t]]
        for i in range(m):
            if row[i] > best[i]:
                best[i] = row[i]
                owner[i] = t
    return owner


@njit(cache=True, parallel=True)
def _select_groups(
    x: np.ndarray,
    members: np.ndarray,
    offsets: np.ndarray,
    budgets: np.ndarray,
    exp_kernel: bool,
    stochastic: bool,
    sample_mult: float,
    seeds: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    # Groups are independent and each writes its own output slice (from starts[g]), so they run in parallel with
    # the same result as in order. Called from Python only (a parallel function must not be nested).
    groups = offsets.shape[0] - 1
    starts = np.zeros(groups + 1, dtype=np.int64)
    for g in range(groups):
        starts[g + 1] = starts[g] + budgets[g]
    out_idx = np.empty(starts[groups], dtype=np.int64)
    out_w = np.empty(starts[groups], dtype=np.float32)
    out_gain = np.empty(starts[groups], dtype=np.float64)
    for g in prange(groups):
        rows = members[offsets[g] : offsets[g + 1]]
        m = rows.shape[0]
        k = budgets[g]
        out = starts[g]
        sim = _group_kernel(x, rows, exp_kernel)
        if stochastic:
            cover = np.zeros(m, dtype=np.float64)
            bounds = np.empty(m, dtype=np.float64)
            for j in range(m):
                bounds[j] = _dense_gain(sim, j, cover)
            sample = min(m, max(1, int(math.ceil(m / k * sample_mult))))  # noqa: RUF046 (numba typing)
            order, gains, _ = _stochastic(DENSE, sim, _EMPTY_I, _EMPTY_I, _EMPTY_F, bounds, cover, k, sample, seeds[g])
            counts = cluster_sizes(_nearest_pick(sim, order), order)
        else:
            order, gains, counts = _tracked_greedy(sim, k)
        for t in range(k):
            out_idx[out + t] = rows[order[t]]
            out_w[out + t] = counts[t]
            out_gain[out + t] = gains[t]
    return out_idx, out_w, out_gain


def select_groups(
    x: np.ndarray,
    members: np.ndarray,
    offsets: np.ndarray,
    budgets: np.ndarray,
    similarity: str,
    method: str,
    epsilon: float,
    seeds: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Select ``budgets[g]`` points from each group ``members[offsets[g]:offsets[g + 1]]`` of rows of ``x``.

    Args:
        x: float32 (n, d) embeddings.
        members: int64 row indices, grouped.
        offsets: int64 (g + 1,) group boundaries in ``members``.
        budgets: int64 (g,) per-group budgets, 1 <= budget <= group size.
        similarity: "exp" or "maxdist"; method: "lazy" or "stochastic" (group g seeded with ``seeds[g]``).
        seeds: int64 (g,) stochastic greedy's seed per group (lazy reads none: may be empty).

    Returns:
        (indices int64, weights float32, gains float64), each (sum(budgets),), groups in order.
    """
    return _select_groups(  # type: ignore[no-any-return]
        np.ascontiguousarray(x, dtype=np.float32),
        members,
        offsets,
        budgets,
        similarity == "exp",
        method == "stochastic",
        math.log(1.0 / epsilon),
        seeds,
    )
