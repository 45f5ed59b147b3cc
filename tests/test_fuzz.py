"""Fuzzing every rpc over real gRPC: malformed messages and raw random bytes each get a status, the server stays
up, and an existing session's state is bit-identical afterwards."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crest.selector.v1 import codec
from crest.selector.v1 import selector_pb2 as pb
from selector_service.backends import LocalBackend
from selector_service.server import RunningServer, ServerConfig, start_server
from trainer_client.client import SelectionClient

METHODS = [
    f"/crest.selector.v1.SelectorService/{m}"
    for m in ("CreateSession", "CloseSession", "StartRound", "SubmitEmbeddings", "StreamBatches", "GetSessionState")
]
ANSWERED = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNIMPLEMENTED,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
}
FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def target() -> Iterator[tuple[RunningServer, SelectionClient, str]]:
    running = start_server(ServerConfig(port=0, backend="local"), backend=LocalBackend(1))
    client = SelectionClient(running.target, timeout_s=10)
    labels = np.arange(500) % 5
    sid = client.create_session(labels, subset_fraction=0.1, num_subsets=2, batch_size=10).session_id
    client.start_round(sid, 0, 0)  # a planned round the fuzzing must not disturb
    yield running, client, sid
    client.close()
    running.stop(grace=0)


def _fingerprint(running: RunningServer, client: SelectionClient, sid: str) -> tuple[Any, ...]:
    s = running.manager.get(sid)
    with s.lock:
        rounds = {r: (rnd.state, rnd.ids.tobytes(), [x.tobytes() for x in rnd.subsets]) for r, rnd in s.rounds.items()}
        exclusion = s.exclusion.state_dict()
    return (
        client.session_state(sid).SerializeToString(deterministic=True),
        rounds,
        s.labels.tobytes(),
        exclusion["history"].tobytes(),
        exclusion["excluded"].tobytes(),
    )


def _expect_status(call: Any) -> None:
    with pytest.raises(grpc.RpcError) as err:
        call()
    assert err.value.code() in ANSWERED, (err.value.code(), err.value.details())


session_ids = st.one_of(st.text(max_size=40), st.just("0" * 32))
arrays = st.binary(max_size=512)
u64 = st.integers(min_value=0, max_value=2**64 - 1)
u32 = st.integers(min_value=0, max_value=2**32 - 1)
configs = st.builds(
    pb.CrestConfig,
    subset_fraction=st.floats(allow_nan=True, allow_infinity=True),
    num_subsets=u32,
    batch_size=u32,
    similarity=st.integers(0, 5),
    seed=u64,
    embedding_dim=u32,
    embedding_kind=st.integers(0, 5),
    drop_learned=st.booleans(),
    drop_threshold=st.floats(allow_nan=True),
    drop_window=u32,
    min_pool_fraction=st.floats(allow_nan=True),
    keep_excluded=st.booleans(),
    joint_selection=st.booleans(),
)


@FUZZ
@given(dataset_size=u64, labels=arrays, num_classes=u32, config=configs)
def test_create_session_fuzz(
    target: Any, dataset_size: int, labels: bytes, num_classes: int, config: pb.CrestConfig
) -> None:
    running, client, sid = target
    before = _fingerprint(running, client, sid)
    request = pb.CreateSessionRequest(dataset_size=dataset_size, labels=labels, num_classes=num_classes, config=config)
    try:
        reply = client._stub.CreateSession(request, timeout=10)
        client.close_session(reply.session_id)  # a valid random request: accepted, then cleaned up
    except grpc.RpcError as err:
        assert err.code() in ANSWERED, err.details()
    assert _fingerprint(running, client, sid) == before


@FUZZ
@given(
    chunks=st.lists(
        st.builds(
            pb.EmbeddingChunk,
            session_id=st.sampled_from(["", "x"]),
            round_id=u64,
            ids=arrays,
            embeddings=arrays,
            dim=u32,
            labels=arrays,
            losses=arrays,
        ),
        max_size=4,
    ),
    use_real_session=st.booleans(),
)
def test_submit_embeddings_fuzz(target: Any, chunks: list[pb.EmbeddingChunk], use_real_session: bool) -> None:
    running, client, sid = target
    before = _fingerprint(running, client, sid)
    if use_real_session:  # with the session's token, so the chunks reach validation
        for c in chunks:
            c.session_id, c.round_id = sid, 0
    meta = client._session_metadata(sid if use_real_session else "")
    _expect_status(lambda: client._stub.SubmitEmbeddings(iter(chunks), timeout=10, metadata=meta))
    assert _fingerprint(running, client, sid) == before


@FUZZ
@given(
    session_id=session_ids,
    round_id=u64,
    step=u64,
    num_subsets=u32,
    wait=st.floats(allow_nan=True, allow_infinity=True),
    real=st.booleans(),
)
def test_round_rpcs_fuzz(
    target: Any, session_id: str, round_id: int, step: int, num_subsets: int, wait: float, real: bool
) -> None:
    running, client, sid = target
    before = _fingerprint(running, client, sid)
    name = sid if real else session_id
    meta = client._session_metadata(name)  # the real session's token, so the calls reach validation
    ok_round = real and round_id == 1 and num_subsets <= 2 and wait >= 0 and np.isfinite(wait)
    if not ok_round:  # every call below is wrong in some way and must be refused without effect
        _expect_status(
            lambda: client._stub.StartRound(
                pb.StartRoundRequest(
                    session_id=name, round_id=round_id, trainer_step=step, num_subsets=num_subsets, trainer_wait_s=wait
                ),
                timeout=10,
                metadata=meta,
            )
        )
    _expect_status(
        lambda: list(
            client._stub.StreamBatches(
                pb.StreamBatchesRequest(session_id=name, round_id=round_id), timeout=10, metadata=meta
            )
        )
    )
    if not real:
        _expect_status(lambda: client._stub.GetSessionState(pb.GetSessionStateRequest(session_id=name), timeout=10))
        _expect_status(lambda: client._stub.CloseSession(pb.CloseSessionRequest(session_id=name), timeout=10))
    assert _fingerprint(running, client, sid) == before


@FUZZ
@given(method=st.sampled_from(METHODS), payload=st.binary(max_size=256))
def test_raw_random_bytes_to_every_method(target: Any, method: str, payload: bytes) -> None:
    running, client, sid = target
    before = _fingerprint(running, client, sid)
    channel = client._channel
    meta = client._session_metadata(sid)  # bytes that happen to name the session get past authorization
    if method.endswith("SubmitEmbeddings"):
        call = channel.stream_unary(method, request_serializer=None, response_deserializer=None)
        invoke = lambda: call(iter([payload, payload]), timeout=10, metadata=meta)  # noqa: E731
    elif method.endswith("StreamBatches"):
        stream = channel.unary_stream(method, request_serializer=None, response_deserializer=None)
        invoke = lambda: list(stream(payload, timeout=10, metadata=meta))  # noqa: E731
    else:
        unary = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
        invoke = lambda: unary(payload, timeout=10, metadata=meta)  # noqa: E731
    try:
        invoke()
    except grpc.RpcError as err:
        assert err.code() in ANSWERED, (method, err.code(), err.details())
    assert _fingerprint(running, client, sid) == before
    assert client.session_state(sid).session_id == sid  # still up and answering


@FUZZ
@given(token=st.one_of(st.none(), st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), max_size=64)))
def test_session_calls_with_a_wrong_token_are_refused(target: Any, token: str | None) -> None:
    running, client, sid = target
    before = _fingerprint(running, client, sid)
    meta = () if token is None else ((codec.SESSION_TOKEN_KEY, token),)
    expected = grpc.StatusCode.UNAUTHENTICATED if not token else grpc.StatusCode.PERMISSION_DENIED
    calls = (
        lambda: client._stub.StartRound(pb.StartRoundRequest(session_id=sid, round_id=1), timeout=10, metadata=meta),
        lambda: list(client._stub.StreamBatches(pb.StreamBatchesRequest(session_id=sid), timeout=10, metadata=meta)),
        lambda: client._stub.GetSessionState(pb.GetSessionStateRequest(session_id=sid), timeout=10, metadata=meta),
        lambda: client._stub.CloseSession(pb.CloseSessionRequest(session_id=sid), timeout=10, metadata=meta),
        lambda: client._stub.SubmitEmbeddings(
            iter([pb.EmbeddingChunk(session_id=sid, round_id=0)]), timeout=10, metadata=meta
        ),
    )
    for call in calls:
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == expected, err.value.details()
        if token is not None and len(token) >= 12:  # long enough not to occur in the message by chance
            assert token not in err.value.details()  # the received token is never echoed
    assert _fingerprint(running, client, sid) == before


def test_codec_rejects_labels_of_the_wrong_length(target: Any) -> None:
    _, client, _ = target
    request = pb.CreateSessionRequest(dataset_size=3, labels=codec.encode(np.arange(4), codec.INT64))
    with pytest.raises(grpc.RpcError) as err:
        client._stub.CreateSession(request, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "dataset_size is 3" in err.value.details()
