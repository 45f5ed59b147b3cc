"""DDP: rank 0 alone talks to the service; ``on_main`` runs one step of that on rank 0 and mirrors the outcome,
with rank 0's service state, on every rank, so that all ranks switch regions, fall back and reconnect at the
same steps.

The mirrored state is small (no coresets, no embeddings): which round is in flight, whether one is wanted, the
session and its round counter, and rank 0's service counters. Every call is a collective.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any, TypeVar

from crest.selector.v1.api import RoundPlan, WeightedBatch
from trainer_client._link import ServiceLink
from trainer_client._state import LoaderState, PendingRound
from trainer_client.distributed import DistContext
from trainer_client.loader_config import LoaderConfig, SelectionUnavailable

T = TypeVar("T")


def _control(state: LoaderState, link: ServiceLink) -> dict[str, Any]:
    """Rank 0's service state that the other ranks mirror."""
    return {
        "pending": None if state.pending is None else state.pending.round,
        "need_request": state.need_request,
        "session": link.session,
        "session_round": link.session_round,
        "counters": replace(link.counters, wait_s=0.0, batches_received=0),
    }


def _follow(dist: DistContext, c: dict[str, Any], state: LoaderState, link: ServiceLink) -> None:
    """Take rank 0's service state ``c`` on another rank; its pending round must be this rank's."""
    if c["pending"] is None:
        state.pending = None
    elif state.pending is None or state.pending.round != c["pending"]:
        raise RuntimeError(
            f"rank {dist.rank} lost step with rank 0: rank 0 is waiting for round {c['pending']}, "
            f"this rank for {None if state.pending is None else state.pending.round}"
        )
    state.need_request = c["need_request"]
    link.session, link.session_round = c["session"], c["session_round"]
    # Rank 0's counters; this rank's own wait, and no batches received (rank 0 receives them).
    link.counters = replace(c["counters"], wait_s=link.counters.wait_s, batches_received=0)


def on_main(dist: DistContext, fn: Callable[[], T | None], state: LoaderState, link: ServiceLink) -> T | None:
    """Run ``fn`` on rank 0 and broadcast its result with rank 0's service state; every rank returns the result.

    An exception on rank 0 (strict mode, a persistent failure, a bug) is raised there and, as
    ``SelectionUnavailable`` with its message, on every other rank, so no rank is left waiting in a collective.
    The other ranks count the time in ``wait_s``: rank 0 spent it on the service and they waited for it.
    """
    start = time.perf_counter()
    result: T | None = None
    error: BaseException | None = None
    if dist.is_main:
        try:
            result = fn()
        except BaseException as exc:  # re-raised below, after the other ranks have heard of it
            error = exc
    message = dist.broadcast_object(
        {
            "result": result,
            "control": _control(state, link),
            "error": None if error is None else f"{type(error).__name__}: {error}",
        }
    )
    if error is not None:
        raise error
    if message["error"] is not None:
        raise SelectionUnavailable(f"rank 0 stopped the selection loop: {message['error']}")
    if not dist.is_main:
        _follow(dist, message["control"], state, link)
        link.counters.wait_s += time.perf_counter() - start
    return message["result"]


class FollowsRankZero:
    """The loader's steps under DDP: rank 0 talks to the service and every rank follows (``on_main``).
    ``CoresetLoader`` inherits them; they are its methods, kept here beside the mirroring they rely on."""

    # What they use of the loader (defined by CoresetLoader).
    config: LoaderConfig
    _state: LoaderState
    _link: ServiceLink
    _dist: DistContext | None
    _begin_round: Callable[[RoundPlan], None]
    _give_up_round: Callable[[], None]
    _request_plan: Callable[[], RoundPlan | None]
    _switch: Callable[[PendingRound], None]
    _switch_candidate: Callable[[], PendingRound | None]
    _switch_due: Callable[[], bool]

    def _follow_service(self) -> None:
        """The DDP version of drain / request / switch. Collective, but only while a round is wanted or in flight
        (the same condition on every rank): inside a region with nothing pending, steps need no communication."""
        s = self._state
        if s.pending is None and not s.need_request:
            return
        plan = self._on_main(self._main_request)
        if plan is not None:
            self._begin_round(plan)
        if self._switch_due():
            coresets = self._on_main(self._main_switch)
            if coresets is not None:
                p = s.pending
                assert p is not None
                p.coresets, p.ended = coresets, True
                self._switch(p)

    def _main_request(self) -> RoundPlan | None:
        if not self._link.drain(self._state.pending):
            self._give_up_round()
        return self._request_plan()

    def _main_switch(self) -> dict[int, WeightedBatch] | None:
        p = self._switch_candidate()
        return None if p is None else dict(p.coresets)

    def _main_settle(self) -> tuple[dict[int, WeightedBatch], bool] | None:
        """Wait (up to ``first_batch_timeout_s``) for the round in flight, so that a checkpoint holds it."""
        p = self._state.pending
        if p is not None and not p.ready and not self._link.wait(p, self.config.first_batch_timeout_s):
            self._give_up_round()
        p = self._state.pending
        return None if p is None else (dict(p.coresets), p.ended)

    def _on_main(self, fn: Callable[[], T | None]) -> T | None:
        assert self._dist is not None
        return on_main(self._dist, fn, self._state, self._link)
