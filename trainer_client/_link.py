"""The loader's link to the selection service: the session (opened lazily, reopened when the service lost it),
starting rounds (ahead of time when it can: ``prefetch``), the stream thread and its items, and what a failure
does.

Only rank 0 talks to the service (``streams=True``); on the other DDP ranks the link only holds rank 0's
session and round counter, mirrored from rank 0 (``_mirror.py``).

``failed`` applies the failure policy that ``CoresetLoader``'s docstring states, by the kind of the failure
(``_failures.KIND_OF``). Two persistent failures are identical when ``_failures.signature`` says so (same code,
same message once its round numbers and session ids are masked); a round whose stream ends resets the run of
them, and transient failures in between neither extend nor reset it.
"""

from __future__ import annotations

import logging
import queue
import time
from collections.abc import Callable
from concurrent.futures import CancelledError, wait
from dataclasses import asdict, dataclass, fields
from typing import Any

import grpc
import numpy as np

from crest.selector.v1.api import RoundPlan, SelectionService, SessionInfo, TrainerReport
from trainer_client._failures import Failure, describe, kind_of, signature
from trainer_client._passes import RoundEmbeddings
from trainer_client._state import PendingRound, plan_of_state, plan_state
from trainer_client._stream import PlanJob, RoundStreamer, StreamBatch, StreamEnd, StreamItem, StreamJob
from trainer_client.loader_config import LoaderConfig, SelectionUnavailable

log = logging.getLogger("trainer_client.loader")

# Failures of a StartRound run ahead that the call made at the step mends itself (``_start_round``: a lost
# session is reopened, a round id out of step with the service's is corrected): that call is made instead.
_MENDED_BY_STARTING = (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.FAILED_PRECONDITION)


@dataclass
class LinkCounters:
    """What the link counted: ``CoresetLoader.stats`` shows them beside the loader's own (same names there).

    Under DDP the other ranks mirror rank 0's (``_mirror.py``), except ``wait_s``: each rank's own time blocked on
    the service (on the other ranks, waiting for rank 0's outcome) and ``batches_received``: rank 0 receives them.
    """

    batches_received: int = 0
    duplicate_batches: int = 0  # batches of a subset already received in their round (dropped)
    service_errors: int = 0  # failed calls of every kind the loader rides out
    persistent_failures: int = 0  # those of them the service would repeat (INTERNAL, UNKNOWN, DATA_LOSS)
    sessions_opened: int = 0
    rounds_prefetched: int = 0  # rounds whose StartRound ran ahead, on the stream thread
    wait_s: float = 0.0

    @classmethod
    def of(cls, stats: dict[str, Any]) -> LinkCounters:
        """The link's fields of a saved ``LoaderStats`` (a checkpoint's ``stats``)."""
        return cls(**{f.name: stats[f.name] for f in fields(cls) if f.name in stats})


