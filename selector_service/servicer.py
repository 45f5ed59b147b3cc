"""The gRPC servicer: converts proto messages to domain types, calls one ``SessionManager`` method, converts
back. Errors are mapped to status codes through ``STATUS_OF`` only: the service's refusals (``SelectionError``)
and messages that break the wire contract (``codec.WireError``) by their kind; anything else is a fault of the
service itself, answered INTERNAL with its message and logged with its traceback."""

from __future__ import annotations

import functools
import itertools
import logging
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import grpc

from crest.selector.v1 import codec
from crest.selector.v1 import selector_pb2 as pb
from crest.selector.v1 import selector_pb2_grpc as pb_grpc
from crest.selector.v1.api import TrainerReport
from crest.selector.v1.settings import SelectionSettings
from selector_service import tokens
from selector_service.errors import (
    AlreadyExists,
    Cancelled,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    SelectorFailure,
    Unauthenticated,
)
from selector_service.manager import SessionManager
from selector_service.rounds import EmbeddingPart
from selector_service.session import SessionConfig, SessionSnapshot
from selector_service.tasks import Batch

log = logging.getLogger(__name__)

# The status of each kind of error; an exception of no kind listed is a service fault: INTERNAL.
STATUS_OF: dict[type[Exception], grpc.StatusCode] = {
    codec.WireError: grpc.StatusCode.INVALID_ARGUMENT,
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    Cancelled: grpc.StatusCode.CANCELLED,
    SelectorFailure: grpc.StatusCode.INTERNAL,
}

F = TypeVar("F", bound=Callable[..., Any])


def status_of(exc: Exception) -> tuple[grpc.StatusCode, str]:
    """The status and message a call that raised ``exc`` ends with; logs service faults with their traceback."""
    code = next((c for kind, c in STATUS_OF.items() if isinstance(exc, kind)), None)
    if code is None:
        log.error("internal error: %s: %s", type(exc).__name__, exc, exc_info=exc)
        return grpc.StatusCode.INTERNAL, f"internal error in the selection service: {type(exc).__name__}: {exc}"
    if code == grpc.StatusCode.INTERNAL:
        log.error("%s", exc, exc_info=exc)
    return code, str(exc)


def _unary(method: F) -> F:
    @functools.wraps(method)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return method(self, request, context)
        except Exception as exc:
            context.abort(*status_of(exc))

    return wrapper  # type: ignore[return-value]


def _streaming(method: F) -> F:
    @functools.wraps(method)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        try:
            yield from method(self, request, context)
        except Exception as exc:
            context.abort(*status_of(exc))

    return wrapper  # type: ignore[return-value]


def _session_token(context: grpc.ServicerContext) -> str | None:
    """The per-session token from the call's metadata (``tokens.METADATA_KEY``), None when absent."""
    for key, value in context.invocation_metadata() or ():
        if key == tokens.METADATA_KEY:
            return value if isinstance(value, str) else None
    return None


def _client_address(context: grpc.ServicerContext) -> str:
    """The peer's address without its port ("ipv4:10.0.0.5", "ipv6:[::1]", "unix:/path")."""
    peer = context.peer() or ""
    return peer.rsplit(":", 1)[0] if peer.startswith(("ipv4:", "ipv6:")) else peer


def config_from_proto(c: pb.CrestConfig) -> SessionConfig:
    """The session configuration a ``CrestConfig`` asks for (a zero field: the wire's default)."""
    return SessionConfig.from_settings(SelectionSettings.from_proto(c))


def config_to_proto(c: SessionConfig) -> pb.CrestConfig:
    return c.settings().to_proto()


def part_from_proto(chunk: pb.EmbeddingChunk, index: int) -> EmbeddingPart:
    where = f"message {index}"
    ids = codec.decode(f"{where}.ids", chunk.ids, codec.INT64)
    if chunk.dim == 0:
        raise InvalidArgument(f"{where}.dim is 0; set it to the embedding dimension")
    emb = codec.decode(f"{where}.embeddings", chunk.embeddings, codec.FLOAT32, rows=len(ids), cols=chunk.dim)
    labels = codec.decode(f"{where}.labels", chunk.labels, codec.INT64, rows=len(ids)) if chunk.labels else None
    losses = codec.decode(f"{where}.losses", chunk.losses, codec.FLOAT32, rows=len(ids)) if chunk.losses else None
    # (n, dim) even when dim is 1, where decode returns (n,)
    return EmbeddingPart(chunk.session_id, chunk.round_id, ids, emb.reshape(len(ids), chunk.dim), labels, losses)


