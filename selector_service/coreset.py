"""Coreset selection on embeddings: per-class facility location and CREST mini-batch coresets.

Pure numpy plus FAISS; no gRPC, Ray or torch.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from selector_service._buffers import borrowed
from selector_service._greedy import BATCH_MAX, select_groups
from selector_service.errors import InvalidArgument
from selector_service.facility_location import (
    Coreset,
    check_method,
    quantized_facility_location,
    sparse_facility_location,
)
from selector_service.similarity import check_kernel, knn_coverage, quantized_similarity
from selector_service.subsets import plan_groups

log = logging.getLogger(__name__)

_NO_SEEDS = np.zeros(0, dtype=np.int64)  # lazy greedy draws nothing
_EPSILON = 0.1  # stochastic greedy's epsilon in mini-batch coresets (select_coreset's default)


# Largest ground set (per class) selected on a dense kernel by default: 2 n^2 bytes = 512 MiB at this size.
DENSE_MAX = 16_384
# Above this many points (per class) the automatic kNN path uses an IVF index instead of an exact one.
EXACT_KNN_MAX = 20_000


def auto_neighbours(n: int, k: int) -> int:
    """K for the kNN path: about 2.5 x the mean cluster size n / k, at least 64, at most n.

    Measured (shared/reference/facility-location.md): K of 2-3 n/k keeps greedy within ~0.3% of the dense result.
    """
    return int(min(n, max(64, -(-5 * n // (2 * k)))))


def _select_group(
    x: np.ndarray, k: int, method: str, similarity: str, knn: int | None, seed: int, epsilon: float
) -> Coreset:
    n = x.shape[0]
    if knn == 0 or (knn is None and n <= DENSE_MAX):
        with borrowed(n) as steps:  # the coreset keeps no reference to the kernel
            kernel = quantized_similarity(x, similarity, out=steps)
            return quantized_facility_location(kernel, k, method, epsilon=epsilon, seed=seed)
    neighbours = knn if knn is not None else auto_neighbours(n, k)
    coverage = knn_coverage(x, neighbours, similarity, approximate=knn is None and n > EXACT_KNN_MAX, seed=seed)
    return sparse_facility_location(coverage, x, k, method, epsilon=epsilon, seed=seed)


def _check_options(method: str, similarity: str, knn: int | None, epsilon: float) -> None:
    check_method(method, epsilon)  # each budget is checked with its ground set
    check_kernel(similarity)
    if knn is not None and knn < 0:
        raise InvalidArgument(f"knn must be None (automatic), 0 (dense) or a neighbour count > 0, received {knn}")


def _check_labels(labels: np.ndarray, n: int) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.shape != (n,):
        raise InvalidArgument(f"labels must have shape ({n},) to match the embeddings, received {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise InvalidArgument(f"labels must be integers, received dtype {labels.dtype}")
    return labels


def _stack(
    embeddings: Sequence[np.ndarray], ks: Sequence[int], labels: Sequence[np.ndarray] | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validate the ground sets and stack them: (x float32 (n, d), labels int64 (n,), rows int64 (P + 1,)).
    An error names the ground set by position when there are several."""
    count = len(embeddings)
    xs: list[np.ndarray] = []
    ys: list[np.ndarray] = []
    for i in range(count):
        try:
            x = np.asarray(embeddings[i])
            if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
                raise InvalidArgument(f"embeddings must be a non-empty (n, d) array, received shape {x.shape}")
            if x.shape[1] != np.shape(embeddings[0])[1]:
                raise InvalidArgument(
                    f"all ground sets must have one width, received d={x.shape[1]} after d={xs[0].shape[1]}"
                )
            if not 1 <= ks[i] <= x.shape[0]:
                raise InvalidArgument(f"budget k={ks[i]} must be between 1 and the ground-set size {x.shape[0]}")
            ys.append(np.zeros(x.shape[0], np.int64) if labels is None else _check_labels(labels[i], x.shape[0]))
            xs.append(x)
        except InvalidArgument as exc:
            raise InvalidArgument(f"ground set {i}: {exc}" if count > 1 else str(exc)) from exc
    x = np.ascontiguousarray(np.concatenate(xs) if count > 1 else xs[0], dtype=np.float32)
    rows = np.array([0, *itertools.accumulate(len(y) for y in ys)], dtype=np.int64)
    _check_finite(x, rows)
    y = np.concatenate(ys) if count > 1 else ys[0]
    return x, y.astype(np.int64, copy=False), rows