class ServiceLink:
    """Rank 0's session with the service and its stream thread.

    Args:
        client: the selection service (``SelectionService``: gRPC or in process).
        config: the loader's settings (selection, timeouts, backoff, failure policy).
        labels: int64 (N,) every example's label, sent when a session opens.
        num_classes: C.
        embedding_dim: d of the embeddings the loader sends.
        streams: True on the rank that talks to the service (starts the stream thread).
        step: the loader's current step (for the service's provenance and the log).
        report: the trainer's report on itself now (its counts and payoff), sent with every StartRound for the
            service's monitoring: read when the call is made, or when a round started ahead is queued (``prefetch``).
            None sends nothing to report.
    """

    def __init__(
        self,
        client: SelectionService,
        config: LoaderConfig,
        labels: np.ndarray,
        num_classes: int,
        embedding_dim: int,
        *,
        streams: bool,
        step: Callable[[], int],
        report: Callable[[], TrainerReport] | None = None,
    ) -> None:
        self.client, self.config, self._step, self._report = client, config, step, report
        self.counters = LinkCounters()
        self._labels, self._num_classes, self._embedding_dim = labels, num_classes, embedding_dim
        self.session: SessionInfo | None = None
        self.session_round = 0  # the session's next round id
        self._streamer = RoundStreamer(client, config.queue_size) if streams else None
        self._backoff = 0.0
        self._next_attempt = 0.0
        self._persistent: tuple[str, str] | None = None  # signature of the last persistent failure in the run
        self._persistent_run = 0
        self._last_failure: str | None = None  # the last failed call, described (for ``report_no_coresets``)
        self._ahead: PlanJob | None = None  # the next round, started on the stream thread (``prefetch``)

    # -- rounds ----------------------------------------------------------------------------------------------

    def prefetch(self, num_subsets: int, trainer_step: int) -> None:
        """Start the session's next round of ``num_subsets`` random subsets on the stream thread, for the next
        ``start_round`` of that size to take (rank 0; nothing without a session, during a backoff, or with
        ``config.prefetch_rounds`` off).

        Exact: StartRound draws its subsets from (seed, round id, the session's labels and active pool, the
        count); the round id is the session's next either way, and the pool (learned-example exclusion, with
        ``drop_learned``) changes only when a round's embeddings are submitted. The job runs after the jobs
        queued before it, so after the upload of the round just switched to, the last one before the next
        round is asked for: the draw meets the state the call at that step would meet, with ``drop_learned``
        too. ``trainer_step`` is the step the embeddings are expected at (the region's earliest end); the
        service keeps it for provenance only.
        """
        if self._streamer is None or self.session is None or not self.config.prefetch_rounds:
            return
        if self._ahead is not None or time.monotonic() < self._next_attempt:
            return
        self._ahead = PlanJob(
            self.session.session_id,
            self.session_round,
            num_subsets,
            trainer_step,
            self.counters.wait_s,
            self._trainer_report(),
        )
        self._streamer.submit(self._ahead)

    def planned(self, num_subsets: int) -> RoundPlan | None:
        """The plan of the round started ahead (``prefetch``), once its call has returned, when it is the session's
        next round of ``num_subsets``: the plan the next ``start_round`` of that size will take. Never waits; None
        otherwise (the input pipeline fetches the embedding pass's candidates ahead with it)."""
        ahead = self._ahead
        if ahead is None or not self._is_next(ahead, num_subsets) or not ahead.plan.done() or ahead.plan.cancelled():
            return None
        return None if ahead.plan.exception() is not None else ahead.plan.result()

    def start_round(self, num_subsets: int) -> RoundPlan | None:
        """Start the session's next round of ``num_subsets`` random subsets, opening a session first if needed;
        the round started ahead (``prefetch``) when it is that one, waiting for its call if needed.

        None while the backoff after a failure runs, or when the call failed (handled by ``failed``).
        """
        ahead, self._ahead = self._ahead, None
        if ahead is not None:
            try:
                plan = self._take(ahead, num_subsets)
            except grpc.RpcError as exc:
                if exc.code() not in _MENDED_BY_STARTING:
                    self.failed(exc, "starting a round")
                    return None
                plan = None
            if plan is not None:
                self._backoff = 0.0
                return plan
        if time.monotonic() < self._next_attempt:
            return None
        try:
            plan = self._start_round(num_subsets)
        except grpc.RpcError as exc:
            self.failed(exc, "starting a round")
            return None
        self._backoff = 0.0
        return plan

    def _take(self, ahead: PlanJob, num_subsets: int) -> RoundPlan | None:
        """The plan of the round started ahead, when it is the session's next round of ``num_subsets`` (waiting
        for its call, counted in ``counters.wait_s``); None when it is not, or was cancelled. Raises its call's
        ``grpc.RpcError``, and re-raises anything else it raised (a bug, as on the synchronous path)."""
        if not self._is_next(ahead, num_subsets):
            log.info("round %d started ahead is not the one asked for; starting that one", ahead.session_round)
            return None
        try:
            plan = self._settle(ahead).plan.result(timeout=0)
        except CancelledError:
            return None
        self.counters.rounds_prefetched += 1
        return plan

    def _is_next(self, ahead: PlanJob, num_subsets: int) -> bool:
        """Whether the round started ahead is the session's next round of ``num_subsets``."""
        session = self.session
        return session is not None and (ahead.session_id, ahead.session_round, ahead.num_subsets) == (
            session.session_id,
            self.session_round,
            num_subsets,
        )

    def _settle(self, ahead: PlanJob) -> PlanJob:
        """Wait until ``ahead``'s call has returned (counted in ``counters.wait_s``). Called with no round pending:
        the stream items that arrive meanwhile belong to rounds the loader is done with, and are dropped as
        ``drain`` drops them, so the stream thread never blocks on a full queue."""
        if not ahead.plan.done():
            start = time.perf_counter()
            try:
                while not wait([ahead.plan], timeout=0.05).done:
                    self.drain(None)
            finally:
                self.counters.wait_s += time.perf_counter() - start
        return ahead

    def settle(self) -> None:
        """Wait for the round started ahead, if any, so that ``state_dict`` holds its plan (the loader has no
        round pending while one is ahead)."""
        if self._ahead is not None:
            self._settle(self._ahead)

    def _trainer_report(self) -> TrainerReport | None:
        """The trainer's report now, for a StartRound (None without a ``report`` callable)."""
        return None if self._report is None else self._report()

    def _open_session(self) -> SessionInfo:
        cfg = self.config
        self.session = self.client.create_session(
            self._labels,
            num_classes=self._num_classes,
            settings=cfg.wire_settings(self._embedding_dim),
            client_name=cfg.client_name,
            timeout_s=cfg.first_batch_timeout_s,
        )
        self.session_round = 0
        self.counters.sessions_opened += 1
        log.info("session %s opened at %s (step %d)", self.session.session_id, self.client.target, self._step())
        return self.session

    def _start_round(self, num_subsets: int) -> RoundPlan:
        for _ in range(3):
            session = self.session or self._open_session()
            try:
                return self.client.start_round(
                    session.session_id,
                    self.session_round,
                    self._step(),
                    num_subsets=num_subsets,
                    trainer_wait_s=self.counters.wait_s,  # reported for the service's metrics
                    report=self._trainer_report(),
                )
            except grpc.RpcError as exc:
                if kind_of(exc) is Failure.SESSION_LOST:
                    log.warning("session %s is gone (%s); opening a new one", session.session_id, exc.details())
                    self.session = None
                elif exc.code() in (grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.FAILED_PRECONDITION):
                    self.session_round = int(self.client.session_state(session.session_id).next_round_id)
                else:
                    raise
        raise SelectionUnavailable(f"could not start a round at {self.client.target} after reopening the session")

    def submit(self, round_: int, plan: RoundPlan, embedded: RoundEmbeddings) -> None:
        """Hand the round's embeddings to the stream thread (rank 0); every rank advances the round counter."""
        if self._streamer is not None:
            assert self.session is not None
            self._streamer.submit(
                StreamJob(
                    round_,
                    self.session.session_id,
                    plan.round_id,
                    plan.ids,
                    embedded.embeddings,
                    embedded.labels,
                    embedded.losses,
                )
            )
        self.session_round += 1

    # -- the stream's items ----------------------------------------------------------------------------------

    def _apply(self, item: StreamItem, pending: PendingRound | None) -> bool:
        """Add ``item`` to ``pending`` when it is that round's; False when it is that round's failure."""
        if isinstance(item, StreamEnd):  # a round delivered, even one switched to before its end was read
            self._persistent, self._persistent_run = None, 0
        if pending is None or item.round != pending.round:
            return True  # a round given up on, or switched to already
        if isinstance(item, StreamBatch):
            index = item.batch.subset_index
            if index in pending.coresets:  # would train on one subset twice and on a sibling never
                self.counters.duplicate_batches += 1
                log.warning("round %d: subset %d arrived twice; the second copy is dropped", pending.round, index)
            else:
                pending.coresets[index] = item.batch
                self.counters.batches_received += 1
        elif isinstance(item, StreamEnd):
            pending.ended = True
        else:
            self.failed(item.error, f"streaming round {pending.round}")
            return False
        return True

    def drain(self, pending: PendingRound | None) -> bool:
        """Add every item queued so far to ``pending``; False when its stream failed (see ``failed``)."""
        assert self._streamer is not None, "only rank 0 streams"
        alive = True
        while True:
            try:
                item = self._streamer.items.get_nowait()
            except queue.Empty:
                return alive
            alive = self._apply(item, pending if alive else None) and alive

    def wait(self, pending: PendingRound, timeout_s: float) -> bool:
        """Block until ``pending`` is ready, its stream fails, or ``timeout_s`` passes (counted in
        ``counters.wait_s``); False when it failed."""
        assert self._streamer is not None, "only rank 0 streams"
        start = time.perf_counter()
        deadline = start + timeout_s
        try:
            while not pending.ready:
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    return True
                try:
                    item = self._streamer.items.get(timeout=remaining)
                except queue.Empty:
                    return True
                if not self._apply(item, pending):
                    return False
            return True
        finally:
            self.counters.wait_s += time.perf_counter() - start

    # -- failures --------------------------------------------------------------------------------------------

    def report_no_coresets(self, fallback_batches: int) -> None:
        """Say loudly (an ERROR) that the run has trained on ``fallback_batches`` uniform batches and no coreset yet:
        a wrong endpoint, token or TLS setting is otherwise a quiet uniform run (rank 0 only)."""
        if self._streamer is None:
            return
        if self._last_failure is None:
            why = "it has not failed, but no round has come back: is it selecting for another, larger job?"
        else:
            why = f"{self.counters.service_errors} failed call(s), the last while {self._last_failure}"
        log.error(
            "step %d: no coreset yet: all %d batches so far were uniform fallbacks, so selection is not running. "
            "Selection service at %s: %s. Check the endpoint and its credentials (CREST_AUTH_TOKEN, TLS), or set "
            "LoaderConfig(strict=True) to stop instead of training on uniform batches",
            self._step(),
            fallback_batches,
            self.client.target,
            why,
        )

    def failed(self, exc: BaseException, doing: str) -> None:
        """Apply the failure policy (module docstring) to ``exc``, raised while ``doing``: raise, or count it
        and schedule the next attempt (the caller gives the round up)."""
        kind = kind_of(exc)
        if kind is Failure.FATAL:
            raise exc
        self.counters.service_errors += 1
        what = describe(exc)
        self._last_failure = f"{doing}: {what}"
        if kind is Failure.PERSISTENT:
            assert isinstance(exc, grpc.RpcError)
            self.counters.persistent_failures += 1
            sig = signature(exc)
            self._persistent_run = self._persistent_run + 1 if sig == self._persistent else 1
            self._persistent = sig
            if self._persistent_run >= self.config.max_persistent_failures:
                raise SelectionUnavailable(
                    f"selection service at {self.client.target} failed the same way {self._persistent_run} times "
                    f"in a row (last while {doing}): {what}. This is a failure on the service's side that "
                    "retrying does not mend: see the service's log"
                ) from exc
        if self.config.strict:
            raise SelectionUnavailable(
                f"selection service at {self.client.target} failed while {doing}: {what}"
            ) from exc
        self._backoff = min(max(2 * self._backoff, self.config.reconnect_initial_s), self.config.reconnect_max_s)
        self._next_attempt = time.monotonic() + self._backoff
        if kind is Failure.PERSISTENT:
            log.error(
                "step %d: selection service at %s failed while %s: %s (%d of %d in a row before the loader stops); "
                "training on uniform batches, retrying in %.1f s",
                self._step(),
                self.client.target,
                doing,
                what,
                self._persistent_run,
                self.config.max_persistent_failures,
                self._backoff,
            )
            return
        log.warning(
            "step %d: selection service at %s failed while %s (%s); training on uniform batches, retrying in %.1f s",
            self._step(),
            self.client.target,
            doing,
            exc.code() if isinstance(exc, grpc.RpcError) else what,
            self._backoff,
        )

    # -- checkpoints and closing -----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The session, its next round, and the round started ahead when its plan is there (``settle`` first):
        the service has started that round, so a resumed loader must train it rather than ask for it."""
        ahead, prefetched = self._ahead, None
        if ahead is not None and ahead.plan.done() and not ahead.plan.cancelled() and ahead.plan.exception() is None:
            prefetched = plan_state(ahead)
        return {
            "session": asdict(self.session) if self.session else None,
            "session_round": self.session_round,
            "prefetched": prefetched,
        }

    def resume(self, state: dict[str, Any], step: int) -> None:
        """Continue with the session of ``state_dict()``: rank 0 keeps it when the service still has it at the
        saved round, or one round further with that round's plan saved (else opens a new one at the next
        round); the other ranks take rank 0's at the next service step."""
        self.session_round = int(state["session_round"])
        self.counters = LinkCounters.of(state["stats"])
        saved = state["session"]
        if self._streamer is None or saved is None:
            self.session = None if saved is None else SessionInfo(**saved)
            return
        session = SessionInfo(**saved)
        ahead = state.get("prefetched")  # absent from checkpoints written before rounds were started ahead
        self._ahead = None if ahead is None else plan_of_state(session.session_id, ahead)
        self.session = self._adopt(session, step)
        if self.session is None:
            self._ahead = None

    def _adopt(self, session: SessionInfo, step: int) -> SessionInfo | None:
        self.client.attach_session(session)
        try:
            next_round = int(
                self.client.session_state(session.session_id, timeout_s=self.config.deadline_s).next_round_id
            )
        except grpc.RpcError as exc:
            if kind_of(exc) is Failure.SESSION_LOST:
                log.warning(
                    "session %s is gone; resuming with a new session (different random subsets from now on)",
                    session.session_id,
                )
                return None
            log.warning(
                "could not reach %s to check session %s (%s); will retry",
                self.client.target,
                session.session_id,
                exc.code(),
            )
            return session
        if self._ahead is not None and next_round == self.session_round + 1:
            log.info(
                "resumed session %s at round %d, step %d, with round %d started ahead",
                session.session_id,
                self.session_round,
                step,
                self.session_round,
            )
            return session
        if self._ahead is not None and next_round == self.session_round:  # its state predates the call
            log.info("session %s has not started round %d; it is drawn again", session.session_id, next_round)
            self._ahead = None
        if next_round != self.session_round:
            log.warning(
                "session %s is at round %d, the checkpoint at %d; resuming with a new session",
                session.session_id,
                next_round,
                self.session_round,
            )
            return None
        log.info("resumed session %s at round %d, step %d", session.session_id, next_round, step)
        return session

    def close(self, end_session: bool) -> None:
        """Stop the stream thread and, when ``end_session``, close the session (rank 0 only)."""
        if self._streamer is None:  # a DDP rank other than 0: the session is rank 0's to close
            return
        self._streamer.stopping.set()
        try:
            if end_session and self.session is not None:
                self.client.close_session(self.session.session_id, timeout_s=self.config.deadline_s)
        except grpc.RpcError as exc:
            if self.config.strict and kind_of(exc) is not Failure.SESSION_LOST:
                raise
            log.warning("could not close session %s: %s", self.session.session_id if self.session else "", exc.code())
        finally:
            self._streamer.stop()
