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

from trainer_client._link import ServiceLink
from trainer_client._state import LoaderState
from trainer_client.distributed import DistContext
from trainer_client.loader_config import SelectionUnavailable

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
