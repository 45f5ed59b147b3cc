"""The loader's input pipeline: every batch it needs (training batches and the batches of its model passes) is
fetched by a torch ``DataLoader``, so decoding and augmentation run in the user's worker processes, pinned and
prefetched as a plain ``DataLoader(num_workers=W, pin_memory=True)`` would.

Selection decides *which* examples a step trains on, and it decides them on the training thread, step by step,
from the service's rounds. A ``DataLoader`` wants its batch sampler to run ahead. The two meet through a
*forecast*: when the ``DataLoader`` asks for the next batch to prefetch, the pipeline hands it, in order,

1. the batches of a model pass that has started (the embedding pass's candidates, the Taylor check's ids, the
   quadratic model's fit sample), which are known when the pass begins; and the chunks of an embedding pass the
   schedule knows ahead (``ForecastPass``: the fixed rule's pass, once its round's plan is here), right after
   the batch of the step before it; else
2. the forecast of the next training step the workers have not been given yet: its ids as the loader's schedule
   will draw them, when the schedule already knows them (``CoresetLoader._forecast``); else
3. a *hole*: an empty job the workers return at once, because the next step depends on something not known
   yet (a round still being selected at a switch step). The forecast of that step is asked again at the next
   request, so the step is prefetched as soon as it is known.

The schedule stays the only thing that decides a step's ids: a forecast batch is used only when its ids are the
ids the schedule drew for that step, and is otherwise dropped and fetched again (``FetchStats.misses``). So the
ids and weights of every step are the same for any number of workers, and a resumed run (whose forecasts start
from the checkpoint's schedule) repeats an uninterrupted one.

With ``num_workers=0`` no ``DataLoader`` runs: batches are collated on the training thread when needed (and
pinned when asked), as a plain ``DataLoader`` without workers does.
"""

from __future__ import annotations

import functools
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torch.utils.data._utils.pin_memory import pin_memory

log = logging.getLogger("trainer_client.loader")

# step -> the ids (int64 (n,)) that step will train on, or None while the schedule does not know them yet
Forecast = Callable[[int], "np.ndarray | None"]
# step -> the id chunks of the embedding pass that will run before that step's batch, or None when none is known
ForecastPass = Callable[[int], "list[np.ndarray] | None"]


@dataclass(frozen=True)
class Workers:
    """How batches are fetched: the worker settings of a plain ``torch.utils.data.DataLoader``, with its meaning.

    The loader's one ``DataLoader`` iterator lives as long as the loader (there are no epochs), so its workers
    persist whatever ``persistent_workers`` says; ``close()`` shuts them down.
    """

    num_workers: int = 0  # worker processes; 0 collates on the training thread
    pin_memory: bool = False  # page-locked batches, for a faster asynchronous copy to a GPU
    prefetch_factor: int | None = None  # batches each worker fetches ahead; None: torch's default (2)
    persistent_workers: bool = False  # accepted for a DataLoader's settings; the workers persist anyway
    worker_init_fn: Callable[[int], None] | None = None  # called in each worker with its id
    multiprocessing_context: Any = None  # e.g. "spawn" or "forkserver"; None: the platform's default
    timeout: float = 0  # seconds to wait for a worker's batch before raising; 0: forever
    pin_memory_device: str = ""

    def __post_init__(self) -> None:
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, received {self.num_workers}")
        if self.prefetch_factor is not None and (self.num_workers == 0 or self.prefetch_factor < 1):
            raise ValueError(
                f"prefetch_factor must be None without workers and >= 1 with them; received {self.prefetch_factor} "
                f"with num_workers={self.num_workers}"
            )
        if self.timeout < 0:
            raise ValueError(f"timeout must be >= 0 seconds, received {self.timeout}")

    @classmethod
    def of(cls, loader: DataLoader) -> Workers:
        """The worker settings of a user's ``DataLoader``."""
        return cls(
            num_workers=loader.num_workers,
            pin_memory=loader.pin_memory,
            prefetch_factor=loader.prefetch_factor if loader.num_workers else None,
            persistent_workers=loader.persistent_workers,
            worker_init_fn=loader.worker_init_fn,
            multiprocessing_context=loader.multiprocessing_context,
            timeout=loader.timeout,
            pin_memory_device=loader.pin_memory_device,
        )


@dataclass
class InputCounters:
    """What the input pipeline counted (this rank's): ``CoresetLoader.stats`` shows them beside the loader's own."""

    input_wait_s: float = 0.0  # training-thread time spent getting training batches (collating them without workers)
    input_misses: int = 0  # training batches not fetched ahead (their step was not known in time, or was mispredicted)
    passes_ahead: int = 0  # embedding passes whose candidates were given to the workers before the pass began

    @classmethod
    def of(cls, stats: dict[str, Any]) -> InputCounters:
        return cls(**{f.name: stats.get(f.name, f.default) for f in fields(cls)})


