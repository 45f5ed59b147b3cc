"""Sessions and selection rounds: the service's domain state, with no gRPC in it.

A session holds one training job's dataset labels, active pool and configuration (``session.py``). Each round
draws P class-balanced random subsets from the active pool, receives the trainer's embeddings of their union,
hands the backend one selection task per subset (it deals them out to its workers), and yields each weighted
batch as soon as it is selected.
Every method validates its whole input before it changes anything, so a rejected call leaves the session
as it was.
"""

from __future__ import annotations

import logging
import math
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import as_completed
from dataclasses import dataclass
from typing import Any

import numpy as np

from selector_service import tokens
from selector_service.backends import SelectionBackend, SelectionResult, SelectionTask
from selector_service.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    SelectorFailure,
)
from selector_service.persistence import SessionStore
from selector_service.provenance import ProvenanceLog
from selector_service.session import (
    Batch,
    EmbeddingPart,
    Limits,
    RoundPlan,
    RoundState,
    Session,
    SessionConfig,
    SessionSnapshot,
    _Round,
    _validate_config,
)
from selector_service.subsets import class_balanced_subsets

log = logging.getLogger(__name__)

# Completed rounds per session whose batches stay available to a retried stream (a dropped connection).
RECENT_ROUNDS = 4

__all__ = [
    "Batch",
    "EmbeddingPart",
    "Limits",
    "NewSession",
    "RoundPlan",
    "SessionConfig",
    "SessionManager",
    "SessionSnapshot",
]


