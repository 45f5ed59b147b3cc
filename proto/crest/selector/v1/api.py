"""What a trainer needs from a selection service, whatever carries the calls: one interface, two transports.

``SelectionService`` is the interface the trainer's loader calls. Two implementations satisfy it:

- ``trainer_client.SelectionClient``: gRPC to a running service (``crest serve``, the compose stack, a Ray cluster);
- ``selector_service.InProcessSelection``: the service's own sessions and selection engine in the trainer's
  process, on threads, with no server (a single-GPU job trying CREST).

Both take and return the types below and fail the same way: a refused or failed call raises a ``grpc.RpcError``
whose ``code()`` is the status the service's error table gives it (``selector_service.servicer.STATUS_OF``) and
whose ``details()`` is the service's message. Over gRPC that is the call's own error; in process it is a
``CallError``. The loader's failure policy reads the code alone, so it treats both transports alike.
``tests/test_client_contract.py`` runs one scenario over both.

Arrays are numpy: ids int64, embeddings, weights and losses float32; each field names its shape.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, fields
from typing import Any, Protocol, runtime_checkable

import grpc
import numpy as np

from crest.selector.v1 import selector_pb2 as pb
from crest.selector.v1.settings import SelectionSettings

__all__ = ["PAYOFF_ARMS", "CallError", "RoundPlan", "SelectionService", "SessionInfo", "TrainerReport", "WeightedBatch"]

# What ``TrainerReport.payoff_arm`` may be: "" (not reported) or the arm the trainer's payoff governor trains on.
PAYOFF_ARMS = ("", "selection", "control")


@dataclass(frozen=True)
class SessionInfo:
    session_id: str
    num_classes: int
    subset_size: int  # nominal random-subset size r
    batch_size: int  # coreset size m
    num_subsets: int  # P
    # The session's secret, sent with every call naming the session ("" for a session saved without one).
    token: str = field(default="", repr=False)


@dataclass(frozen=True)
class RoundPlan:
    round_id: int
    ids: np.ndarray  # int64 (n,), sorted, unique: the ids to embed
    num_subsets: int


@dataclass(frozen=True)
class WeightedBatch:
    round_id: int
    subset_index: int
    ids: np.ndarray  # int64 (m,)
    weights: np.ndarray  # float32 (m,), mean 1: normalised by the service's engine, used as is downstream
    trainer_step: int
    selection_ms: float
    worker: str


@dataclass(frozen=True, kw_only=True)
class TrainerReport:
    """What the trainer reports of itself with every round it starts, for the service's monitoring (its session
    state and per-session metrics); selection does not read it. The fields are ``StartRoundRequest``'s of the same
    names. The defaults are "nothing to report": no counts, the payoff not known (NaN), no arm."""

    # Uniform batches trained on instead of coresets, cumulative over the run.
    trainer_fallback_batches: int = 0
    # Failed calls to the service the trainer rode out, cumulative.
    trainer_service_errors: int = 0
    # Steps on the payoff's control arm (uniform batches, selection paused), cumulative.
    trainer_control_steps: int = 0
    # A B A payoff measurements so far; 0: the payoff is off or not measured yet.
    payoff_measurements: int = 0
    # Selection's speedup per wall-second over the control and its 90% interval (lo may be -inf, hi +inf when
    # unbounded); meaningful only with payoff_measurements >= 2, NaN when not known.
    payoff_per_second: float = math.nan
    payoff_per_second_lo: float = math.nan
    payoff_per_second_hi: float = math.nan
    # The arm the trainer's payoff governor trains on, one of PAYOFF_ARMS ("": not reported).
    payoff_arm: str = ""

    @classmethod
    def from_proto(cls, message: pb.StartRoundRequest | pb.SessionState) -> TrainerReport:
        """The report carried by a ``StartRoundRequest`` or a ``SessionState`` (same field names in both)."""
        return cls(**{f.name: getattr(message, f.name) for f in fields(cls)})

    def proto_fields(self) -> dict[str, Any]:
        """The report as keyword arguments of ``StartRoundRequest`` or ``SessionState``."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


class CallError(grpc.RpcError):
    """A call that failed without a gRPC channel under it (the in-process transport): the status code and message
    the service would have answered over gRPC, read with ``code()`` and ``details()`` as a channel's error is."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


@runtime_checkable
class SelectionService(Protocol):
    """The calls the loader makes. A session is the job's dataset (its labels) and its selection settings; a round
    is P random subsets, the trainer's embeddings of their union, and one weighted batch per subset back."""

    # Where the calls go, for messages: "host:port" over gRPC, "in-process" in process.
    target: str

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        """Block until the service serves; raise ``grpc.RpcError`` when it does not within ``timeout_s``."""
        ...

    def create_session(
        self,
        labels: np.ndarray,
        *,
        num_classes: int = 0,
        settings: SelectionSettings | None = None,
        client_name: str = "",
        timeout_s: float | None = None,
        **fields: Any,
    ) -> SessionInfo:
        """Register the dataset by its labels (int (N,)) and the selection settings (``settings`` or its fields;
        what is left out is the wire's default); ``num_classes`` 0 means max(labels) + 1."""
        ...

    def attach_session(self, session: SessionInfo) -> None:
        """Present ``session.token`` on the calls naming ``session.session_id`` (a session created by another
        client object: a resumed checkpoint)."""
        ...

    def close_session(self, session_id: str, timeout_s: float | None = None) -> int:
        """Close the session; returns its number of completed rounds."""
        ...

    def start_round(
        self,
        session_id: str,
        round_id: int,
        trainer_step: int,
        timeout_s: float | None = None,
        num_subsets: int = 0,
        trainer_wait_s: float = 0.0,
        report: TrainerReport | None = None,
    ) -> RoundPlan:
        """Draw round ``round_id``'s ``num_subsets`` random subsets (0: the session's P); returns the ids to
        embed. ``trainer_step`` is kept for provenance; ``trainer_wait_s`` (cumulative seconds blocked on
        coresets) and ``report`` (None: ``TrainerReport()``, nothing to report) for the service's monitoring."""
        ...

    def submit_embeddings(
        self,
        session_id: str,
        round_id: int,
        ids: np.ndarray,
        embeddings: np.ndarray,
        labels: np.ndarray | None = None,
        losses: np.ndarray | None = None,
    ) -> int:
        """Send the round's embeddings: ids int64 (n,) (every id of its plan), embeddings float32 (n, d), labels
        int64 (n,) and losses float32 (n,) when given. Returns the rows received."""
        ...

    def stream_batches(self, session_id: str, round_id: int, received: Iterable[int] = ()) -> Iterator[WeightedBatch]:
        """Yield the round's weighted batches as they are selected; ``received`` lists subset indices already held
        (from a stream that broke), which are not sent again."""
        ...

    def session_state(self, session_id: str, timeout_s: float | None = None) -> pb.SessionState:
        """The session's counters and next round id."""
        ...

    def close(self) -> None:
        """Release the transport (a channel, or the in-process selection's threads)."""
        ...
