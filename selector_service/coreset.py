"""Coreset selection on embeddings: per-class facility location and CREST mini-batch coresets.

Pure numpy plus FAISS; no gRPC, Ray or torch.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass

import numpy as np
from numba import njit

from selector_service._buffers import borrowed
from selector_service._greedy import BATCH_MAX, select_groups
from selector_service.errors import InvalidArgument
from selector_service.facility_location import (
    Coreset,
    check_budget,
    quantized_facility_location,
    sparse_facility_location,
)
from selector_service.similarity import check_kernel, knn_coverage, quantized_similarity
from selector_service.subsets import split_budget

log = logging.getLogger(__name__)


def _check_embeddings(embeddings: np.ndarray) -> np.ndarray:
    x = np.asarray(embeddings)
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise InvalidArgument(f"embeddings must be a non-empty (n, d) array, received shape {x.shape}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        bad = np.argwhere(~np.isfinite(x))[0]
        raise InvalidArgument(f"embeddings must be finite, received {x[tuple(bad)]} at row {bad[0]}, col {bad[1]}")
    return x


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


@njit(cache=True)
def _class_offsets(sorted_labels: np.ndarray) -> np.ndarray:
    """Where each run of equal labels starts in ``sorted_labels``, plus the length: int64 (classes + 1,).
    Compiled: numpy's unique costs more than a whole CREST-sized selection."""
    n = sorted_labels.shape[0]
    starts = [0]
    for i in range(1, n):
        if sorted_labels[i] != sorted_labels[i - 1]:
            starts.append(i)
    starts.append(n)
    return np.array(starts, dtype=np.int64)


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
    x = _check_embeddings(embeddings)
    n = x.shape[0]
    check_kernel(similarity)
    if knn is not None and knn < 0:
        raise InvalidArgument(f"knn must be None (automatic), 0 (dense) or a neighbour count > 0, received {knn}")
    if labels is None:
        members, offsets = np.arange(n, dtype=np.int64), np.array([0, n], dtype=np.int64)
    else:
        labels = np.asarray(labels)
        if labels.shape != (n,):
            raise InvalidArgument(f"labels must have shape ({n},) to match the embeddings, received {labels.shape}")
        if not np.issubdtype(labels.dtype, np.integer):
            raise InvalidArgument(f"labels must be integers, received dtype {labels.dtype}")
        members = np.argsort(labels, kind="stable")  # rows grouped by class, ascending
        offsets = _class_offsets(labels[members].astype(np.int64, copy=False))
    sizes = offsets[1:] - offsets[:-1]
    budgets = np.array([k], dtype=np.int64) if labels is None else split_budget(sizes, k)
    check_budget(n, k, method, epsilon)
    if method != "naive" and not knn and int(sizes.max()) <= BATCH_MAX:
        idx, weights, gains = select_groups(x, members, offsets, budgets, similarity, method, epsilon, seed)
        return Coreset(indices=idx, weights=weights, gains=gains)
    groups = [members[lo:hi] for lo, hi in itertools.pairwise(offsets)]
    parts = [
        _select_group(x[g], int(b), method, similarity, knn, seed, epsilon)
        for g, b in zip(groups, budgets, strict=True)
    ]
    return Coreset(
        indices=np.concatenate([g[p.indices] for g, p in zip(groups, parts, strict=True)]),
        weights=np.concatenate([p.weights for p in parts]),
        gains=np.concatenate([p.gains for p in parts]),
    )


@dataclass(frozen=True)
class MinibatchCoreset:
    """The weighted mini-batch coreset of one random subset.

    Attributes:
        ids: int64 (m,) example ids, unique.
        weights: float32 (m,) loss weights, positive, mean 1: cluster size * m / subset size, so the batch
            mean of weight * loss estimates the subset's mean loss (CRAIG's gamma, normalised as in CREST).
        selection_ms: wall time of the selection, in milliseconds.
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
    start = time.perf_counter()
    k = min(batch_size, len(ids))
    coreset = select_coreset(embeddings, k, labels=labels, method=method, similarity=similarity)
    weights = coreset.weights * np.float32(k / coreset.weights.sum())
    elapsed = (time.perf_counter() - start) * 1e3
    log.debug("selected %d/%d in %.1f ms", k, len(ids), elapsed)
    return MinibatchCoreset(ids=np.asarray(ids)[coreset.indices], weights=weights, selection_ms=elapsed)
