"""Warm-up rounds: synthetic selection work that makes a process compile, or load from numba's on-disk cache,
every kernel a real round calls, so that the service's first round does not wait for it.

numba compiles a kernel at its first call with each new set of argument types, once per process. On a fresh
cache (a new install, a new container image) the selection kernels took 16 s to compile on 2 cores (13 s for
CREST-shaped rounds, 3 s more for the dense path), and without a warm-up the first round that needs them pays.
Each backend runs these rounds on every worker before the server reports ready (``SelectionBackend.warm_up``),
through the path real work takes: ``tasks.run_task`` on a share, sent the way real shares are sent. That matters
for the argument types: Ray hands an actor its share read-only, and numba compiles read-only arrays apart.

Coverage, against what a round can reach:
- both similarities of ``similarity.KERNELS`` (one compiled specialisation today, since the kernel is a flag);
- both paths of ``coreset._select``: class groups of at most ``BATCH_MAX`` points, selected together in one
  compiled call (CREST's shape), and a larger group on the fixed-point dense kernel (reached when a subset holds
  more than ``BATCH_MAX`` points of a class, e.g. subset_fraction 0.5 on 13,000 examples of 10 classes);
- the session's subset drawing (``warm_subset_drawing``), in the server process, where sessions draw rounds
  (compiling it took 4 s on a fresh cache: the server runs it while the workers warm up).
Not covered: the kNN path, reached only by groups above ``coreset.DENSE_MAX`` (16,384) points of one class in
one subset. A warm-up would have to select such a group (seconds per worker at every start), and a round that
large spends seconds selecting anyway.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import numpy as np

from selector_service._greedy import BATCH_MAX
from selector_service.rounds import Round
from selector_service.similarity import KERNELS
from selector_service.subsets import class_balanced_subsets
from selector_service.tasks import RoundInput, SelectionTask, run_task

log = logging.getLogger(__name__)

SESSION_ID = "warm-up"  # the session id on warm-up batches (never a real session's: those are hex digests)
_CLASSES = 2
# Per-class quota of the small-group rounds (selected together, like CREST's 50-point classes) and of the
# dense rounds: one point above BATCH_MAX, the smallest group that takes the fixed-point dense path.
_SMALL_QUOTA = 16
_DENSE_QUOTA = BATCH_MAX + 1
_SUBSETS = 2  # stacked shares of several subsets, as a real round's are
_BATCH_SIZE = 4  # coreset size m: at least one per class
_DIM = 16


def _labels() -> np.ndarray:
    """int64 (N,) labels as a session holds them: ``_CLASSES`` classes of ``_DENSE_QUOTA`` examples."""
    return np.repeat(np.arange(_CLASSES, dtype=np.int64), _DENSE_QUOTA)


def warmup_rounds() -> list[RoundInput]:
    """The warm-up's rounds, one per similarity and selection path, built as a session builds a round
    (``rounds.Round.selection_input``), their embeddings seeded noise (float32, as decoded from the wire). Each
    fits in one share (``tasks.CHUNK_ROWS``). Their subsets take a fixed number of ids per class, as a session's
    do; they are drawn with numpy, so building them compiles nothing."""
    labels = _labels()
    by_class = [np.flatnonzero(labels == c) for c in range(_CLASSES)]
    rng = np.random.default_rng(0)
    rounds: list[RoundInput] = []
    for round_id, (similarity, quota) in enumerate((s, q) for s in KERNELS for q in (_SMALL_QUOTA, _DENSE_QUOTA)):
        subsets = [np.sort(np.concatenate([rng.permutation(ids)[:quota] for ids in by_class])) for _ in range(_SUBSETS)]
        rnd = Round(round_id, 0, subsets, np.unique(np.concatenate(subsets)))
        embeddings = rng.normal(size=(len(rnd.ids), _DIM)).astype(np.float32)
        rounds.append(rnd.selection_input(SESSION_ID, labels, embeddings, _BATCH_SIZE, similarity))
    return rounds


def warmup_tasks() -> list[SelectionTask]:
    """``warmup_rounds``, each as the one share a worker would be dealt."""
    return [work.share(range(len(work.subset_rows))) for work in warmup_rounds()]


def warm_subset_drawing() -> None:
    """Compile, or load, the session's subset drawing in this process: ``subsets.class_balanced_subsets`` with a
    session's argument types (int64 labels, a bool active pool)."""
    labels = _labels()
    class_balanced_subsets(
        labels, np.ones(len(labels), dtype=np.bool_), _SMALL_QUOTA, _SUBSETS, np.random.default_rng(0)
    )


def fill_cache() -> float:
    """Compile every kernel a round calls into numba's on-disk cache (``NUMBA_CACHE_DIR``), then return the
    seconds it took. For container images: their build runs ``python -m selector_service.warmup``, so that a
    server or actor started from the image loads the kernels instead of compiling them (16 s on 2 cores). Each
    warm-up share runs as a thread of the local backend gets it (writable) and as Ray hands it to an actor (read
    only, a separate specialisation); then the subset drawing."""
    start = time.perf_counter()
    for task in warmup_tasks():
        run_task(task, SESSION_ID)
        run_task(_read_only(task), SESSION_ID)
    warm_subset_drawing()
    return time.perf_counter() - start


def _read_only(task: SelectionTask) -> SelectionTask:
    """``task`` with read-only copies of its arrays, as an actor receives them from Ray's object store."""
    arrays = {}
    for field in ("offsets", "ids", "labels", "embeddings"):
        array = getattr(task, field).copy()
        array.flags.writeable = False
        arrays[field] = array
    return dataclasses.replace(task, **arrays)


if __name__ == "__main__":
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log.info("filled numba's cache with the selection kernels in %.1f s", fill_cache())
