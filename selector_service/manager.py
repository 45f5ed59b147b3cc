"""The sessions of one service and the rounds they run: the service's domain operations, with no gRPC in them.

A session (``session.Session``) holds one training job's labels, active pool and configuration. Each round
(``rounds.Round``) draws P class-balanced random subsets from the active pool, receives the trainer's embeddings
of their union in one matrix, hands the backend that matrix with each subset's rows (the backend deals the
subsets out to its workers in stacked shares), and yields each weighted batch as soon as it is selected.
Every method validates its whole input before it changes anything, so a rejected call leaves the session as
it was.
"""

from __future__ import annotations

import logging
import math
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import as_completed
from dataclasses import dataclass

import numpy as np

from crest.selector.v1.api import TrainerReport
from selector_service import tokens, trainer_report
from selector_service.backends import SelectionBackend
from selector_service.errors import (
    AlreadyExists,
    Cancelled,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    SelectorFailure,
)
from selector_service.persistence import SessionStore
from selector_service.provenance import ProvenanceLog, batch_record
from selector_service.rounds import EmbeddingPart, Round, RoundPlan, RoundState, Upload
from selector_service.session import (
    RECENT_ROUNDS,
    Limits,
    Session,
    SessionConfig,
    SessionSnapshot,
    validate_config,
)
from selector_service.subsets import class_balanced_subsets
from selector_service.tasks import Batch

log = logging.getLogger(__name__)

__all__ = ["NewSession", "SessionManager", "SessionReport"]


@dataclass(frozen=True)
class NewSession:
    """A session just created, with its token (returned to the creator once, never stored in clear)."""

    session: Session
    token: str


@dataclass(frozen=True)
class SessionReport:
    """An open session's trainer report and what names the session (the per-session metrics' labels)."""

    session_id: str
    client_name: str
    report: TrainerReport