class _Collate:
    """The user's ``collate_fn``, run in the workers; an empty job (a hole) collates to None."""

    def __init__(self, collate_fn: Callable[[list[Any]], Any]) -> None:
        self.collate_fn = collate_fn

    def __call__(self, samples: list[Any]) -> Any:
        return self.collate_fn(samples) if samples else None


class _Jobs:
    """The ``DataLoader``'s batch sampler: an endless iterator whose next item the pipeline decides when asked."""

    def __init__(self, next_job: Callable[[], list[int]]) -> None:
        self._next_job = next_job

    def __iter__(self) -> _Jobs:
        return self

    def __next__(self) -> list[int]:
        return self._next_job()


@dataclass(frozen=True)
class _Job:
    kind: str  # "step" (a training step's batch), "pass" (a model pass's), "hole"
    key: int  # the step, or the pass's job number
    ids: np.ndarray  # int64 (n,)


def _pass_jobs(chunks: Sequence[np.ndarray]) -> list[_Job]:
    return [_Job("pass", k, np.asarray(ids, np.int64)) for k, ids in enumerate(chunks)]


class InputPipeline:
    """Batches of example ids, fetched by a ``DataLoader``'s workers ahead of need (see the module docstring).

    Args:
        dataset: the map-style dataset; ``dataset[i]`` runs in a worker.
        collate_fn: turns a list of samples into a batch (in a worker).
        workers: the worker settings.
        forecast: the schedule's forecast of a step's ids (None while unknown).
        forecast_pass: the schedule's forecast of the embedding pass before a step (None: none is known).
    """

    def __init__(
        self,
        dataset: Dataset,
        collate_fn: Callable[[list[Any]], Any],
        workers: Workers,
        forecast: Forecast,
        forecast_pass: ForecastPass | None = None,
    ) -> None:
        self.dataset, self.collate_fn, self.workers, self._forecast = dataset, collate_fn, workers, forecast
        self._forecast_pass = forecast_pass
        self.counters = InputCounters()
        self._next_step = 0  # the first step not given to the workers yet (a resumed loader's: ``resume``)
        self._todo: deque[_Job] = deque()  # a running pass's jobs not given to the workers yet
        self._sent: deque[_Job] = deque()  # given to the workers, results not received, in order
        self._ahead: dict[int, tuple[np.ndarray, Any]] = {}  # step -> (ids, batch) received before it was needed
        self._early: tuple[int, list[_Job]] | None = None  # (step, jobs) of a pass forecast before that step
        self._pass_asked = -1  # the last step whose pass forecast was asked for
        self._it: Iterator[Any] | None = None

    # -- what the workers are given ------------------------------------------------------------------------

    def _next_job(self) -> list[int]:
        if not self._todo and self._forecast_pass is not None and self._pass_asked < self._next_step:
            self._pass_asked = step = self._next_step
            chunks = self._forecast_pass(step)
            if chunks:
                jobs = _pass_jobs(chunks)
                self._early = step, jobs
                self._todo.extend(jobs)
        if self._todo:
            job = self._todo.popleft()
        else:
            ids = self._forecast(self._next_step)
            if ids is None:
                job = _Job("hole", self._next_step, np.zeros(0, np.int64))
            else:
                job = _Job("step", self._next_step, ids)
                self._next_step += 1
        self._sent.append(job)
        return job.ids.tolist()

    def _receive(self) -> tuple[_Job, Any]:
        """The next result in order (the job is popped first, so a worker's error leaves the queue consistent)."""
        if self._it is None:
            self._start()
        assert self._it is not None
        job = self._sent.popleft()
        try:
            return job, next(self._it)
        except (ConnectionError, EOFError) as exc:
            # A worker that dies after queueing a batch takes its shared memory with it: torch then fails while
            # reading the batch, not with its "worker exited unexpectedly" error.
            raise RuntimeError(
                f"a DataLoader worker of the loader's input pipeline exited unexpectedly while sending a batch "
                f"({type(exc).__name__}: {exc})"
            ) from exc

    def _start(self) -> None:
        w = self.workers
        loader = DataLoader(
            self.dataset,
            batch_sampler=_Jobs(self._next_job),
            num_workers=w.num_workers,
            collate_fn=_Collate(self.collate_fn),
            pin_memory=w.pin_memory,
            timeout=w.timeout,
            worker_init_fn=w.worker_init_fn,
            multiprocessing_context=w.multiprocessing_context,
            prefetch_factor=w.prefetch_factor,
            persistent_workers=w.persistent_workers,
            pin_memory_device=w.pin_memory_device,
        )
        self._it = iter(loader)  # the DataLoader asks _next_job for its first prefetch_factor * W jobs here
        log.info("input pipeline: %d workers, pin_memory=%s", w.num_workers, w.pin_memory)

    # -- what the loader asks for --------------------------------------------------------------------------

    def _direct(self, ids: np.ndarray) -> Any:
        batch = self.collate_fn([self.dataset[int(i)] for i in ids])
        # Pinned where an accelerator is: without one a DataLoader ignores pin_memory (it warns), and so does this.
        return pin_memory(batch, self.workers.pin_memory_device or None) if self._pins else batch

    @functools.cached_property
    def _pins(self) -> bool:
        return self.workers.pin_memory and torch.accelerator.is_available()

    def resume(self, stats: dict[str, Any], step: int) -> None:
        """Continue a checkpoint's counters (``stats``: the loader's saved stats) at its ``step``; before any fetch."""
        if self._it is not None:
            raise RuntimeError("the input pipeline resumes before its first batch")
        self.counters, self._next_step = InputCounters.of(stats), step

    def step_batch(self, step: int, ids: np.ndarray) -> Any:
        """The batch of training step ``step``, whose ids (int64 (n,)) the schedule has drawn (the time it takes
        is counted in ``counters.input_wait_s``)."""
        start = time.perf_counter()
        try:
            return self._step_batch(step, ids)
        finally:
            self.counters.input_wait_s += time.perf_counter() - start

    def _step_batch(self, step: int, ids: np.ndarray) -> Any:
        if self._early is not None and self._early[0] <= step:  # the pass forecast before this step did not run
            self._forget(self._early[1])
        if self.workers.num_workers == 0:
            self._next_step = step + 1
            return self._direct(ids)
        if self._next_step <= step:  # never given to the workers (the first step, or a step not known in time)
            self._next_step = step + 1
            return self._fetch_now(ids)
        held = self._ahead.pop(step, None)
        while held is None and any(j.kind != "pass" and j.key <= step for j in self._sent):
            job, batch = self._receive()
            if job.kind == "step" and job.key == step:
                held = job.ids, batch
            elif job.kind == "step" and job.key > step:
                self._ahead[job.key] = job.ids, batch
        self._ahead = {k: v for k, v in self._ahead.items() if k > step}  # forecasts of steps now past
        if held is not None and np.array_equal(held[0], ids):
            return held[1]
        return self._fetch_now(ids)  # forecast with other ids: dropped

    def _fetch_now(self, ids: np.ndarray) -> Any:
        """A training batch not fetched ahead: given to the workers before any forecast step, and awaited."""
        self.counters.input_misses += 1
        (batch,) = self.batches([ids])
        return batch

    def batches(self, chunks: Sequence[np.ndarray]) -> Iterator[Any]:
        """The batches of ``chunks`` (int64 id arrays), in order: a model pass's. Every chunk is given to the workers
        before any forecast step, so the workers fetch the pass while the model computes it."""
        if self.workers.num_workers == 0:
            for ids in chunks:
                yield self._direct(ids)
            return
        early = self._early[1] if self._early is not None else []
        if len(early) == len(chunks) and all(np.array_equal(j.ids, c) for j, c in zip(early, chunks, strict=True)):
            mine, self._early = early, None  # given to the workers before the pass began
            self.counters.passes_ahead += 1
        else:
            self._forget(early)  # a forecast pass with other chunks: its results in flight are dropped below
            mine = _pass_jobs(chunks)
            self._todo.extend(mine)
        try:
            for want in mine:
                while True:
                    job, batch = self._receive()
                    if job is want:
                        break
                    if job.kind == "step":
                        self._ahead[job.key] = job.ids, batch
                yield batch
        finally:
            # A pass abandoned part-way (an error in the model): its jobs not yet given are forgotten, and its
            # results still in flight are dropped as they arrive (the loop above keeps only the jobs it wants).
            self._forget(mine)

    def _forget(self, jobs: list[_Job]) -> None:
        """Jobs no pass will wait for: those not given to the workers yet are not given (the others' results are
        dropped as they arrive: the receiving loops keep only the jobs they want)."""
        if self._early is not None and self._early[1] is jobs:
            self._early = None
        if jobs:
            self._todo = deque(j for j in self._todo if all(j is not m for m in jobs))

    def close(self) -> None:
        """Shut the workers down (idempotent); nothing is fetched after it."""
        it, self._it = self._it, None
        self._sent.clear()
        self._todo.clear()
        self._ahead.clear()
        self._early = None
        shutdown = getattr(it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
