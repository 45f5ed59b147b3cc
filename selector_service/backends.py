"""Where selection runs. A backend takes a round's ``SelectionTask``s (one per random subset) and returns a
future per task. It hands each worker a contiguous share of the round in one call (``chunks``), which the
engine selects together (``minibatch_coresets``): on CREST-sized subsets one call's fixed cost (a Ray round
trip, the engine's setup) is larger than a subset's selection.

Backends are chosen by name from ``BACKENDS``: ``ray`` (the service default: Ray actors, local or on a
cluster) and ``local`` (a thread pool in this process, for library use and tests of the maths). ``ray`` is
imported only when the Ray backend is built.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from selector_service.coreset import minibatch_coresets
from selector_service.errors import SelectorFailure


@dataclass(frozen=True)
class SelectionTask:
    """One random subset to select a mini-batch coreset from.

    Attributes:
        session_id, round_id, subset_index: which batch this becomes.
        ids: int64 (r,) example ids of the subset.
        labels: int64 (r,) their classes.
        embeddings: float32 (r, d) their gradient embeddings.
        batch_size: coreset size m.
        similarity: a key of ``similarity.KERNELS``.
    """

    session_id: str
    round_id: int
    subset_index: int
    ids: np.ndarray
    labels: np.ndarray
    embeddings: np.ndarray
    batch_size: int
    similarity: str


@dataclass(frozen=True)
class SelectionResult:
    """The coreset of one task. ``weights`` are float32, positive, mean 1; ``worker`` names who selected it."""

    subset_index: int
    ids: np.ndarray
    weights: np.ndarray
    selection_ms: float
    worker: str


def run_tasks(tasks: Sequence[SelectionTask], worker: str) -> list[SelectionResult]:
    """Select the tasks' coresets in the calling process, together. The tasks are one round's (one session's
    batch size and kernel)."""
    coresets = minibatch_coresets(
        [t.ids for t in tasks],
        [t.labels for t in tasks],
        [t.embeddings for t in tasks],
        tasks[0].batch_size,
        tasks[0].similarity,
    )
    return [
        SelectionResult(t.subset_index, c.ids, c.weights, c.selection_ms, worker)
        for t, c in zip(tasks, coresets, strict=True)
    ]


# Rows one worker call selects at most, unless a single subset is larger: bounds how long the round's first
# batches wait behind the others in the same call (about 10 ms of selection at 50-point classes).
CHUNK_ROWS = 8192


def chunks(tasks: Sequence[SelectionTask], workers: int) -> list[list[SelectionTask]]:
    """Split a round's tasks into contiguous shares: near-equal, one per worker (fewer when there are fewer
    tasks, the smaller ones first), each then cut where it would pass ``CHUNK_ROWS`` rows."""
    if workers < 1 and tasks:
        raise SelectorFailure(f"no selector workers to select {len(tasks)} subsets (the backend is closed or empty)")
    count = min(len(tasks), workers)
    out: list[list[SelectionTask]] = []
    for a, b in itertools.pairwise([i * len(tasks) // count for i in range(count + 1)] if count else [0]):
        share: list[SelectionTask] = []
        rows = 0
        for t in tasks[a:b]:
            if share and rows + len(t.ids) > CHUNK_ROWS:
                out.append(share)
                share, rows = [], 0
            share.append(t)
            rows += len(t.ids)
        out.append(share)
    return out


def fan_out(call: Future[list[SelectionResult]], size: int) -> list[Future[SelectionResult]]:
    """One future per task of a call that selects ``size`` tasks: each resolves with its result, or with the
    call's exception. A task future cancelled by its caller stays cancelled."""
    futures: list[Future[SelectionResult]] = [Future() for _ in range(size)]

    def settle(done: Future[list[SelectionResult]]) -> None:
        try:
            results = done.result()
            if len(results) != size:
                raise RuntimeError(f"a selector returned {len(results)} results for {size} tasks")
        except BaseException as exc:
            for f in futures:
                if f.set_running_or_notify_cancel():
                    f.set_exception(exc)
            return
        for f, r in zip(futures, results, strict=True):
            if f.set_running_or_notify_cancel():
                f.set_result(r)

    call.add_done_callback(settle)
    return futures


class SelectionBackend(Protocol):
    """Runs selection tasks somewhere and hands back futures."""

    name: str

    def submit(self, tasks: Sequence[SelectionTask]) -> list[Future[SelectionResult]]:
        """Start selecting a round's tasks; one future per task, in the same order."""
        ...

    def describe(self) -> dict[str, Any]: ...

    def close(self) -> None: ...


class LocalBackend:
    """Selection in a thread pool of this process (FAISS and numpy release the GIL in their kernels)."""

    name = "local"

    def __init__(self, num_workers: int = 2) -> None:
        num_workers = num_workers or os.cpu_count() or 1  # 0: one thread per core
        self._pool = ThreadPoolExecutor(max_workers=num_workers, thread_name_prefix="selector")
        self._num_workers = num_workers
        self._worker_names = itertools.cycle([f"local-{os.getpid()}-{i}" for i in range(num_workers)])

    def submit(self, tasks: Sequence[SelectionTask]) -> list[Future[SelectionResult]]:
        return [
            f
            for share in chunks(tasks, self._num_workers)
            for f in fan_out(self._pool.submit(run_tasks, share, next(self._worker_names)), len(share))
        ]

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "workers": self._num_workers}

    def close(self) -> None:
        self._num_workers = 0  # a later submit fails with SelectorFailure
        self._pool.shutdown(wait=True, cancel_futures=True)


def _ray_backend(**kwargs: Any) -> SelectionBackend:
    from selector_service.ray_backend import RayBackend

    return RayBackend(**kwargs)


BACKENDS: dict[str, Callable[..., SelectionBackend]] = {
    "local": LocalBackend,
    "ray": _ray_backend,
}


def make_backend(name: str, **kwargs: Any) -> SelectionBackend:
    """Build the backend called ``name`` (a key of ``BACKENDS``) with its keyword options."""
    if name not in BACKENDS:
        raise ValueError(f"unknown selection backend {name!r}; expected one of {sorted(BACKENDS)}")
    return BACKENDS[name](**kwargs)
