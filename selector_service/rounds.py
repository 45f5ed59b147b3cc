"""A selection round: its plan, the upload of its embeddings, its selection futures and its streams.

``Round`` owns the round's state machine (``RoundState``); every transition is one of its methods, called under
the owning session's lock. ``Upload`` checks a round's embeddings as their messages arrive, apart from the round,
so a rejected upload leaves the round as it was. No gRPC here.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from enum import IntEnum

import numpy as np

from selector_service.errors import Cancelled, FailedPrecondition, InvalidArgument, SelectorFailure
from selector_service.tasks import Batch, RoundInput, withdraw


class RoundState(IntEnum):
    """Life of a round.

    PLANNED -> EMBEDDED     SubmitEmbeddings accepted the embeddings and the backend took the round's shares
    EMBEDDED -> DELIVERED   every batch was sent at least once; the round joins the session's recent rounds
    EMBEDDED -> FAILED      a selector call failed; every later stream of the round reports it
    any -> CANCELLED        the session was closed; a stream still open ends with CANCELLED
    FAILED and CANCELLED are final. A DELIVERED round still serves streams that retry a broken one.
    """

    PLANNED = 0
    EMBEDDED = 1
    DELIVERED = 2
    FAILED = 3
    CANCELLED = 4


@dataclass(frozen=True)
class RoundPlan:
    """Ids the trainer must embed for a round: int64 (n,), sorted, unique."""

    session_id: str
    round_id: int
    ids: np.ndarray
    num_subsets: int


@dataclass(frozen=True)
class EmbeddingPart:
    """One streamed piece of a round's embeddings, already decoded (shapes agree with ``ids``)."""

    session_id: str
    round_id: int
    ids: np.ndarray  # int64 (n,)
    embeddings: np.ndarray  # float32 (n, d)
    labels: np.ndarray | None  # int64 (n,) or None when not sent
    losses: np.ndarray | None  # float32 (n,) or None when not sent


@dataclass(frozen=True)
class StreamStart:
    """A stream of a round, just opened (``Round.open_stream``).

    Attributes:
        generation: the stream's number; only the round's newest stream sends.
        held: batches the trainer says it holds, which the round may not have counted yet.
        pending: futures of the batches to send, in subset order.
    """

    generation: int
    held: list[Batch]
    pending: list[Future[Batch]]


class Round:
    """One round of a session.

    Attributes:
        round_id, trainer_step: the round, and the trainer step its embeddings are computed at.
        subsets: P int64 arrays, the ids of each random subset (sorted).
        ids: int64 (n,) the sorted union of the subsets (the ids to embed).
        subset_rows: P int64 arrays, each subset's positions in ``ids``.
        state: see ``RoundState``.
        futures: one per subset once EMBEDDED, in subset order.
        delivered: subsets sent at least once.
        stream_gen: streams opened so far; only the newest one sends.
    """

    def __init__(self, round_id: int, trainer_step: int, subsets: Sequence[np.ndarray], ids: np.ndarray) -> None:
        self.round_id = round_id
        self.trainer_step = trainer_step
        self.subsets = list(subsets)
        self.ids = ids
        self.subset_rows = [np.searchsorted(ids, s) for s in self.subsets]
        self.state = RoundState.PLANNED
        self.futures: list[Future[Batch]] = []
        self.delivered: set[int] = set()
        self.stream_gen = 0

    @property
    def num_subsets(self) -> int:
        return len(self.subsets)

    def selection_input(
        self,
        session_id: str,
        labels: np.ndarray,
        embeddings: np.ndarray,
        batch_size: int,
        similarity: str,
        joint: bool = False,
    ) -> RoundInput:
        """What the backend selects from: ``embeddings`` float32 (n, d) rows of ``ids``; ``labels`` int64 (N,)
        the session's. ``joint``: one facility-location problem per subset instead of one per class (the
        selection input's groups are then all 0)."""
        return RoundInput(
            session_id,
            self.round_id,
            self.trainer_step,
            self.ids,
            np.zeros(len(self.ids), dtype=np.int64) if joint else labels[self.ids],
            embeddings,
            self.subset_rows,
            batch_size,
            similarity,
        )

    # -- transitions ----------------------------------------------------------------------------------------

    def dispatch(self, futures: Sequence[Future[Batch]]) -> None:
        """PLANNED -> EMBEDDED: the backend took the round; one future per subset."""
        assert self.state == RoundState.PLANNED and len(futures) == self.num_subsets, (self.state, len(futures))
        self.futures = list(futures)
        self.state = RoundState.EMBEDDED

    def fail(self) -> bool:
        """EMBEDDED -> FAILED (a selector call failed); True when this call made the transition."""
        if self.state != RoundState.EMBEDDED:
            return False
        self.state = RoundState.FAILED
        return True

    def cancel(self) -> None:
        """any -> CANCELLED (the session closed): selections not yet finished are dropped."""
        self.state = RoundState.CANCELLED
        for f in self.futures:
            withdraw(f)

    def complete(self) -> bool:
        """EMBEDDED -> DELIVERED once every subset was sent; True when this call made the transition."""
        if self.state == RoundState.EMBEDDED and len(self.delivered) == self.num_subsets:
            self.state = RoundState.DELIVERED
            return True
        return False

    # -- streams --------------------------------------------------------------------------------------------

    def open_stream(self, received: Iterable[int], session_id: str) -> StreamStart:
        """Start a stream that sends every batch but those in ``received`` (subset indices the trainer holds
        from a broken stream); it supersedes any stream still open. Raises, changing nothing, when the round
        cannot stream."""
        count = self.num_subsets
        where = f"round {self.round_id} of session {session_id}"
        held = set(received)
        if bad := sorted(i for i in held if not 0 <= i < count):
            raise InvalidArgument(f"received_subsets holds {bad[:5]}; round {self.round_id} has subsets 0..{count - 1}")
        if self.state == RoundState.PLANNED:
            raise FailedPrecondition(f"{where} has no embeddings yet; call SubmitEmbeddings first")
        if self.state == RoundState.FAILED:
            raise SelectorFailure(f"{where} failed in selection")
        if self.state == RoundState.CANCELLED:
            raise Cancelled(f"{where} was cancelled: its session was closed")
        # Batches the trainer says it holds were sent by an earlier stream that broke before it could record
        # them: they are counted now (once), so the round completes and provenance has every batch.
        unsent = sorted(i for i in held if not (self.futures[i].done() and self.futures[i].exception() is None))
        if unsent:
            raise InvalidArgument(
                f"received_subsets holds {unsent[:5]}, which round {self.round_id} has not selected yet, so no "
                "stream can have sent them"
            )
        self.stream_gen += 1
        return StreamStart(
            self.stream_gen,
            [self.futures[i].result() for i in sorted(held)],
            [self.futures[i] for i in range(count) if i not in held],
        )

    def is_current(self, generation: int) -> bool:
        """Whether the stream ``generation`` is still the round's newest."""
        return generation == self.stream_gen

    def deliver(self, subset_index: int) -> bool:
        """Note a subset as sent; True the first time."""
        if subset_index in self.delivered:
            return False
        self.delivered.add(subset_index)
        return True


