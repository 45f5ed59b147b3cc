"""The gRPC contract over real loopback: the happy path, and every bad input rejected without effect."""

from __future__ import annotations

import logging
import re

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from crest.selector.v1 import codec
from crest.selector.v1 import selector_pb2 as pb
from crest.selector.v1 import selector_pb2_grpc as pb_grpc
from selector_service.backends import LocalBackend
from selector_service.server import RunningServer, ServerConfig, start_server
from selector_service.session import Limits
from trainer_client.client import SelectionClient, SessionInfo


def _embed(ids: np.ndarray, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(len(ids), 10)).astype(np.float32)


def _state(client: SelectionClient, sid: str) -> pb.SessionState:
    return client.session_state(sid)


def _stub(client: SelectionClient) -> pb_grpc.SelectorServiceStub:
    return client._stub


@pytest.fixture
def planned(client: SelectionClient, small_labels: np.ndarray) -> tuple[str, np.ndarray]:
    info = client.create_session(small_labels, subset_fraction=0.05, num_subsets=2, batch_size=20)
    return info.session_id, client.start_round(info.session_id, 0, 0).ids


def _chunk(sid: str, ids: np.ndarray, emb: np.ndarray, **kw: object) -> pb.EmbeddingChunk:
    return pb.EmbeddingChunk(
        session_id=sid,
        round_id=0,
        ids=codec.encode(ids, codec.INT64),
        embeddings=codec.encode(emb, codec.FLOAT32),
        dim=emb.shape[1] if emb.ndim == 2 else 10,
        **kw,
    )


BAD_SUBMISSIONS = {
    "embeddings shorter than ids x dim": (
        lambda sid, ids: [
            pb.EmbeddingChunk(
                session_id=sid,
                round_id=0,
                ids=codec.encode(ids, codec.INT64),
                embeddings=b"\0" * (4 * 10 * len(ids) - 4),
                dim=10,
            )
        ],
        r"received \d+ bytes, expected \d+ x 10 float32",
    ),
    "wrong dim": (
        lambda sid, ids: [_chunk(sid, ids, np.zeros((len(ids), 7), np.float32))],
        "embedding dim 7, the session expects 10",
    ),
    "NaN": (lambda sid, ids: [_chunk(sid, ids, np.full((len(ids), 10), np.nan, np.float32))], "is not finite"),
    "id outside the plan": (
        lambda sid, ids: [_chunk(sid, np.append(ids[:-1], 1_000_000), _embed(ids))],
        "id 1000000 is not in the round's plan",
    ),
    "id sent twice": (
        lambda sid, ids: [_chunk(sid, ids, _embed(ids)), _chunk(sid, ids[:1], _embed(ids[:1]))],
        "already sent in an earlier message",
    ),
    "missing ids": (lambda sid, ids: [_chunk(sid, ids[:-5], _embed(ids[:-5]))], "missing 5"),
    "wrong labels": (
        lambda sid, ids: [_chunk(sid, ids, _embed(ids), labels=codec.encode((np.zeros(len(ids)) + 11), codec.INT64))],
        "label 11 for id",
    ),
    "negative loss": (
        lambda sid, ids: [_chunk(sid, ids, _embed(ids), losses=codec.encode(-np.ones(len(ids)), codec.FLOAT32))],
        "loss -1.0",
    ),
    "empty stream": (lambda sid, ids: [], "received no embedding messages"),
    "zero dim": (
        lambda sid, ids: [pb.EmbeddingChunk(session_id=sid, round_id=0, ids=codec.encode(ids, codec.INT64))],
        "dim is 0",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_SUBMISSIONS))
def test_bad_embeddings_are_invalid_argument_and_change_nothing(
    client: SelectionClient, planned: tuple[str, np.ndarray], case: str
) -> None:
    sid, ids = planned
    before = _state(client, sid)
    make, message = BAD_SUBMISSIONS[case]
    with pytest.raises(grpc.RpcError) as err:
        _stub(client).SubmitEmbeddings(iter(make(sid, ids)), timeout=10, metadata=client._session_metadata(sid))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert re.search(message, err.value.details()), err.value.details()
    assert _state(client, sid) == before
    # The round is untouched: a correct submission is still accepted and selected.
    assert client.submit_embeddings(sid, 0, ids, _embed(ids)) == len(ids)
    assert len(list(client.stream_batches(sid, 0))) == 2


