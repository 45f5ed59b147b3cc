"""Where selection runs. A backend takes a round's selection input (``tasks.RoundInput``) and returns one future
per random subset. It deals the round out in contiguous shares, one per worker call (``tasks.deal``), each
stacked once and selected in one engine call: on CREST-sized subsets one call's fixed cost (a Ray round trip,
the engine's setup) is larger than a subset's selection.

Backends are chosen by name from ``BACKENDS``: ``ray`` (the service default: Ray actors, local or on a
cluster) and ``local`` (a thread pool in this process, for library use and tests of the maths). ``ray`` is
imported only when the Ray backend is built, and only by ``ray_backend``.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Protocol

from selector_service.tasks import Batch, RoundInput, deal, fan_out, run_task


class SelectionBackend(Protocol):
    """Runs a round's selection somewhere and hands back futures."""

    name: str

    def submit(self, work: RoundInput) -> list[Future[Batch]]:
        """Start selecting a round; one future per subset, in subset order. Raises ``SelectorFailure``, having
        started nothing, when it cannot take the round (closed, no workers)."""
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

    def submit(self, work: RoundInput) -> list[Future[Batch]]:
        return [
            f
            for task in deal(work, self._num_workers)
            for f in fan_out(self._pool.submit(run_task, task, next(self._worker_names)), task.num_subsets)
        ]

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "workers": self._num_workers}

    def close(self) -> None:
        self._num_workers = 0  # a later submit fails with SelectorFailure
        self._pool.shutdown(wait=True, cancel_futures=True)


def _ray_backend(**kwargs: Any) -> SelectionBackend:
    from selector_service.ray_backend import RayBackend  # ray loads here, when a Ray backend is asked for

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