def batch_to_proto(b: Batch) -> pb.WeightedBatch:
    return pb.WeightedBatch(
        session_id=b.session_id,
        round_id=b.round_id,
        subset_index=b.subset_index,
        ids=codec.encode(b.ids, codec.INT64),
        weights=codec.encode(b.weights, codec.FLOAT32),
        size=len(b.ids),
        trainer_step=b.trainer_step,
        selection_ms=b.selection_ms,
        worker=b.worker,
    )


def snapshot_to_proto(s: SessionSnapshot) -> pb.SessionState:
    return pb.SessionState(
        session_id=s.session_id,
        dataset_size=s.dataset_size,
        active_size=s.active_size,
        rounds_started=s.rounds_started,
        rounds_completed=s.rounds_completed,
        batches_delivered=s.batches_delivered,
        examples_delivered=s.examples_delivered,
        config=config_to_proto(s.config),
        num_classes=s.num_classes,
        next_round_id=s.next_round_id,
        excluded_size=s.excluded_size,
        readmitted_total=s.readmitted_total,
        trainer_wait_s=s.trainer_wait_s,
        **s.trainer_report.proto_fields(),
    )


class SelectorServicer(pb_grpc.SelectorServiceServicer):
    """``crest.selector.v1.SelectorService`` over a ``SessionManager``."""

    def __init__(self, manager: SessionManager) -> None:
        self.manager = manager

    @_unary
    def CreateSession(self, request: pb.CreateSessionRequest, context: grpc.ServicerContext) -> Any:
        labels = codec.decode("labels", request.labels, codec.INT64)
        if request.dataset_size != len(labels):
            raise InvalidArgument(
                f"dataset_size is {request.dataset_size} but labels holds {len(labels)} int64 "
                f"values ({len(request.labels)} bytes)"
            )
        config = config_from_proto(request.config)
        new = self.manager.create(labels, request.num_classes, config, request.client_name, _client_address(context))
        s = new.session
        return pb.CreateSessionResponse(
            session_id=s.id,
            config=config_to_proto(s.config),
            num_classes=s.num_classes,
            subset_size=s.subset_size,
            session_token=new.token,
        )

    @_unary
    def CloseSession(self, request: pb.CloseSessionRequest, context: grpc.ServicerContext) -> Any:
        self.manager.authorize(request.session_id, _session_token(context))
        return pb.CloseSessionResponse(rounds_completed=self.manager.close(request.session_id))

    @_unary
    def StartRound(self, request: pb.StartRoundRequest, context: grpc.ServicerContext) -> Any:
        self.manager.authorize(request.session_id, _session_token(context))
        plan = self.manager.start_round(
            request.session_id,
            request.round_id,
            request.trainer_step,
            request.num_subsets,
            request.trainer_wait_s,
            TrainerReport.from_proto(request),
        )
        return pb.RoundPlan(
            session_id=plan.session_id,
            round_id=plan.round_id,
            ids=codec.encode(plan.ids, codec.INT64),
            num_ids=len(plan.ids),
            num_subsets=plan.num_subsets,
        )

    @_unary
    def SubmitEmbeddings(self, request_iterator: Iterator[pb.EmbeddingChunk], context: grpc.ServicerContext) -> Any:
        chunks: Iterator[pb.EmbeddingChunk] = iter(request_iterator)
        first = next(chunks, None)
        if first is not None:  # every chunk must name the same session (checked by submit_embeddings)
            self.manager.authorize(first.session_id, _session_token(context))
            chunks = itertools.chain([first], chunks)
        parts = (part_from_proto(chunk, i) for i, chunk in enumerate(chunks))
        session_id, round_id, n = self.manager.submit_embeddings(parts)
        return pb.SubmitEmbeddingsResponse(session_id=session_id, round_id=round_id, num_received=n)

    @_streaming
    def StreamBatches(self, request: pb.StreamBatchesRequest, context: grpc.ServicerContext) -> Iterator[Any]:
        self.manager.authorize(request.session_id, _session_token(context))
        for batch in self.manager.batches(request.session_id, request.round_id, request.received_subsets):
            yield batch_to_proto(batch)

    @_unary
    def GetSessionState(self, request: pb.GetSessionStateRequest, context: grpc.ServicerContext) -> Any:
        self.manager.authorize(request.session_id, _session_token(context))
        return snapshot_to_proto(self.manager.snapshot(request.session_id))