def test_sessions_per_client_are_bounded(small_labels: np.ndarray) -> None:
    limits = Limits(max_sessions=10, max_sessions_per_client=2)
    running = start_server(ServerConfig(port=0, backend="local"), backend=LocalBackend(1), limits=limits)
    try:
        with SelectionClient(running.target, timeout_s=10) as c:
            first = c.create_session(small_labels).session_id
            c.create_session(small_labels)
            with pytest.raises(grpc.RpcError) as err:
                c.create_session(small_labels)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "client ipv4:127.0.0.1 has 2 open sessions, the limit per client is 2" in err.value.details()
            assert running.manager.totals()["sessions"] == 2  # the refused call created nothing
            c.close_session(first)
            c.create_session(small_labels)  # a slot is free again
    finally:
        running.stop(grace=0)


BAD_SESSIONS = {
    "labels not int64-sized": (dict(dataset_size=3, labels=b"\0" * 20), "not a whole number of int64"),
    "size mismatch": (
        dict(dataset_size=5, labels=codec.encode(np.arange(4) % 2, codec.INT64)),
        "dataset_size is 5 but labels holds 4",
    ),
    "label out of range": (
        dict(dataset_size=4, labels=codec.encode(np.array([0, 1, 2, 3]), codec.INT64), num_classes=3),
        r"labels must be in \[0, 3\), received values in \[0, 3\]",
    ),
    "batch smaller than classes": (
        dict(
            dataset_size=100, labels=codec.encode(np.arange(100) % 10, codec.INT64), config=pb.CrestConfig(batch_size=4)
        ),
        "batch_size 4 is smaller",
    ),
    "bad fraction": (
        dict(
            dataset_size=100,
            labels=codec.encode(np.arange(100) % 10, codec.INT64),
            config=pb.CrestConfig(subset_fraction=1.5),
        ),
        r"subset_fraction must be in \(0, 1\]",
    ),
    "no labels": (dict(dataset_size=0), "labels is empty"),
}