class Upload:
    """A round's embeddings as their messages arrive, each checked against the round's plan and the session.

    Held apart from the round until every id has arrived, so a rejected or abandoned upload changes nothing.

    Attributes:
        embeddings: float32 (n, d) one row per id of the plan (``Round.ids``).
        losses: float32 (n,) NaN where not sent.
    """

    def __init__(self, session_id: str, rnd: Round, labels: np.ndarray, dim: int) -> None:
        self.session_id = session_id
        self.round = rnd
        self._labels = labels  # int64 (N,) the session's
        self._dim = dim
        n = len(rnd.ids)
        self.embeddings = np.empty((n, dim), dtype=np.float32)
        self.losses = np.full(n, np.nan, dtype=np.float32)
        self._seen = np.zeros(n, dtype=bool)

    def add(self, part: EmbeddingPart, index: int) -> None:
        """Check message ``index`` of the upload and stage its rows."""
        plan = self.round.ids
        where = f"message {index} of round {self.round.round_id}"
        if (part.session_id, part.round_id) != (self.session_id, self.round.round_id):
            raise InvalidArgument(
                f"{where} names session {part.session_id!r} round {part.round_id}, but the stream "
                f"started with session {self.session_id!r} round {self.round.round_id}"
            )
        if part.embeddings.shape[1] != self._dim:
            raise InvalidArgument(f"{where}: embedding dim {part.embeddings.shape[1]}, the session expects {self._dim}")
        pos = np.minimum(np.searchsorted(plan, part.ids), len(plan) - 1)
        foreign = plan[pos] != part.ids
        if foreign.any():
            raise InvalidArgument(
                f"{where}: id {int(part.ids[foreign][0])} is not in the round's plan ({int(foreign.sum())} such ids)"
            )
        if self._seen[pos].any():
            raise InvalidArgument(
                f"{where}: id {int(part.ids[self._seen[pos]][0])} was already sent in an earlier message"
            )
        uniq, counts = np.unique(pos, return_counts=True)
        if (counts > 1).any():
            raise InvalidArgument(f"{where}: id {int(plan[uniq[counts > 1][0]])} appears more than once")
        if not np.isfinite(part.embeddings).all():
            row = int(np.flatnonzero(~np.isfinite(part.embeddings).all(axis=1))[0])
            raise InvalidArgument(
                f"{where}: embedding of id {int(part.ids[row])} is not finite: {part.embeddings[row][:8].tolist()}"
            )
        if part.labels is not None and not np.array_equal(part.labels, self._labels[part.ids]):
            row = int(np.flatnonzero(part.labels != self._labels[part.ids])[0])
            raise InvalidArgument(
                f"{where}: label {int(part.labels[row])} for id {int(part.ids[row])}, but the "
                f"session was created with label {int(self._labels[part.ids[row]])}"
            )
        if part.losses is not None and not (np.isfinite(part.losses).all() and (part.losses >= 0).all()):
            row = int(np.flatnonzero(~(np.isfinite(part.losses) & (part.losses >= 0)))[0])
            raise InvalidArgument(
                f"{where}: loss {float(part.losses[row])} for id {int(part.ids[row])} is not a "
                "finite non-negative number"
            )
        self.embeddings[pos] = part.embeddings
        if part.losses is not None:
            self.losses[pos] = part.losses
        self._seen[pos] = True

    def check_complete(self) -> None:
        """Raise unless every id of the plan has arrived."""
        if not self._seen.all():
            plan = self.round.ids
            missing = plan[~self._seen]
            raise InvalidArgument(
                f"received {int(self._seen.sum())} of the {len(plan)} ids of round {self.round.round_id}; "
                f"missing {len(missing)}, e.g. {missing[:5].tolist()}"
            )
