"""Selecting several ground sets together (a CREST round): the same coresets as one call per set, the compiled
class grouping against numpy, errors that name the ground set, and backends that hand each worker a share."""

from __future__ import annotations

import itertools
import time
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np
import pytest

from selector_service import (
    InvalidArgument,
    SelectorFailure,
    minibatch_coreset,
    minibatch_coresets,
    select_coreset,
    select_coresets,
)
from selector_service.backends import LocalBackend
from selector_service.subsets import plan_groups, split_budget
from selector_service.tasks import CHUNK_ROWS, Batch, RoundInput, chunks, deal, fan_out, run_task


def _round(rng: np.random.Generator, sets: int, d: int = 10) -> tuple[list[np.ndarray], list[np.ndarray], list[int]]:
    xs, ys, ks = [], [], []
    for _ in range(sets):
        n = int(rng.integers(20, 400))
        xs.append(rng.normal(size=(n, d)).astype(np.float32))
        ys.append(rng.integers(0, 6, n) * 7 - 5)  # classes need not be 0..C-1
        ks.append(int(rng.integers(len(np.unique(ys[-1])), min(n, 80) + 1)))
    return xs, ys, ks


@pytest.mark.parametrize("method", ["lazy", "stochastic", "naive"])
@pytest.mark.parametrize("similarity", ["exp", "maxdist"])
def test_together_equals_one_call_per_ground_set(method: str, similarity: str) -> None:
    rng = np.random.default_rng(11)
    for trial in range(12):
        xs, ys, ks = _round(rng, int(rng.integers(1, 7)))
        kwargs = {"method": method, "similarity": similarity, "seed": trial}
        together = select_coresets(xs, ks, labels=ys, **kwargs)  # type: ignore[arg-type]
        assert len(together) == len(xs)
        for x, y, k, c in zip(xs, ys, ks, together, strict=True):
            alone = select_coreset(x, k, labels=y, **kwargs)  # type: ignore[arg-type]
            np.testing.assert_array_equal(c.indices, alone.indices)
            np.testing.assert_array_equal(c.weights, alone.weights)
            np.testing.assert_array_equal(c.gains, alone.gains)
            assert c.weights.sum() == len(x) and len(np.unique(c.indices)) == k


def test_large_groups_and_no_labels_take_the_per_group_path_with_the_same_result() -> None:
    rng = np.random.default_rng(3)
    xs = [rng.normal(size=(n, 8)).astype(np.float32) for n in (700, 60, 1200)]  # 700, 1200 > BATCH_MAX
    together = select_coresets(xs, 30)
    for x, c in zip(xs, together, strict=True):
        alone = select_coreset(x, 30)
        np.testing.assert_array_equal(c.indices, alone.indices)
        np.testing.assert_array_equal(c.weights, alone.weights)
    assert select_coresets([], 5) == []


def test_compiled_grouping_matches_numpy() -> None:
    rng = np.random.default_rng(5)
    for trial in range(200):
        sizes = rng.integers(1, 60, int(rng.integers(1, 5)))
        span = 10 if trial % 3 else 10**15  # small spans take the counting sort, huge ones the merge sort
        labels = [rng.integers(-span, span, n) if trial % 2 else rng.integers(0, 4, n) for n in sizes]
        budgets = np.array([int(rng.integers(len(np.unique(y)), len(y) + 1)) for y in labels], dtype=np.int64)
        rows = np.cumsum([0, *sizes]).astype(np.int64)
        members, offsets, split, first, status = plan_groups(np.concatenate(labels).astype(np.int64), rows, budgets)
        assert status[0] == -1 and status[1] == np.diff(offsets).max()
        for s, y in enumerate(labels):
            order = np.argsort(y, kind="stable") + rows[s]
            np.testing.assert_array_equal(members[rows[s] : rows[s + 1]], order)
            classes, counts = np.unique(y, return_counts=True)
            mine = slice(first[s], first[s + 1])
            np.testing.assert_array_equal(np.diff(offsets)[mine], counts)
            np.testing.assert_array_equal(y[members[offsets[mine]] - rows[s]], classes)  # classes ascending
            np.testing.assert_array_equal(split[mine], split_budget(counts, int(budgets[s])))
    *_, status = plan_groups(np.zeros(6, np.int64), np.array([0, 3, 6]), np.array([2, 4]))
    assert status[0] == 1  # 4 picks from 3 rows