@pytest.mark.parametrize("case", sorted(BAD_SESSIONS))
def test_bad_session_requests_are_invalid_argument(client: SelectionClient, case: str) -> None:
    fields, message = BAD_SESSIONS[case]
    with pytest.raises(grpc.RpcError) as err:
        _stub(client).CreateSession(pb.CreateSessionRequest(**fields), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert re.search(message, err.value.details()), err.value.details()


def test_health_service_reports_serving(client: SelectionClient) -> None:
    health = health_pb2_grpc.HealthStub(client._channel)
    for name in ("", "crest.selector.v1.SelectorService"):
        assert (
            health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status
            == health_pb2.HealthCheckResponse.SERVING
        )


def test_bearer_token_is_required_when_configured(small_labels: np.ndarray) -> None:
    running = start_server(ServerConfig(port=0, backend="local", auth_token="s3cret"), backend=LocalBackend(1))
    try:
        for token, reason in ((None, "missing"), ("wrong", "invalid")):
            with SelectionClient(running.target, token=token, timeout_s=10) as c:
                c.wait_ready(timeout_s=10)  # health stays open for probes
                with pytest.raises(grpc.RpcError) as err:
                    c.create_session(small_labels)
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED and reason in err.value.details()
        with SelectionClient(running.target, token="s3cret", timeout_s=10) as c:
            assert c.create_session(small_labels).num_classes == 10
    finally:
        running.stop(grace=0)


def test_one_job_cannot_touch_another_jobs_session(
    local_server: RunningServer, small_labels: np.ndarray, caplog: pytest.LogCaptureFixture
) -> None:
    """Two jobs share the server (and would share its bearer token); each holds only its own session token."""
    caplog.set_level(logging.DEBUG)
    with (
        SelectionClient(local_server.target, timeout_s=10) as job_a,
        SelectionClient(local_server.target, timeout_s=10) as job_b,
    ):
        a = job_a.create_session(small_labels, subset_fraction=0.05, num_subsets=2, batch_size=20)
        b = job_b.create_session(small_labels, subset_fraction=0.05, num_subsets=2, batch_size=20)
        assert a.token and b.token and a.token != b.token
        plan = job_a.start_round(a.session_id, 0, 0)
        before = _state(job_a, a.session_id)
        intruder = SelectionClient(local_server.target, timeout_s=10)
        intruder.attach_session(SessionInfo(a.session_id, 10, 0, 0, 0, b.token))  # job b's token on a's session
        anonymous = SelectionClient(local_server.target, timeout_s=10)
        for other, code in (
            (intruder, grpc.StatusCode.PERMISSION_DENIED),
            (anonymous, grpc.StatusCode.UNAUTHENTICATED),
        ):
            with other:
                for call in (
                    lambda c=other: c.session_state(a.session_id),
                    lambda c=other: c.start_round(a.session_id, 1, 0),
                    lambda c=other: c.submit_embeddings(a.session_id, 0, plan.ids, _embed(plan.ids)),
                    lambda c=other: list(c.stream_batches(a.session_id, 0)),
                    lambda c=other: c.close_session(a.session_id),
                ):
                    with pytest.raises(grpc.RpcError) as err:
                        call()
                    assert err.value.code() == code, err.value.details()
                    assert a.session_id in err.value.details()
        assert _state(job_a, a.session_id) == before  # nothing changed
        assert job_a.submit_embeddings(a.session_id, 0, plan.ids, _embed(plan.ids)) == len(plan.ids)
        assert len(list(job_a.stream_batches(a.session_id, 0))) == 2
        assert job_b.close_session(b.session_id) == 0
    for token in (a.token, b.token):
        assert token not in caplog.text  # tokens are never logged


def test_binding_beyond_loopback_requires_a_token() -> None:
    with pytest.raises(ValueError, match=r"refusing to bind 0\.0\.0\.0 without an auth token"):
        start_server(ServerConfig(host="0.0.0.0", port=0, backend="local"), backend=LocalBackend(1))


def test_sizes_over_the_limits_are_refused_before_anything_is_allocated(small_labels: np.ndarray) -> None:
    limits = Limits(max_dataset_size=1000, max_embedding_dim=64, max_subsets=8)
    running = start_server(ServerConfig(port=0, backend="local"), backend=LocalBackend(1), limits=limits)
    try:
        with SelectionClient(running.target, timeout_s=10) as c:
            cases = (
                (lambda: c.create_session(small_labels), grpc.StatusCode.RESOURCE_EXHAUSTED, "dataset_size 2000"),
                (
                    lambda: c.create_session(
                        small_labels[:1000], embedding_kind="last_layer_gradient", embedding_dim=65
                    ),
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "embedding_dim must be in \\[1, 64\\], received 65",
                ),
                (
                    lambda: c.create_session(small_labels[:1000], num_subsets=9),
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "num_subsets must be in \\[1, 8\\], received 9",
                ),
            )
            for call, code, text in cases:
                with pytest.raises(grpc.RpcError) as err:
                    call()
                assert err.value.code() == code and re.search(text, err.value.details()), err.value.details()
            # A message over the service's receive limit is refused by gRPC itself, before any decoding.
            big = grpc.insecure_channel(
                running.target, options=[("grpc.max_send_message_length", 2 * codec.MAX_MESSAGE_BYTES)]
            )
            labels = np.zeros(codec.MAX_MESSAGE_BYTES // 8 + 1, dtype=np.int64)
            with big, pytest.raises(grpc.RpcError) as err:
                pb_grpc.SelectorServiceStub(big).CreateSession(
                    pb.CreateSessionRequest(dataset_size=len(labels), labels=codec.encode(labels, codec.INT64)),
                    timeout=30,
                )
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.value.details()
            assert running.manager.totals()["sessions"] == 0  # nothing was created
            assert c.create_session(small_labels[:1000]).num_classes == 10  # and the server still serves
    finally:
        running.stop(grace=0)
