"""The unit of work between a session and a backend: a round's selection input, one worker's share of it, and the
weighted batches a share yields. Pure numpy; any backend (threads, Ray actors) runs ``run_task``.

A round's embeddings sit in one matrix, a row per id of the round's plan (``RoundInput``). A backend deals the
round's subsets out in contiguous shares, one per worker call (``chunks``), and gathers each share's rows once,
stacked, into a ``SelectionTask``. The worker selects the stacked subsets in one engine call and returns one
``Batch`` per subset; ``fan_out`` turns that call's future into one future per subset, so a round streams,
retries and is delivered per subset.

Copies of the embedding rows after decoding: the session's round matrix (the messages arrive in pieces), then
one gather per share here; the Ray backend adds Ray's own serialisation of the share.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Sequence
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass

import numpy as np

from selector_service.coreset import stacked_minibatch_coresets
from selector_service.errors import SelectorFailure

# Rows one worker call selects at most, unless a single subset is larger: bounds how long the round's first
# batches wait behind the others in the same call (about 10 ms of selection at 50-point classes).
CHUNK_ROWS = 8192


@dataclass(frozen=True)
class Batch:
    """One weighted mini-batch coreset of a round, as the worker that selected it returns it.

    Attributes:
        session_id, round_id, subset_index: which batch of which round (subset in [0, P)).
        ids: int64 (m,) example ids, unique.
        weights: float32 (m,) loss weights, positive, mean 1 (normalised once, by the engine:
            ``coreset.MinibatchCoreset``).
        trainer_step: the trainer step at which the round's embeddings were computed.
        selection_ms: wall time of the selector call that produced the batch, in milliseconds: from the worker
            starting on its share until the share's batches were ready (batches selected together share it).
        worker: who selected it.
    """

    session_id: str
    round_id: int
    subset_index: int
    ids: np.ndarray
    weights: np.ndarray
    trainer_step: int
    selection_ms: float
    worker: str


@dataclass(frozen=True)
class SelectionTask:
    """One worker's share of a round: consecutive subsets, stacked once.

    Subset ``first_subset + i`` of the round is rows ``offsets[i]:offsets[i + 1]`` of ``ids``, ``labels`` and
    ``embeddings``.

    Attributes:
        session_id, round_id, trainer_step: the round (copied onto its batches).
        first_subset: the round's index of the share's first subset.
        offsets: int64 (s + 1,) subset boundaries, 0 first and n last, increasing.
        ids: int64 (n,) example ids; labels: int64 (n,) the group facility location selects each in: its class, or
            0 for every row under joint selection.
        embeddings: float32 (n, d) C-contiguous gradient embeddings.
        batch_size: coreset size m per subset; similarity: a key of ``similarity.KERNELS``.
    """

    session_id: str
    round_id: int
    trainer_step: int
    first_subset: int
    offsets: np.ndarray
    ids: np.ndarray
    labels: np.ndarray
    embeddings: np.ndarray
    batch_size: int
    similarity: str

    @property
    def num_subsets(self) -> int:
        return len(self.offsets) - 1


@dataclass(frozen=True)
class RoundInput:
    """A round's selection input, as its session holds it.

    Attributes:
        session_id, round_id, trainer_step: the round.
        ids: int64 (n,) example id of each row; labels: int64 (n,) their selection groups (classes, or all 0 under
            joint selection).
        embeddings: float32 (n, d) one row per id.
        subset_rows: P int64 arrays, (r_i,) the rows of subset i.
        batch_size: coreset size m per subset; similarity: a key of ``similarity.KERNELS``.
    """

    session_id: str
    round_id: int
    trainer_step: int
    ids: np.ndarray
    labels: np.ndarray
    embeddings: np.ndarray
    subset_rows: Sequence[np.ndarray]
    batch_size: int
    similarity: str

    @property
    def sizes(self) -> list[int]:
        """Rows of each subset."""
        return [len(r) for r in self.subset_rows]

    def share(self, subsets: range) -> SelectionTask:
        """The consecutive ``subsets`` (a non-empty range of subset indices), their rows gathered once."""
        parts = [self.subset_rows[i] for i in subsets]
        rows = np.concatenate(parts) if len(parts) > 1 else parts[0]
        offsets = np.array([0, *itertools.accumulate(len(p) for p in parts)], dtype=np.int64)
        return SelectionTask(
            self.session_id,
            self.round_id,
            self.trainer_step,
            subsets.start,
            offsets,
            self.ids[rows],
            self.labels[rows],
            self.embeddings[rows],
            self.batch_size,
            self.similarity,
        )


def chunks(sizes: Sequence[int], workers: int) -> list[range]:
    """Split a round's subsets (``sizes``: rows of each) into contiguous shares of subset indices: near-equal, one
    per worker (fewer when there are fewer subsets, the smaller ones first), each then cut where it would pass
    ``CHUNK_ROWS`` rows."""
    if workers < 1 and sizes:
        raise SelectorFailure(f"no selector workers to select {len(sizes)} subsets (the backend is closed or empty)")
    count = min(len(sizes), workers)
    out: list[range] = []
    for a, b in itertools.pairwise([i * len(sizes) // count for i in range(count + 1)] if count else [0]):
        start, rows = a, 0
        for i in range(a, b):
            if i > start and rows + sizes[i] > CHUNK_ROWS:
                out.append(range(start, i))
                start, rows = i, 0
            rows += sizes[i]
        out.append(range(start, b))
    return out


def deal(work: RoundInput, workers: int) -> list[SelectionTask]:
    """The round's shares for ``workers`` workers (``chunks``), each gathered once; ``SelectorFailure`` when
    there is no worker."""
    return [work.share(subsets) for subsets in chunks(work.sizes, workers)]


def run_task(task: SelectionTask, worker: str) -> list[Batch]:
    """Select a share's coresets in the calling process, in one engine call: one batch per subset, in order."""
    coresets = stacked_minibatch_coresets(
        task.ids, task.labels, task.embeddings, task.offsets, task.batch_size, task.similarity
    )
    return [
        Batch(
            task.session_id,
            task.round_id,
            task.first_subset + i,
            c.ids,
            c.weights,
            task.trainer_step,
            c.selection_ms,
            worker,
        )
        for i, c in enumerate(coresets)
    ]


def fan_out(call: Future[list[Batch]], size: int) -> list[Future[Batch]]:
    """One future per subset of a call that selects ``size`` subsets: each resolves with its batch, or with the
    call's exception. A subset's future cancelled by its caller (``withdraw``) stays cancelled."""
    futures: list[Future[Batch]] = [Future() for _ in range(size)]

    def settle(done: Future[list[Batch]]) -> None:
        try:
            results = done.result()
            if len(results) != size:
                raise RuntimeError(f"a selector returned {len(results)} results for {size} tasks")
        except BaseException as exc:
            for f in futures:
                with contextlib.suppress(InvalidStateError):  # cancelled meanwhile
                    f.set_exception(exc)
            return
        for f, r in zip(futures, results, strict=True):
            with contextlib.suppress(InvalidStateError):
                f.set_result(r)

    call.add_done_callback(settle)
    return futures


def withdraw(future: Future[Batch]) -> None:
    """Cancel one of ``fan_out``'s futures unless it is done, waking whoever waits on it (``as_completed``) now.

    ``Future.cancel`` alone wakes waiters only when an executor next looks at the future, and these futures have
    no executor: the call behind them may run on for long (a stream would wait for it)."""
    if not future.done() and future.cancel():
        future.set_running_or_notify_cancel()
