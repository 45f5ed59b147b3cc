"""Where selection runs. A backend takes a round's selection input (``tasks.RoundInput``) and returns one future
per random subset. It deals the round out in contiguous shares, one per worker call (``tasks.deal``), each
stacked once and selected in one engine call: on CREST-sized subsets one call's fixed cost (a Ray round trip,
the engine's setup) is larger than a subset's selection.

Backends are chosen by name from ``BACKENDS``: ``ray`` (the service default: Ray actors, local or on a
cluster) and ``local`` (a thread pool in this process, for library use and tests of the maths). ``ray`` is
imported only when the Ray backend is built, and only by ``ray_backend``.

A server warms its backend before it reports ready (``warm_up``): every worker compiles, or loads from numba's
on-disk cache, the kernels a round calls (``warmup``), so the first round does not wait seconds for them.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Protocol

from selector_service.tasks import Batch, RoundInput, deal, fan_out, run_task
from selector_service.warmup import warmup_tasks

log = logging.getLogger(__name__)


class SelectionBackend(Protocol):
    """Runs a round's selection somewhere and hands back futures."""

    name: str

    def submit(self, work: RoundInput) -> list[Future[Batch]]:
        """Start selecting a round; one future per subset, in subset order. Raises ``SelectorFailure``, having
        started nothing, when it cannot take the round (closed, no workers)."""
        ...

    def warm_up(self) -> float:
        """Make every worker compile, or load from numba's on-disk cache, every kernel a round calls, by selecting
        the synthetic rounds of ``warmup`` the way real work is selected; workers added later warm before they take
        work. Returns the seconds it took (also in ``describe()["warmup_s"]``). Raises when a worker cannot."""
        ...

    def describe(self) -> dict[str, Any]: ...

    def close(self) -> None: ...


# Whether this process has run the warm-up on a local backend: numba's compiled kernels belong to the process
# and every thread shares them, so later local backends (tests build many servers) have nothing left to warm.
_local_warm_lock = threading.Lock()
_local_warm = threading.Event()


class LocalBackend:
    """Selection in a thread pool of this process (FAISS and numpy release the GIL in their kernels)."""

    name = "local"

    def __init__(self, num_workers: int = 2) -> None:
        num_workers = num_workers or os.cpu_count() or 1  # 0: one thread per core
        self._pool = ThreadPoolExecutor(max_workers=num_workers, thread_name_prefix="selector")
        self._num_workers = num_workers
        self._worker_names = itertools.cycle([f"local-{os.getpid()}-{i}" for i in range(num_workers)])
        self._warmup_s: float | None = None

    def submit(self, work: RoundInput) -> list[Future[Batch]]:
        return [
            f
            for task in deal(work, self._num_workers)
            for f in fan_out(self._pool.submit(run_task, task, next(self._worker_names)), task.num_subsets)
        ]

    def warm_up(self) -> float:
        """Run the warm-up shares in a pool thread once per process; 0 s when an earlier local backend did."""
        start = time.perf_counter()
        with _local_warm_lock:  # a backend warming meanwhile waits for the first, then has nothing left to do
            if not _local_warm.is_set():
                for task in warmup_tasks():
                    self._pool.submit(run_task, task, "warm-up").result()
                _local_warm.set()
                log.info(
                    "warmed %d selector threads in %.2f s (one set of compiled kernels per process)",
                    self._num_workers,
                    time.perf_counter() - start,
                )
        self._warmup_s = time.perf_counter() - start
        return self._warmup_s

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "workers": self._num_workers, "warmup_s": self._warmup_s}

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