def _check_stacked(
    embeddings: np.ndarray, labels: np.ndarray, rows: np.ndarray, ks: Sequence[int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validate ground sets already stacked (``rows`` int64 (P + 1,) their boundaries); the same checks and
    messages as ``_stack``, without a copy of a float32 C-contiguous ``embeddings``."""
    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] == 0:
        raise InvalidArgument(f"embeddings must be a non-empty (n, d) array, received shape {x.shape}")
    rows = np.asarray(rows, dtype=np.int64)
    if rows.ndim != 1 or len(rows) != len(ks) + 1 or rows[0] != 0 or rows[-1] != len(x):
        raise InvalidArgument(
            f"offsets must be {len(ks) + 1} increasing row positions from 0 to {len(x)}, received {rows.tolist()[:8]}"
        )
    count = len(ks)
    for i in range(count):
        size = int(rows[i + 1] - rows[i])
        where = f"ground set {i}: " if count > 1 else ""
        if size <= 0:
            raise InvalidArgument(
                f"{where}embeddings must be a non-empty (n, d) array, received shape {(size, x.shape[1])}"
            )
        if not 1 <= ks[i] <= size:
            raise InvalidArgument(f"{where}budget k={ks[i]} must be between 1 and the ground-set size {size}")
    y = _check_labels(labels, len(x))
    _check_finite(x, rows)
    return x, y.astype(np.int64, copy=False), rows


def _check_finite(x: np.ndarray, rows: np.ndarray) -> None:
    if not np.isfinite(x).all():
        row, col = np.argwhere(~np.isfinite(x))[0]
        i = int(np.searchsorted(rows, row, side="right")) - 1
        where = f"ground set {i}: " if len(rows) > 2 else ""
        raise InvalidArgument(
            f"{where}embeddings must be finite, received {x[row, col]} at row {row - rows[i]}, col {col}"
        )


def _select(
    x: np.ndarray,
    y: np.ndarray,
    rows: np.ndarray,
    ks: Sequence[int],
    method: str,
    similarity: str,
    knn: int | None,
    seed: int,
    epsilon: float,
) -> list[Coreset]:
    """Coresets of stacked, validated ground sets (``_stack`` or ``_check_stacked``), positions within each."""
    members, offsets, budgets, first_group, status = plan_groups(y, rows, np.asarray(ks, dtype=np.int64))
    if status[0] >= 0:
        i = int(status[0])
        classes = len(np.unique(y[rows[i] : rows[i + 1]]))
        where = f"ground set {i}: " if len(ks) > 1 else ""
        raise InvalidArgument(
            f"{where}budget {ks[i]} must be between the number of classes present ({classes}) and the ground-set "
            f"size ({rows[i + 1] - rows[i]})"
        )
    groups = len(budgets)
    if method != "naive" and not knn and status[1] <= BATCH_MAX:
        seeds = _NO_SEEDS
        if method == "stochastic":  # seeds count groups within each ground set: the same coreset in any call
            seeds = seed + np.arange(groups, dtype=np.int64) - np.repeat(first_group[:-1], np.diff(first_group))
        idx, weights, gains = select_groups(x, members, offsets, budgets, similarity, method, epsilon, seeds)
    else:
        parts = [
            _select_group(
                x[members[offsets[g] : offsets[g + 1]]], int(budgets[g]), method, similarity, knn, seed, epsilon
            )
            for g in range(groups)
        ]
        idx = np.concatenate([members[offsets[g] : offsets[g + 1]][p.indices] for g, p in enumerate(parts)])
        weights = np.concatenate([p.weights for p in parts])
        gains = np.concatenate([p.gains for p in parts])
    if len(ks) == 1:
        return [Coreset(indices=idx, weights=weights, gains=gains)]
    picks = [0, *itertools.accumulate(ks)]
    return [
        Coreset(indices=idx[a:b] - r, weights=weights[a:b], gains=gains[a:b])
        for a, b, r in zip(picks[:-1], picks[1:], rows, strict=False)
    ]


def select_coreset(
    embeddings: np.ndarray,
    k: int,
    *,
    labels: np.ndarray | None = None,
    method: str = "lazy",
    similarity: str = "exp",
    knn: int | None = None,
    seed: int = 0,
    epsilon: float = 0.1,
) -> Coreset:
    """Select ``k`` weighted representatives of ``embeddings`` by facility location.

    With ``labels`` the selection runs per class, the budget split by class share (at least one per class
    present), and every cluster stays within its class.

    Args:
        embeddings: float32 (n, d) finite rows.
        k: number to select, between the number of classes present (1 without labels) and n.
        labels: optional int (n,) class of each row.
        method: ``"lazy"`` (exact greedy), ``"stochastic"`` (lazier than lazy, see ``epsilon``) or ``"naive"``
            (the reference).
        similarity: ``"exp"`` (CREST) or ``"maxdist"`` (CRAIG); see ``similarity.KERNELS``.
        knn: ``None`` chooses: a dense kernel up to ``DENSE_MAX`` points per class (groups of at most
            ``BATCH_MAX`` are all solved in one compiled call), else a kNN graph with
            ``auto_neighbours`` neighbours (exact FAISS up to ``EXACT_KNN_MAX`` points, IVF above). ``0`` forces
            the dense kernel; ``K > 0`` forces an exact kNN graph with K neighbours.
        seed: seeds stochastic greedy and the IVF training sample; same inputs and seed, same coreset.
        epsilon: stochastic greedy samples (n / k) ln(1 / epsilon) candidates per step.

    Returns:
        ``Coreset`` with row positions in selection order within each class (classes ascending), cluster sizes
        summing to n (per class: to the class size), and the marginal gains.
    """
    _check_options(method, similarity, knn, epsilon)
    x, y, rows = _stack([embeddings], [k], None if labels is None else [labels])
    return _select(x, y, rows, [k], method, similarity, knn, seed, epsilon)[0]


def select_coresets(
    embeddings: Sequence[np.ndarray],
    k: int | Sequence[int],
    *,
    labels: Sequence[np.ndarray] | None = None,
    method: str = "lazy",
    similarity: str = "exp",
    knn: int | None = None,
    seed: int = 0,
    epsilon: float = 0.1,
) -> list[Coreset]:
    """``select_coreset`` on each of several ground sets of one width, such as a CREST round's random subsets.

    The result equals ``[select_coreset(e, k_i, labels=l, ...) for ...]`` with the same keyword arguments (the
    same ``seed`` for every ground set), computed together: the grouping and budget split of every set in one
    compiled call and, when every class group has at most ``BATCH_MAX`` points, all groups in one more. On a
    CREST round (5 subsets of 10 classes x 50 points) that saves most of five calls' fixed cost, and the cores
    share out the round's 50 groups instead of one subset's 10.

    Args:
        embeddings: P float32 (n_i, d) arrays, one d for all.
        k: one budget for every ground set, or P budgets.
        labels: None, or P int (n_i,) arrays.

    Raises:
        InvalidArgument: naming the ground set (its position) whose input is wrong, or the list lengths.
    """
    ks = [int(k)] * len(embeddings) if isinstance(k, int | np.integer) else [int(b) for b in k]
    if len(ks) != len(embeddings):
        raise InvalidArgument(f"received {len(ks)} budgets for {len(embeddings)} ground sets")
    if labels is not None and len(labels) != len(embeddings):
        raise InvalidArgument(f"received {len(labels)} label arrays for {len(embeddings)} ground sets")
    if not ks:
        return []
    _check_options(method, similarity, knn, epsilon)
    x, y, rows = _stack(embeddings, ks, labels)
    return _select(x, y, rows, ks, method, similarity, knn, seed, epsilon)


@dataclass(frozen=True)
class MinibatchCoreset:
    """The weighted mini-batch coreset of one random subset.

    Attributes:
        ids: int64 (m,) example ids, unique.
        weights: float32 (m,) loss weights, positive, mean 1 over the coreset: cluster size * m / subset size, so
            the batch mean of weight * loss estimates the subset's mean loss (CRAIG's gamma, normalised as in
            CREST). This is the one place weights are normalised: the service sends them as they are, and the
            trainer uses them as they arrive.
        selection_ms: wall time of the call that selected it, in milliseconds, from the call's start until its
            coresets were ready. Coresets selected together in one call share it: none is ready before the others.
    """

    ids: np.ndarray
    weights: np.ndarray
    selection_ms: float


def minibatch_coreset(
    ids: np.ndarray,
    labels: np.ndarray,
    embeddings: np.ndarray,
    batch_size: int,
    similarity: str = "exp",
    method: str = "lazy",
) -> MinibatchCoreset:
    """CREST mini-batch coreset of one random subset (crest-algorithm.md section 3.1).

    Args:
        ids: int64 (r,) example ids of the subset.
        labels: int64 (r,) their classes.
        embeddings: float32 (r, d) their gradient embeddings.
        batch_size: coreset size m; capped at r.
    """
    return minibatch_coresets([ids], [labels], [embeddings], batch_size, similarity, method)[0]


def minibatch_coresets(
    ids: Sequence[np.ndarray],
    labels: Sequence[np.ndarray],
    embeddings: Sequence[np.ndarray],
    batch_size: int,
    similarity: str = "exp",
    method: str = "lazy",
) -> list[MinibatchCoreset]:
    """CREST mini-batch coresets of several random subsets (a round, or a selector's share of one), selected
    together by ``select_coresets``; each equals ``minibatch_coreset`` of its subset, and all share the call's
    wall time as ``selection_ms``. ``stacked_minibatch_coresets`` takes subsets already stacked in one matrix.

    Args:
        ids, labels, embeddings: P subsets' int64 (r_i,) ids, int64 (r_i,) classes, float32 (r_i, d) embeddings.
        batch_size: coreset size m; capped at each r_i.
    """
    start = time.perf_counter()
    if not len(ids) == len(labels) == len(embeddings):
        raise InvalidArgument(
            f"received {len(ids)} id arrays, {len(labels)} label arrays and {len(embeddings)} embedding arrays"
        )
    for i, (sub, emb) in enumerate(zip(ids, embeddings, strict=True)):
        if np.shape(sub) != (np.shape(emb)[0],):
            raise InvalidArgument(f"subset {i}: {np.shape(sub)} ids for embeddings of shape {np.shape(emb)}")
    if not ids:
        return []
    ks = [min(batch_size, len(sub)) for sub in ids]
    _check_options(method, similarity, None, _EPSILON)
    x, y, rows = _stack(embeddings, ks, labels)
    stacked = np.concatenate(ids) if len(ids) > 1 else np.asarray(ids[0])
    return _minibatch(start, stacked, x, y, rows, ks, similarity, method)


def stacked_minibatch_coresets(
    ids: np.ndarray,
    labels: np.ndarray,
    embeddings: np.ndarray,
    offsets: np.ndarray,
    batch_size: int,
    similarity: str = "exp",
    method: str = "lazy",
) -> list[MinibatchCoreset]:
    """``minibatch_coresets`` of P subsets stacked in one matrix (a selector's share of a round): subset i is rows
    ``offsets[i]:offsets[i + 1]``. Selected where they lie (a float32 C-contiguous matrix is not copied), with
    results identical to ``minibatch_coresets`` of the same subsets.

    Args:
        ids: int64 (n,) example ids; labels: int64 (n,) their classes.
        embeddings: float32 (n, d) their gradient embeddings.
        offsets: int64 (P + 1,) subset boundaries, 0 first and n last.
        batch_size: coreset size m; capped at each subset's size.
    """
    start = time.perf_counter()
    offsets = np.asarray(offsets, dtype=np.int64)
    if np.shape(ids) != (np.shape(embeddings)[0],):
        raise InvalidArgument(f"{np.shape(ids)} ids for embeddings of shape {np.shape(embeddings)}")
    if offsets.ndim != 1 or len(offsets) < 2:
        raise InvalidArgument(f"offsets must hold at least 2 row positions, received {offsets.tolist()[:8]}")
    ks = [min(batch_size, int(n)) for n in np.diff(offsets)]
    _check_options(method, similarity, None, _EPSILON)
    x, y, rows = _check_stacked(embeddings, labels, offsets, ks)
    return _minibatch(start, np.asarray(ids), x, y, rows, ks, similarity, method)


def _minibatch(
    start: float,
    ids: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    rows: np.ndarray,
    ks: list[int],
    similarity: str,
    method: str,
) -> list[MinibatchCoreset]:
    """Mini-batch coresets of stacked, validated subsets; ``start``: when the call began (``perf_counter``)."""
    coresets = _select(x, y, rows, ks, method, similarity, None, 0, _EPSILON)
    elapsed = (time.perf_counter() - start) * 1e3
    sizes = np.diff(rows).tolist()
    log.debug("selected %d coresets of %s from %s in %.2f ms", len(ks), ks, sizes, elapsed)
    return [
        MinibatchCoreset(
            ids=ids[r + c.indices], weights=c.weights * np.float32(k / c.weights.sum()), selection_ms=elapsed
        )
        for c, k, r in zip(coresets, ks, rows, strict=False)
    ]