class SessionManager:
    """All sessions of one service, and the backend their selection runs on."""

    def __init__(
        self,
        backend: SelectionBackend,
        limits: Limits | None = None,
        store: SessionStore | None = None,
        provenance: ProvenanceLog | None = None,
    ) -> None:
        self.backend = backend
        self.limits = limits or Limits()
        self.store = store
        self.provenance = provenance
        # Called with every delivered batch (metrics); exceptions in hooks propagate to the stream.
        self.batch_hooks: list[Callable[[Batch], None]] = []
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()
        if store is not None:
            self._restore(store)

    def _restore(self, store: SessionStore) -> None:
        for state in store.load_all():
            try:
                session = Session.from_state_dict(state)
            except (InvalidArgument, KeyError, TypeError, ValueError) as exc:
                log.error("cannot restore session %s: %s", state.get("session_id"), exc)
                continue
            self._sessions[session.id] = session
            log.info(
                "restored session %s (%s): next round %d, %d of %d examples active",
                session.id,
                session.client_name,
                session.next_round_id,
                int(session.exclusion.active.sum()),
                len(session.labels),
            )

    def _checkpoint(self, s: Session) -> None:
        """Write the session's state when a store is configured (ordered per session, atomic on disk)."""
        if self.store is None:
            return
        with s.save_lock:
            with s.lock:
                state = s.state_dict()
            if s.id in self._sessions:  # a session closed meanwhile stays deleted
                self.store.save(state)

    # -- sessions -------------------------------------------------------------------------------------------

    def create(
        self, labels: np.ndarray, num_classes: int, config: SessionConfig, client_name: str = "", owner: str = ""
    ) -> NewSession:
        """Register a dataset by its labels (int64 (N,)); ``num_classes`` 0 means max(labels) + 1.

        ``owner`` names the calling client (its address), for ``Limits.max_sessions_per_client``.

        Returns the session and its token, which every later call naming the session must present
        (``authorize``); the manager keeps only the token's digest.
        """
        n = len(labels)
        if n == 0:
            raise InvalidArgument("labels is empty: a session needs the label of every example")
        if n > self.limits.max_dataset_size:
            raise ResourceExhausted(f"dataset_size {n} exceeds the limit {self.limits.max_dataset_size}")
        lo, hi = int(labels.min()), int(labels.max())
        num_classes = num_classes or hi + 1
        if num_classes < 2:
            raise InvalidArgument(f"num_classes must be >= 2, received {num_classes} (labels in [{lo}, {hi}])")
        if lo < 0 or hi >= num_classes:
            raise InvalidArgument(f"labels must be in [0, {num_classes}), received values in [{lo}, {hi}]")
        config = validate_config(config, num_classes, self.limits)
        with self._lock:
            if len(self._sessions) >= self.limits.max_sessions:
                raise ResourceExhausted(
                    f"{len(self._sessions)} sessions are open, the limit is {self.limits.max_sessions}; close one first"
                )
            owned = sum(1 for other in self._sessions.values() if owner and other.owner == owner)
            if owned >= self.limits.max_sessions_per_client:
                raise ResourceExhausted(
                    f"client {owner} has {owned} open sessions, the limit per client is "
                    f"{self.limits.max_sessions_per_client}; close one first"
                )
            token, token_digest = tokens.issue()
            session = Session(
                uuid.uuid4().hex,
                labels.astype(np.int64, copy=True),
                num_classes,
                config,
                client_name or "unnamed",
                token_digest,
                owner,
            )
            self._sessions[session.id] = session
        log.info(
            "session %s (%s): N=%d C=%d r=%d m=%d P=%d",
            session.id,
            session.client_name,
            n,
            num_classes,
            session.subset_size,
            config.batch_size,
            config.num_subsets,
        )
        self._checkpoint(session)
        return NewSession(session, token)

    def totals(self) -> dict[str, float]:
        """Counts over all open sessions (for metrics)."""
        with self._lock:
            sessions = list(self._sessions.values())
        keys = ("rounds_started", "rounds_completed", "batches_delivered", "examples_delivered", "trainer_wait_s")
        out: dict[str, float] = dict.fromkeys((*keys, "rounds_in_flight", "excluded"), 0)
        for s in sessions:
            with s.lock:
                out["rounds_started"] += s.next_round_id
                out["rounds_completed"] += s.rounds_completed
                out["batches_delivered"] += s.batches_delivered
                out["examples_delivered"] += s.examples_delivered
                out["rounds_in_flight"] += len(s.rounds)
                out["excluded"] += int(s.exclusion.excluded.sum())
                out["trainer_wait_s"] += s.trainer_wait_s
        out["sessions"] = len(sessions)
        return out

    def trainer_reports(self) -> list[SessionReport]:
        """The trainer's report of every open session (for per-session metrics), in no particular order."""
        with self._lock:
            sessions = list(self._sessions.values())
        out = []
        for s in sessions:
            with s.lock:
                out.append(SessionReport(s.id, s.client_name, s.trainer_report))
        return out

    def get(self, session_id: str) -> Session:
        with self._lock:
            session = self._sessions.get(session_id)
        if session is None:
            raise NotFound(f"unknown session {session_id!r} (never created, or closed)")
        return session

    def authorize(self, session_id: str, token: str | None) -> None:
        """Raise ``NotFound`` for an unknown session, ``Unauthenticated`` / ``PermissionDenied`` unless ``token``
        is the session's. Changes nothing."""
        tokens.verify(session_id, self.get(session_id).token_digest, token)

    def close(self, session_id: str) -> int:
        """Close a session; returns its number of completed rounds. Streams of its rounds still open end with
        ``Cancelled``."""
        with self._lock:
            session = self._sessions.pop(session_id, None)
        if session is None:
            raise NotFound(f"unknown session {session_id!r} (never created, or already closed)")
        with session.lock:
            session.cancel_rounds()
        if self.store is not None:
            with session.save_lock:
                self.store.delete(session_id)
        log.info("session %s closed after %d rounds", session_id, session.rounds_completed)
        return session.rounds_completed

    def snapshot(self, session_id: str) -> SessionSnapshot:
        s = self.get(session_id)
        with s.lock:
            return s.snapshot()

    # -- rounds ---------------------------------------------------------------------------------------------

    def start_round(
        self,
        session_id: str,
        round_id: int,
        trainer_step: int,
        num_subsets: int = 0,
        trainer_wait_s: float = 0.0,
        report: TrainerReport | None = None,
    ) -> RoundPlan:
        """Draw the round's random subsets (``num_subsets``, 0: the session's P) and return the ids to embed.

        ``trainer_wait_s`` and ``report`` (None: ``TrainerReport()``, what a call that sets none of its fields
        carries over gRPC) are the trainer's, kept for monitoring (``trainer_report.merge``)."""
        s = self.get(session_id)
        if not (math.isfinite(trainer_wait_s) and trainer_wait_s >= 0):
            raise InvalidArgument(f"trainer_wait_s must be a finite number of seconds >= 0, received {trainer_wait_s}")
        report = trainer_report.validate(report or TrainerReport())
        if not 0 <= num_subsets <= s.config.num_subsets:
            raise InvalidArgument(
                f"num_subsets {num_subsets} exceeds the session's {s.config.num_subsets} (0 means the session's)"
            )
        with s.lock:
            if round_id < s.next_round_id:
                raise AlreadyExists(
                    f"round {round_id} of session {session_id} was already started; the next round is {s.next_round_id}"
                )
            if round_id > s.next_round_id:
                raise FailedPrecondition(
                    f"round {round_id} is out of order: session {session_id} expects round {s.next_round_id} next"
                )
            in_flight = len(s.rounds)
            if in_flight >= self.limits.max_rounds_in_flight:
                raise ResourceExhausted(
                    f"session {session_id} has {in_flight} rounds in flight, the limit is "
                    f"{self.limits.max_rounds_in_flight}; stream their batches first"
                )
            rng = np.random.default_rng([s.config.seed, round_id])
            s.trainer_wait_s = max(s.trainer_wait_s, trainer_wait_s)
            s.trainer_report = trainer_report.merge(s.trainer_report, report)
            count = num_subsets or s.config.num_subsets
            subsets = class_balanced_subsets(s.labels, s.exclusion.active, s.quota, count, rng)
            ids = np.unique(np.concatenate(subsets))
            if s.config.exclusion.enabled:
                retest = s.exclusion.retest_ids(int(np.ceil(s.config.retest_fraction * len(ids))), rng)
                ids = np.union1d(ids, retest)
            s.rounds[round_id] = Round(round_id, trainer_step, subsets, ids)
            s.next_round_id += 1
        self._checkpoint(s)  # round ids stay unique across a restart
        return RoundPlan(session_id, round_id, ids, len(subsets))

    @staticmethod
    def _planned_round(s: Session, round_id: int) -> Round:
        rnd = s.rounds.get(round_id)
        if rnd is None:
            raise NotFound(
                f"session {s.id} has no open round {round_id} (next round is {s.next_round_id}; "
                "delivered rounds are closed)"
            )
        if rnd.state != RoundState.PLANNED:
            raise FailedPrecondition(
                f"round {round_id} of session {s.id} already received its embeddings (state {rnd.state.name})"
            )
        return rnd

    def submit_embeddings(self, parts: Iterable[EmbeddingPart]) -> tuple[str, int, int]:
        """Receive a round's embeddings, validate them as a whole, then dispatch selection.

        Returns (session_id, round_id, number of rows received).
        """
        it = iter(parts)
        first = next(it, None)
        if first is None:
            raise InvalidArgument("received no embedding messages; send every id of the round's plan")
        s = self.get(first.session_id)
        with s.lock:
            rnd = self._planned_round(s, first.round_id)
        upload = Upload(s.id, rnd, s.labels, s.dim)
        upload.add(first, 0)
        for index, part in enumerate(it, start=1):
            upload.add(part, index)
        upload.check_complete()
        with s.lock:
            rnd = self._planned_round(s, first.round_id)  # a concurrent submit may have won the race
            c = s.config
            work = rnd.selection_input(
                s.id, s.labels, upload.embeddings, c.batch_size, c.similarity, joint=c.joint_selection
            )
            # Dispatch first: a backend that cannot take the round (closed, no workers) leaves it as it was.
            rnd.dispatch(self.backend.submit(work))
            if s.config.exclusion.enabled:
                self._update_exclusion(s, rnd.round_id, rnd.ids, upload.losses)
        if s.config.exclusion.enabled:
            self._checkpoint(s)
        return s.id, rnd.round_id, len(rnd.ids)

    @staticmethod
    def _update_exclusion(s: Session, round_id: int, ids: np.ndarray, losses: np.ndarray) -> None:
        sent = ~np.isnan(losses)
        s.exclusion.record(ids[sent], losses[sent])
        update = s.exclusion.update()
        if len(update.excluded) or len(update.readmitted):
            log.info(
                "session %s round %d: excluded %d learned examples, re-admitted %d; active %d/%d",
                s.id,
                round_id,
                len(update.excluded),
                len(update.readmitted),
                int(s.exclusion.active.sum()),
                len(s.labels),
            )

    def _record(self, batch: Batch, rounds_behind: int) -> None:
        if self.provenance is not None:
            self.provenance.append(batch_record(batch, rounds_behind))
        for hook in self.batch_hooks:
            hook(batch)

    def batches(self, session_id: str, round_id: int, received: Iterable[int] = ()) -> Iterator[Batch]:
        """Yield the round's batches the caller does not hold yet, as their selection finishes (completion order).

        ``received`` names the subset indices the trainer already holds from an interrupted stream of this
        round; every other batch is sent (again, if an earlier stream sent it before breaking), so a dropped
        connection loses nothing and the trainer sees each batch once. A new stream of a round supersedes one
        still open. The round completes when every batch has been sent; its batches stay available to such a
        retry for the session's last ``RECENT_ROUNDS`` completed rounds. Closing the session ends an open
        stream with ``Cancelled``.
        """
        s = self.get(session_id)
        with s.lock:
            rnd = s.rounds.get(round_id) or s.finished.get(round_id)
            if rnd is None:
                raise NotFound(
                    f"session {session_id} has no open round {round_id} (next round is {s.next_round_id}; rounds "
                    f"older than the last {RECENT_ROUNDS} delivered are closed)"
                )
            stream = rnd.open_stream(received, session_id)
            held = [(batch, s.count_delivery(rnd, batch)) for batch in stream.held]
        for batch, behind in held:
            if behind is not None:
                self._record(batch, behind)
        for future in as_completed(stream.pending):  # a future withdrawn by close() comes out at once
            with s.lock:
                if rnd.state == RoundState.CANCELLED:  # set before any future is withdrawn
                    raise Cancelled(f"session {session_id} was closed while round {round_id} was streaming")
                if not rnd.is_current(stream.generation):
                    return  # a newer stream of this round (the trainer's retry) took over
            try:
                batch = future.result()
            except Exception as exc:
                with s.lock:
                    if rnd.fail():
                        s.retire(rnd)
                raise SelectorFailure(
                    f"selection of round {round_id} of session {session_id} failed: {type(exc).__name__}: {exc}"
                ) from exc
            yield batch
            with s.lock:
                behind = s.count_delivery(rnd, batch)
            if behind is not None:
                self._record(batch, behind)
        with s.lock:
            complete = rnd.complete()
            if complete:
                s.retire(rnd)
        if complete:
            self._checkpoint(s)