def test_errors_name_the_ground_set_and_select_nothing() -> None:
    rng = np.random.default_rng(2)
    xs, ys, ks = _round(rng, 3)
    with pytest.raises(InvalidArgument, match="received 2 budgets for 3 ground sets"):
        select_coresets(xs, ks[:2], labels=ys)
    with pytest.raises(InvalidArgument, match="received 1 label arrays for 3 ground sets"):
        select_coresets(xs, ks, labels=ys[:1])
    bad = [x.copy() for x in xs]
    bad[2][4, 1] = np.nan
    with pytest.raises(InvalidArgument, match=r"ground set 2: embeddings must be finite, received nan at row 4, col 1"):
        select_coresets(bad, ks, labels=ys)
    with pytest.raises(InvalidArgument, match=r"ground set 1: all ground sets must have one width, received d=4"):
        select_coresets([xs[0], xs[1][:, :4]], 5)
    with pytest.raises(InvalidArgument, match=r"ground set 1: budget k=1000 must be between 1 and the ground-set"):
        select_coresets(xs, [5, 1000, 5], labels=ys)
    few = [np.zeros(len(y), np.int64) if i != 2 else y for i, y in enumerate(ys)]
    classes = len(np.unique(ys[2]))
    with pytest.raises(
        InvalidArgument, match=rf"ground set 2: budget 1 must be between .* classes present \({classes}\)"
    ):
        select_coresets(xs, 1, labels=few)
    with pytest.raises(InvalidArgument, match=r"ground set 0: labels must have shape"):
        select_coresets(xs, ks, labels=[ys[1], ys[1], ys[2]])
    # One ground set: the messages of select_coreset, with no position.
    with pytest.raises(InvalidArgument, match=r"^embeddings must be finite, received nan at row 4, col 1$"):
        select_coreset(bad[2], 5)


def test_minibatch_coresets_equal_one_subset_at_a_time() -> None:
    rng = np.random.default_rng(4)
    xs, ys, _ = _round(rng, 5)
    ids = [np.sort(rng.choice(10_000, len(x), replace=False)) for x in xs]
    together = minibatch_coresets(ids, ys, xs, batch_size=64)
    for i, y, x, c in zip(ids, ys, xs, together, strict=True):
        alone = minibatch_coreset(i, y, x, batch_size=64)
        np.testing.assert_array_equal(c.ids, alone.ids)
        np.testing.assert_allclose(c.weights, alone.weights)
        assert c.weights.mean() == pytest.approx(1.0) and c.selection_ms > 0
    with pytest.raises(InvalidArgument, match=r"subset 1: \(3,\) ids for embeddings of shape"):
        minibatch_coresets([ids[0], ids[1][:3]], ys[:2], xs[:2], batch_size=8)
    with pytest.raises(InvalidArgument, match="received 2 id arrays, 1 label arrays and 2 embedding arrays"):
        minibatch_coresets(ids[:2], ys[:1], xs[:2], batch_size=8)


@dataclass(frozen=True)
class _Subset:
    ids: np.ndarray
    labels: np.ndarray
    embeddings: np.ndarray
    batch_size: int = 32


def _tasks(rng: np.random.Generator, sizes: list[int]) -> list[_Subset]:
    tasks = []
    for n in sizes:
        ids = np.sort(rng.choice(100_000, n, replace=False)).astype(np.int64)
        labels = rng.integers(0, 10, n).astype(np.int64)
        emb = rng.normal(size=(n, 10)).astype(np.float32)
        tasks.append(_Subset(ids, labels, emb))
    return tasks


def _round_input(tasks: list[_Subset]) -> RoundInput:
    """The subsets as a session holds a round: one matrix, each subset's rows in it (here in order)."""
    starts = [0, *itertools.accumulate(len(t.ids) for t in tasks)]
    return RoundInput(
        "s",
        0,
        0,
        np.concatenate([t.ids for t in tasks]),
        np.concatenate([t.labels for t in tasks]),
        np.concatenate([t.embeddings for t in tasks]),
        [np.arange(a, b) for a, b in itertools.pairwise(starts)],
        32,
        "exp",
    )


def test_a_round_is_dealt_to_workers_in_contiguous_shares() -> None:
    shares = chunks([500] * 5, workers=2)
    assert [list(s) for s in shares] == [[0, 1], [2, 3, 4]]  # the first batches come soonest
    assert len(chunks([500] * 5, workers=8)) == 5  # never an empty share
    big = chunks([5000] * 4, workers=1)  # 20,000 rows: shares of at most CHUNK_ROWS where possible
    assert [len(s) for s in big] == [1, 1, 1, 1] and CHUNK_ROWS < 10_000
    assert chunks([], workers=2) == []
    with pytest.raises(SelectorFailure, match="no selector workers to select 5 subsets"):
        chunks([50] * 5, workers=0)


