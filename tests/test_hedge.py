"""Hedged calls (selector_service.hedge): real futures and timer threads, workers that answer, hang or fail."""

from __future__ import annotations

import threading
from concurrent.futures import Future

import pytest

from selector_service.hedge import hedged


class Workers:
    """Workers by index: ``answer`` ones resolve at once with their index, ``fail`` ones raise at once, the rest
    hang until ``release`` (then answer)."""

    def __init__(self, answer: set[int] = frozenset(), fail: set[int] = frozenset()) -> None:  # type: ignore[assignment]
        self.answer, self.fail = answer, fail
        self.launched: list[int] = []
        self.hanging: dict[int, Future[int]] = {}
        self.changed = threading.Condition()

    def launch(self, worker: int) -> Future[int]:
        call: Future[int] = Future()
        with self.changed:
            self.launched.append(worker)
            if worker not in self.answer | self.fail:
                self.hanging[worker] = call
            self.changed.notify_all()
        if worker in self.answer:
            call.set_result(worker)
        elif worker in self.fail:
            call.set_exception(RuntimeError(f"worker {worker} died"))
        return call

    def wait_launched(self, count: int) -> None:
        with self.changed:
            assert self.changed.wait_for(lambda: len(self.launched) >= count, timeout=5), self.launched

    def release(self, worker: int) -> None:
        self.hanging[worker].set_result(worker)


def test_a_worker_that_answers_is_the_only_one_called() -> None:
    workers, slow = Workers(answer={0, 1, 2}), []
    out = hedged(workers.launch, [0, 1, 2], after_s=0.05, on_slow=slow.append)
    assert out.result(timeout=5) == 0
    assert workers.launched == [0] and slow == []


def test_a_hanging_worker_is_hedged_and_reported() -> None:
    workers, slow = Workers(answer={1}), []
    out = hedged(workers.launch, [0, 1, 2], after_s=0.05, on_slow=slow.append)
    assert out.result(timeout=5) == 1
    assert workers.launched == [0, 1] and slow == [0]
    workers.release(0)  # the hung call answering late changes nothing
    assert out.result() == 1


def test_a_failed_call_moves_on_at_once() -> None:
    workers, slow = Workers(answer={1}, fail={0}), []
    out = hedged(workers.launch, [0, 1], after_s=60.0, on_slow=slow.append)  # no timer could fire in this test
    assert out.result(timeout=5) == 1
    assert workers.launched == [0, 1] and slow == []


def test_every_attempt_failing_raises_the_last_failure() -> None:
    workers = Workers(fail={0, 1, 2})
    out = hedged(workers.launch, [0, 1, 2], after_s=60.0)
    with pytest.raises(RuntimeError, match="worker 2 died"):
        out.result(timeout=5)
    assert workers.launched == [0, 1, 2]


def test_a_failure_waits_for_the_attempts_still_out() -> None:
    """Worker 0 hangs, is hedged on 1, which fails: the share waits for 0 rather than failing."""
    workers = Workers(fail={1})
    out = hedged(workers.launch, [0, 1], after_s=0.05)
    workers.wait_launched(2)
    assert not out.done()
    workers.release(0)
    assert out.result(timeout=5) == 0


def test_the_first_answer_wins_when_both_answer() -> None:
    workers = Workers()
    out = hedged(workers.launch, [0, 1], after_s=0.05)
    workers.wait_launched(2)
    workers.release(1)
    workers.release(0)
    assert out.result(timeout=5) == 1


def test_no_workers_is_refused() -> None:
    with pytest.raises(ValueError, match="at least one worker"):
        hedged(Workers().launch, [])


def test_hedges_go_to_other_nodes_first() -> None:
    """A node that dies takes all its actors: a share's hedges try actors on other nodes before its own node's."""
    from selector_service.ray_backend import _hedge_order

    nodes: list[str | None] = ["a", "a", "a", "b", "b", "c"]
    live = list(range(6))
    assert _hedge_order(live, 0, nodes) == [0, 3, 5]
    assert _hedge_order(live, 1, nodes) == [1, 3, 5]
    assert _hedge_order(live, 4, nodes) == [4, 5, 0]
    assert _hedge_order(live, 0, ["a"] * 6) == [0, 1, 2]  # one node: the pool's order
    assert _hedge_order([2, 5], 1, nodes) == [5, 2]  # only the live actors, at most all of them
    assert _hedge_order(live, 0, [None, "a", "a", None, "b", "b"]) == [0, 1, 3]  # unknown: another node
