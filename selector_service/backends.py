"""Where selection runs. A backend takes one ``SelectionTask`` (one random subset) and returns a future.

Backends are chosen by name from ``BACKENDS``: ``ray`` (the service default: Ray actors, local or on a
cluster) and ``local`` (a thread pool in this process, for library use and tests of the maths). ``ray`` is
imported only when the Ray backend is built.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from selector_service.coreset import minibatch_coreset


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


def run_task(task: SelectionTask, worker: str) -> SelectionResult:
    """Select the task's coreset in the calling process."""
    c = minibatch_coreset(task.ids, task.labels, task.embeddings, task.batch_size, task.similarity)
    return SelectionResult(task.subset_index, c.ids, c.weights, c.selection_ms, worker)


class SelectionBackend(Protocol):
    """Runs selection tasks somewhere and hands back futures."""

    name: str

    def submit(self, task: SelectionTask) -> Future[SelectionResult]: ...

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

    def submit(self, task: SelectionTask) -> Future[SelectionResult]:
        return self._pool.submit(run_task, task, next(self._worker_names))

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "workers": self._num_workers}

    def close(self) -> None:
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
