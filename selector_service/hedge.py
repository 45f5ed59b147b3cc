"""Hedged calls: a share of a round that has not come back after a delay is sent to another worker too, and the
first result wins.

Why: a selector worker whose node dies (a killed container, a lost machine) leaves its calls hanging until Ray
declares the node dead, tens of seconds later, and the actor it restarts may find no free CPU anywhere and wait
for good. Meanwhile the trainer's round is late and it trains on uniform batches. Selecting a share takes
milliseconds, so a share still out after ``HEDGE_AFTER_S`` is sent to the next worker as well. A share is
stateless and deterministic (the same coresets on every worker), and its futures resolve once, so the session
still delivers each subset's batch exactly once. A call that fails moves on to the next worker at once.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, InvalidStateError
from typing import Generic, TypeVar

T = TypeVar("T")

# A share still out after this long is sent to another worker too: a share selects in milliseconds (tens on a
# busy 2-core box), and a trainer waits 2 s for a late round by default (LoaderConfig.deadline_s).
HEDGE_AFTER_S = 1.0
# Workers tried for one share at most: the first and two hedges.
MAX_ATTEMPTS = 3


def hedged(
    launch: Callable[[int], Future[T]],
    workers: Sequence[int],
    after_s: float = HEDGE_AFTER_S,
    on_slow: Callable[[int], None] = lambda worker: None,
) -> Future[T]:
    """Call ``launch(workers[0])``; when it has no result after ``after_s`` seconds, or fails, also call
    ``launch(workers[1])``, and so on through ``workers``. The returned future resolves with the first result,
    or, once every attempt has failed, with the last failure. ``on_slow(worker)`` is told of each worker that did
    not answer in time (the caller may stop dealing it work)."""
    if not workers:
        raise ValueError("hedged() needs at least one worker")
    return _Hedge(launch, list(workers), after_s, on_slow).out


class _Hedge(Generic[T]):
    def __init__(
        self,
        launch: Callable[[int], Future[T]],
        workers: list[int],
        after_s: float,
        on_slow: Callable[[int], None],
    ) -> None:
        self.out: Future[T] = Future()
        self._launch, self._workers, self._after_s, self._on_slow = launch, workers, after_s, on_slow
        self._lock = threading.Lock()
        self._started = 0  # attempts launched
        self._finished = 0  # attempts that failed (the first success settles ``out``)
        self._next()

    def _next(self) -> None:
        """Launch the next attempt, unless ``out`` is settled or every worker has been tried."""
        with self._lock:
            if self.out.done() or self._started == len(self._workers):
                return
            worker = self._workers[self._started]
            self._started += 1
            more = self._started < len(self._workers)
        try:
            call = self._launch(worker)
        except BaseException as exc:  # launching failed: count it as a failed attempt
            call = Future()
            call.set_exception(exc)
        if more:
            timer = threading.Timer(self._after_s, self._slow, args=(call, worker))
            timer.daemon = True
            timer.start()
            call.add_done_callback(lambda _: timer.cancel())
        call.add_done_callback(self._settle)

    def _slow(self, call: Future[T], worker: int) -> None:
        if call.done() or self.out.done():
            return
        self._on_slow(worker)
        self._next()

    def _settle(self, call: Future[T]) -> None:
        try:
            result = call.result()
        except BaseException as exc:
            with self._lock:
                self._finished += 1
                exhausted = self._started == len(self._workers)
                last = exhausted and self._finished == self._started
            if not exhausted:
                self._next()
            elif last:
                with contextlib.suppress(InvalidStateError):
                    self.out.set_exception(exc)
            return
        with contextlib.suppress(InvalidStateError):  # a slower attempt answering after the first
            self.out.set_result(result)
