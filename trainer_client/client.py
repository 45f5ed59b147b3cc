"""gRPC client of the selection service. Speaks numpy; knows nothing of torch, faiss or Ray.

``SelectionClient`` is the gRPC transport of ``crest.selector.v1.api.SelectionService``, the interface the loader
calls; the session, plan and batch types are that module's.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from crest.selector.v1 import codec
from crest.selector.v1 import selector_pb2 as pb
from crest.selector.v1 import selector_pb2_grpc as pb_grpc
from crest.selector.v1.api import RoundPlan, SessionInfo, TrainerReport, WeightedBatch
from crest.selector.v1.settings import SelectionSettings


def _read(path: str | None) -> bytes | None:
    return None if path is None else Path(path).read_bytes()


class SelectionClient:
    """One channel to a selection service: the gRPC transport of ``SelectionService``.

    Args:
        target: ``host:port`` of the service.
        token: bearer token of the server, sent on every call; None reads ``CREST_AUTH_TOKEN`` (what the compose
            stack and ``crest serve`` use), "" sends none.
        timeout_s: deadline of unary calls.
        tls_ca, tls_cert, tls_key: PEM files: the CA that signed the server's certificate, and a client certificate
            and key for mutual TLS; each None reads ``CREST_TLS_CA``, ``CREST_TLS_CERT``, ``CREST_TLS_KEY`` ("" for
            none). Any of them set makes the channel TLS.

    Each session also has its own token (``SessionInfo.token``): the client keeps the tokens of the sessions
    it created, and ``attach_session`` hands it one created elsewhere (a resumed checkpoint).
    """

    def __init__(
        self,
        target: str,
        token: str | None = None,
        timeout_s: float = 60.0,
        *,
        tls_ca: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
    ) -> None:
        self.target = target
        token, tls_ca, tls_cert, tls_key = (
            os.environ.get(name, "") if value is None else value
            for name, value in (
                ("CREST_AUTH_TOKEN", token),
                ("CREST_TLS_CA", tls_ca),
                ("CREST_TLS_CERT", tls_cert),
                ("CREST_TLS_KEY", tls_key),
            )
        )
        credentials = None
        if tls_ca or tls_cert or tls_key:
            if bool(tls_cert) != bool(tls_key):
                raise ValueError(
                    f"a TLS client certificate needs both tls_cert and tls_key (or CREST_TLS_CERT and CREST_TLS_KEY); "
                    f"received tls_cert={tls_cert or None!r}, tls_key={tls_key or None!r}"
                )
            credentials = grpc.ssl_channel_credentials(
                root_certificates=_read(tls_ca or None),
                private_key=_read(tls_key or None),
                certificate_chain=_read(tls_cert or None),
            )
        options = [
            ("grpc.max_receive_message_length", codec.MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", codec.MAX_MESSAGE_BYTES),
            # Reconnect soon after the service comes back (gRPC's default backoff grows to 120 s); the
            # loader keeps training on uniform batches meanwhile.
            ("grpc.initial_reconnect_backoff_ms", 200),
            ("grpc.min_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", 2000),
        ]
        self._channel = (
            grpc.secure_channel(target, credentials, options=options)
            if credentials
            else grpc.insecure_channel(target, options=options)
        )
        self._stub = pb_grpc.SelectorServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._metadata: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {token}"),) if token else ()
        self._session_tokens: dict[str, str] = {}
        self._timeout = timeout_s

    def attach_session(self, session: SessionInfo) -> None:
        """Use ``session.token`` on this client's calls naming ``session.session_id``."""
        if session.token:
            self._session_tokens[session.session_id] = session.token

    def _session_metadata(self, session_id: str) -> tuple[tuple[str, str], ...]:
        token = self._session_tokens.get(session_id)
        return self._metadata if token is None else (*self._metadata, (codec.SESSION_TOKEN_KEY, token))

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        """Block until the service reports SERVING (raises ``grpc.RpcError`` on timeout)."""
        reply = self._health.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout_s, wait_for_ready=True)
        if reply.status != health_pb2.HealthCheckResponse.SERVING:
            raise RuntimeError(f"selection service at {self.target} is not serving (status {reply.status})")

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
        """Register the dataset by its labels (int (N,)) and the selection settings.

        ``settings`` is a ``SelectionSettings`` (the wire's, ``crest.selector.v1.settings``), or give its fields as
        keyword arguments (``subset_fraction=0.05, drop_learned=True``); what is left out is the wire's default.
        ``timeout_s`` overrides the client's deadline for this call. A ``similarity`` or ``embedding_kind``
        outside ``codec.SIMILARITIES`` / ``codec.EMBEDDING_KINDS`` raises ``codec.WireError`` (a ValueError), an
        unknown setting ``TypeError``.
        """
        config = SelectionSettings.of_call(settings, fields).to_proto()
        reply = self._stub.CreateSession(
            pb.CreateSessionRequest(
                dataset_size=len(labels),
                labels=codec.encode(labels, codec.INT64),
                num_classes=num_classes,
                config=config,
                client_name=client_name,
            ),
            timeout=timeout_s or self._timeout,
            metadata=self._metadata,
        )
        info = SessionInfo(
            reply.session_id,
            reply.num_classes,
            reply.subset_size,
            reply.config.batch_size,
            reply.config.num_subsets,
            reply.session_token,
        )
        self.attach_session(info)
        return info

    def close_session(self, session_id: str, timeout_s: float | None = None) -> int:
        reply = self._stub.CloseSession(
            pb.CloseSessionRequest(session_id=session_id),
            timeout=timeout_s or self._timeout,
            metadata=self._session_metadata(session_id),
        )
        self._session_tokens.pop(session_id, None)
        return int(reply.rounds_completed)

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
        """Open a round of ``num_subsets`` random subsets (0: the session's P); returns the ids to embed.
        ``trainer_wait_s`` and ``report`` (None: nothing to report) go to the service's monitoring."""
        reply = self._stub.StartRound(
            pb.StartRoundRequest(
                session_id=session_id,
                round_id=round_id,
                trainer_step=trainer_step,
                num_subsets=num_subsets,
                trainer_wait_s=trainer_wait_s,
                **(report.proto_fields() if report is not None else {}),
            ),
            timeout=timeout_s or self._timeout,
            metadata=self._session_metadata(session_id),
        )
        return RoundPlan(
            reply.round_id, codec.decode("ids", reply.ids, codec.INT64, rows=reply.num_ids), reply.num_subsets
        )

    def submit_embeddings(
        self,
        session_id: str,
        round_id: int,
        ids: np.ndarray,
        embeddings: np.ndarray,
        labels: np.ndarray | None = None,
        losses: np.ndarray | None = None,
    ) -> int:
        """Stream a round's embeddings (float32 (n, d)) in messages of at most ``codec.CHUNK_BYTES``."""
        n, dim = embeddings.shape
        step = codec.chunk_rows(dim)

        def chunks() -> Iterator[pb.EmbeddingChunk]:
            for lo in range(0, n, step):
                sl = slice(lo, lo + step)
                yield pb.EmbeddingChunk(
                    session_id=session_id,
                    round_id=round_id,
                    dim=dim,
                    ids=codec.encode(ids[sl], codec.INT64),
                    embeddings=codec.encode(embeddings[sl], codec.FLOAT32),
                    labels=b"" if labels is None else codec.encode(labels[sl], codec.INT64),
                    losses=b"" if losses is None else codec.encode(losses[sl], codec.FLOAT32),
                )

        reply = self._stub.SubmitEmbeddings(
            chunks(), timeout=self._timeout, metadata=self._session_metadata(session_id)
        )
        return int(reply.num_received)

    def stream_batches(self, session_id: str, round_id: int, received: Iterable[int] = ()) -> Iterator[WeightedBatch]:
        """Yield the round's weighted batches as the service finishes them.

        ``received``: subset indices of the round already held (from a stream that broke); the others are sent.
        """
        stream = self._stub.StreamBatches(
            pb.StreamBatchesRequest(session_id=session_id, round_id=round_id, received_subsets=sorted(received)),
            timeout=self._timeout,
            metadata=self._session_metadata(session_id),
        )
        for b in stream:
            yield WeightedBatch(
                b.round_id,
                b.subset_index,
                codec.decode("ids", b.ids, codec.INT64, rows=b.size),
                codec.decode("weights", b.weights, codec.FLOAT32, rows=b.size),
                b.trainer_step,
                b.selection_ms,
                b.worker,
            )

    def session_state(self, session_id: str, timeout_s: float | None = None) -> pb.SessionState:
        return self._stub.GetSessionState(
            pb.GetSessionStateRequest(session_id=session_id),
            timeout=timeout_s or self._timeout,
            metadata=self._session_metadata(session_id),
        )

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> SelectionClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