@dataclass(frozen=True)
class NewSession:
    """A session just created, with its token (returned to the creator once, never stored in clear)."""

    session: Session
    token: str


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
        config = _validate_config(config, num_classes, self.limits)
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
        out: dict[str, float] = dict.fromkeys(
            (
                "rounds_started",
                "rounds_completed",
                "batches_delivered",
                "examples_delivered",
                "rounds_in_flight",
                "excluded",
                "trainer_wait_s",
            ),
            0,
        )
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
        """Close a session; returns its number of completed rounds."""
        with self._lock:
            session = self._sessions.pop(session_id, None)
        if session is None:
            raise NotFound(f"unknown session {session_id!r} (never created, or already closed)")
        with session.lock:
            for rnd in session.rounds.values():
                for f in rnd.futures:
                    f.cancel()
            session.rounds.clear()
            session.finished.clear()
        if self.store is not None:
            with session.save_lock:
                self.store.delete(session_id)
        log.info("session %s closed after %d rounds", session_id, session.rounds_completed)
        return session.rounds_completed

    def snapshot(self, session_id: str) -> SessionSnapshot:
        s = self.get(session_id)
        with s.lock:
            excluded = int(s.exclusion.excluded.sum())
            return SessionSnapshot(
                s.id,
                len(s.labels),
                len(s.labels) - excluded,
                s.next_round_id,
                s.rounds_completed,
                s.batches_delivered,
                s.examples_delivered,
                s.config,
                s.num_classes,
                s.next_round_id,
                excluded,
                s.exclusion.readmitted_total,
                s.trainer_wait_s,
            )

    # -- rounds ---------------------------------------------------------------------------------------------

    def start_round(
        self, session_id: str, round_id: int, trainer_step: int, num_subsets: int = 0, trainer_wait_s: float = 0.0
    ) -> RoundPlan:
        """Draw the round's random subsets (``num_subsets``, 0: the session's P) and return the ids to embed."""
        s = self.get(session_id)
        if not (math.isfinite(trainer_wait_s) and trainer_wait_s >= 0):
            raise InvalidArgument(f"trainer_wait_s must be a finite number of seconds >= 0, received {trainer_wait_s}")
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
            count = num_subsets or s.config.num_subsets
            subsets = class_balanced_subsets(s.labels, s.exclusion.active, s.quota, count, rng)
            ids = np.unique(np.concatenate(subsets))
            if s.config.exclusion.enabled:
                retest = s.exclusion.retest_ids(int(np.ceil(s.config.retest_fraction * len(ids))), rng)
                ids = np.union1d(ids, retest)
            s.rounds[round_id] = _Round(round_id, trainer_step, subsets, ids)
            s.next_round_id += 1
        self._checkpoint(s)  # round ids stay unique across a restart
        return RoundPlan(session_id, round_id, ids, len(subsets))

    def _planned_round(self, s: Session, round_id: int) -> _Round:
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
        plan = rnd.ids
        emb = np.empty((len(plan), s.dim), dtype=np.float32)
        losses = np.full(len(plan), np.nan, dtype=np.float32)  # NaN: not sent
        seen = np.zeros(len(plan), dtype=bool)
        for index, part in enumerate(_chain(first, it)):
            self._stage(s, rnd, part, index, emb, losses, seen)
        if not seen.all():
            missing = plan[~seen]
            raise InvalidArgument(
                f"received {int(seen.sum())} of the {len(plan)} ids of round {rnd.round_id}; "
                f"missing {len(missing)}, e.g. {missing[:5].tolist()}"
            )
        with s.lock:
            rnd = self._planned_round(s, first.round_id)  # a concurrent submit may have won the race
            # Dispatch first: a backend that cannot take the round (closed, no workers) leaves it as it was.
            futures = self.backend.submit([self._task(s, rnd, i, sub, emb) for i, sub in enumerate(rnd.subsets)])
            rnd.state = RoundState.EMBEDDED
            if s.config.exclusion.enabled:
                self._update_exclusion(s, rnd.round_id, plan, losses)
            rnd.futures = futures
        if s.config.exclusion.enabled:
            self._checkpoint(s)
        return s.id, rnd.round_id, len(plan)

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

    def _stage(
        self,
        s: Session,
        rnd: _Round,
        part: EmbeddingPart,
        index: int,
        emb: np.ndarray,
        losses: np.ndarray,
        seen: np.ndarray,
    ) -> None:
        where = f"message {index} of round {rnd.round_id}"
        if (part.session_id, part.round_id) != (s.id, rnd.round_id):
            raise InvalidArgument(
                f"{where} names session {part.session_id!r} round {part.round_id}, but the stream "
                f"started with session {s.id!r} round {rnd.round_id}"
            )
        if part.embeddings.shape[1] != s.dim:
            raise InvalidArgument(f"{where}: embedding dim {part.embeddings.shape[1]}, the session expects {s.dim}")
        pos = np.searchsorted(rnd.ids, part.ids)
        pos = np.minimum(pos, len(rnd.ids) - 1)
        foreign = rnd.ids[pos] != part.ids
        if foreign.any():
            raise InvalidArgument(
                f"{where}: id {int(part.ids[foreign][0])} is not in the round's plan ({int(foreign.sum())} such ids)"
            )
        if seen[pos].any():
            raise InvalidArgument(f"{where}: id {int(part.ids[seen[pos]][0])} was already sent in an earlier message")
        uniq, counts = np.unique(pos, return_counts=True)
        if (counts > 1).any():
            raise InvalidArgument(f"{where}: id {int(rnd.ids[uniq[counts > 1][0]])} appears more than once")
        if not np.isfinite(part.embeddings).all():
            row = int(np.flatnonzero(~np.isfinite(part.embeddings).all(axis=1))[0])
            raise InvalidArgument(
                f"{where}: embedding of id {int(part.ids[row])} is not finite: {part.embeddings[row][:8].tolist()}"
            )
        if part.labels is not None and not np.array_equal(part.labels, s.labels[part.ids]):
            row = int(np.flatnonzero(part.labels != s.labels[part.ids])[0])
            raise InvalidArgument(
                f"{where}: label {int(part.labels[row])} for id {int(part.ids[row])}, but the "
                f"session was created with label {int(s.labels[part.ids[row]])}"
            )
        if part.losses is not None and not (np.isfinite(part.losses).all() and (part.losses >= 0).all()):
            row = int(np.flatnonzero(~(np.isfinite(part.losses) & (part.losses >= 0)))[0])
            raise InvalidArgument(
                f"{where}: loss {float(part.losses[row])} for id {int(part.ids[row])} is not a "
                "finite non-negative number"
            )
        emb[pos] = part.embeddings
        if part.losses is not None:
            losses[pos] = part.losses
        seen[pos] = True

    def _task(self, s: Session, rnd: _Round, index: int, subset: np.ndarray, emb: np.ndarray) -> SelectionTask:
        rows = np.searchsorted(rnd.ids, subset)
        return SelectionTask(
            s.id, rnd.round_id, index, subset, s.labels[subset], emb[rows], s.config.batch_size, s.config.similarity
        )

    def _record(self, batch: Batch, rounds_behind: int) -> None:
        if self.provenance is not None:
            self.provenance.append(_provenance_record(batch, rounds_behind))
        for hook in self.batch_hooks:
            hook(batch)

    @staticmethod
    def _mark_delivered(s: Session, rnd: _Round, result: SelectionResult) -> tuple[Batch | None, int]:
        """Count a sent batch once (call under ``s.lock``); returns it when first sent (to record), and staleness."""
        behind = s.next_round_id - 1 - rnd.round_id
        if result.subset_index in rnd.delivered:
            return None, behind
        rnd.delivered.add(result.subset_index)
        s.batches_delivered += 1
        s.examples_delivered += len(result.ids)
        return _batch(s, rnd, result), behind

    def batches(self, session_id: str, round_id: int, received: Iterable[int] = ()) -> Iterator[Batch]:
        """Yield the round's batches the caller does not hold yet, as their selection finishes (completion order).

        ``received`` names the subset indices the trainer already holds from an interrupted stream of this
        round; every other batch is sent (again, if an earlier stream sent it before breaking), so a dropped
        connection loses nothing and the trainer sees each batch once. A new stream of a round supersedes one
        still open. The round completes when every batch has been sent; its batches stay available to such a
        retry for the session's last ``RECENT_ROUNDS`` completed rounds.
        """
        s = self.get(session_id)
        with s.lock:
            rnd = s.rounds.get(round_id) or s.finished.get(round_id)
            if rnd is None:
                raise NotFound(
                    f"session {session_id} has no open round {round_id} (next round is {s.next_round_id}; rounds "
                    f"older than the last {RECENT_ROUNDS} delivered are closed)"
                )
            count = len(rnd.subsets)
            held = set(received)
            if bad := sorted(i for i in held if not 0 <= i < count):
                raise InvalidArgument(f"received_subsets holds {bad[:5]}; round {round_id} has subsets 0..{count - 1}")
            if rnd.state == RoundState.PLANNED:
                raise FailedPrecondition(
                    f"round {round_id} of session {session_id} has no embeddings yet; call SubmitEmbeddings first"
                )
            if rnd.state == RoundState.FAILED:
                raise SelectorFailure(f"round {round_id} of session {session_id} failed in selection")
            # Batches the trainer says it holds were sent by an earlier stream that broke before it could record
            # them: record them now (once), so the round completes and provenance has every batch.
            unsent = sorted(i for i in held if not (rnd.futures[i].done() and rnd.futures[i].exception() is None))
            if unsent:
                raise InvalidArgument(
                    f"received_subsets holds {unsent[:5]}, which round {round_id} has not selected yet, so no "
                    "stream can have sent them"
                )
            acknowledged = [self._mark_delivered(s, rnd, rnd.futures[i].result()) for i in sorted(held)]
            rnd.stream_gen += 1
            gen = rnd.stream_gen
            wanted = [rnd.futures[i] for i in range(count) if i not in held]
        for batch, behind in acknowledged:
            if batch is not None:
                self._record(batch, behind)
        for future in as_completed(wanted):
            try:
                result = future.result()
            except Exception as exc:
                with s.lock:
                    rnd.state = RoundState.FAILED
                raise SelectorFailure(
                    f"selection of round {round_id} of session {session_id} failed: {type(exc).__name__}: {exc}"
                ) from exc
            with s.lock:
                if rnd.stream_gen != gen:
                    return  # a newer stream of this round (the trainer's retry) took over
            yield _batch(s, rnd, result)
            with s.lock:
                first, behind = self._mark_delivered(s, rnd, result)
            if first is not None:
                self._record(first, behind)
        with s.lock:
            complete = rnd.state == RoundState.EMBEDDED and len(rnd.delivered) == count
            if complete:
                rnd.state = RoundState.DELIVERED
                s.rounds.pop(round_id, None)
                s.finished[round_id] = rnd
                while len(s.finished) > RECENT_ROUNDS:
                    s.finished.popitem(last=False)
                s.rounds_completed += 1
        if complete:
            self._checkpoint(s)


def _batch(s: Session, rnd: _Round, result: SelectionResult) -> Batch:
    return Batch(
        s.id,
        rnd.round_id,
        result.subset_index,
        result.ids,
        result.weights,
        rnd.trainer_step,
        result.selection_ms,
        result.worker,
    )


def _provenance_record(batch: Batch, rounds_behind: int) -> dict[str, Any]:
    return {
        "session_id": batch.session_id,
        "round_id": batch.round_id,
        "subset_index": batch.subset_index,
        "trainer_step": batch.trainer_step,
        "rounds_behind": rounds_behind,
        "worker": batch.worker,
        "selection_ms": round(batch.selection_ms, 3),
        "size": len(batch.ids),
        "ids": batch.ids.tolist(),
        "weights": [round(float(w), 6) for w in batch.weights],
    }


def _chain(first: EmbeddingPart, rest: Iterator[EmbeddingPart]) -> Iterator[EmbeddingPart]:
    yield first
    yield from rest