def test_a_share_is_its_subsets_rows_stacked_once() -> None:
    rng = np.random.default_rng(8)
    tasks = _tasks(rng, [30, 20, 50, 40, 10])
    flat = _round_input(tasks)
    order = rng.permutation(len(flat.ids))  # the round matrix in another row order, like a session's sorted union
    where = np.argsort(order)  # where row i of flat is in the shuffled matrix
    rows = [where[r] for r in flat.subset_rows]
    work = RoundInput("s", 0, 7, flat.ids[order], flat.labels[order], flat.embeddings[order], rows, 32, "exp")
    shares = deal(work, 2)
    assert [(t.first_subset, t.num_subsets, t.trainer_step) for t in shares] == [(0, 2, 7), (2, 3, 7)]
    for task in shares:
        assert task.embeddings.flags.c_contiguous and task.embeddings.dtype == np.float32
        for i, (a, b) in enumerate(itertools.pairwise(task.offsets)):
            sub = tasks[task.first_subset + i]
            np.testing.assert_array_equal(task.ids[a:b], sub.ids)
            np.testing.assert_array_equal(task.labels[a:b], sub.labels)
            np.testing.assert_array_equal(task.embeddings[a:b], sub.embeddings)


def test_each_batch_carries_the_wall_time_of_the_call_that_selected_it() -> None:
    """Batches selected in one call are ready together: each carries the whole call's time, not a share of it."""
    tasks = _tasks(np.random.default_rng(9), [400, 300, 500, 200, 350])
    for task in deal(_round_input(tasks), 2):
        start = time.perf_counter()
        batches = run_task(task, "worker")
        call_ms = (time.perf_counter() - start) * 1e3
        assert len(batches) == task.num_subsets > 1
        assert len({b.selection_ms for b in batches}) == 1  # one value per call
        assert 0.5 * call_ms <= batches[0].selection_ms <= call_ms  # the call's time (a share would be <= 1/2)


def test_task_futures_follow_their_call() -> None:
    call: Future[list[Batch]] = Future()
    futures = fan_out(call, 2)
    assert futures[1].cancel()  # the session cancels a closed round's futures
    call.set_result(["first", "second"])  # type: ignore[list-item]
    assert futures[0].result() == "first" and futures[1].cancelled()
    failing: Future[list[Batch]] = Future()
    futures = fan_out(failing, 3)
    failing.set_exception(ValueError("selector died"))
    for f in futures:
        with pytest.raises(ValueError, match="selector died"):
            f.result()
    short: Future[list[Batch]] = Future()
    futures = fan_out(short, 2)
    short.set_result(["only one"])  # type: ignore[list-item]
    with pytest.raises(RuntimeError, match="returned 1 results for 2 tasks"):
        futures[0].result()


def test_local_backend_selects_each_subset_as_alone() -> None:
    rng = np.random.default_rng(7)
    tasks = _tasks(rng, [300, 120, 450, 80, 200])
    backend = LocalBackend(num_workers=2)
    try:
        results = [f.result(timeout=60) for f in backend.submit(_round_input(tasks))]
    finally:
        backend.close()
    assert [r.subset_index for r in results] == [0, 1, 2, 3, 4]
    for t, r in zip(tasks, results, strict=True):
        alone = minibatch_coreset(t.ids, t.labels, t.embeddings, t.batch_size)
        np.testing.assert_array_equal(r.ids, alone.ids)
        np.testing.assert_allclose(r.weights, alone.weights)
    assert len({r.worker for r in results}) == 2  # one call per worker


def test_a_round_the_backend_cannot_take_stays_planned() -> None:
    from selector_service.manager import SessionManager
    from selector_service.rounds import EmbeddingPart, RoundState
    from selector_service.session import SessionConfig

    backend = LocalBackend(num_workers=2)
    manager = SessionManager(backend)
    labels = (np.arange(2000) % 10).astype(np.int64)
    session = manager.create(labels, 10, SessionConfig(num_subsets=2, batch_size=16, seed=0)).session
    plan = manager.start_round(session.id, 0, 0)
    emb = np.random.default_rng(0).normal(size=(len(plan.ids), 10)).astype(np.float32)
    backend.close()
    with pytest.raises(SelectorFailure, match="no selector workers to select 2 subsets"):
        manager.submit_embeddings([EmbeddingPart(session.id, 0, plan.ids, emb, None, None)])
    assert session.rounds[0].state == RoundState.PLANNED and session.rounds[0].futures == []
    manager.backend = LocalBackend(num_workers=1)  # the same embeddings are accepted once a backend can run them
    try:
        manager.submit_embeddings([EmbeddingPart(session.id, 0, plan.ids, emb, None, None)])
        assert len(list(manager.batches(session.id, 0))) == 2
    finally:
        manager.backend.close()
