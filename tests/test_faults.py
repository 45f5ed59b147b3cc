"""Broken streams lose nothing: a cancelled StreamBatches call, and a TCP connection cut mid-stream by a proxy.

The proxy sits between a real client and a real server on loopback; ``cut()`` closes every connection it
carries (the client sees UNAVAILABLE) and keeps listening, so the client's retry reconnects through it.
"""

from __future__ import annotations

import contextlib
import logging
import re
import socket
import threading
from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from crest.selector.v1 import selector_pb2 as pb
from selector_service.backends import LocalBackend
from selector_service.server import RunningServer, ServerConfig, start_server
from trainer_client._stream import RoundStreamer, StreamBatch, StreamEnd, StreamFailure, StreamJob
from trainer_client.client import SelectionClient

P = 4


class CuttingProxy:
    """A loopback TCP forwarder to ``target`` whose live connections can be cut on demand."""

    def __init__(self, target: str) -> None:
        host, port = target.rsplit(":", 1)
        self._upstream = (host, int(port))
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.target = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self.connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                down, _ = self._listener.accept()
            except OSError:
                return  # closed
            up = socket.create_connection(self._upstream)
            with self._lock:
                self._sockets += [down, up]
                self.connections += 1
            for a, b in ((down, up), (up, down)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        """Drop every open connection (both directions), as a network failure would."""
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for s in sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def close(self) -> None:
        self._listener.close()
        self.cut()


@pytest.fixture
def server() -> Iterator[RunningServer]:
    running = start_server(ServerConfig(port=0, backend="local"), backend=LocalBackend(2))
    yield running
    running.stop(grace=0)


def _planned_round(client: SelectionClient, sid: str, round_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Start a round; returns its ids and embeddings for them."""
    plan = client.start_round(sid, round_id, round_id)
    return plan.ids, np.random.default_rng(round_id).normal(size=(len(plan.ids), 10)).astype(np.float32)


def _session(client: SelectionClient) -> str:
    labels = np.random.default_rng(0).permutation(np.repeat(np.arange(10), 200)).astype(np.int64)
    return client.create_session(labels, subset_fraction=0.05, num_subsets=P, batch_size=20).session_id


def test_cancelled_stream_is_resumed_from_the_subsets_received(server: RunningServer) -> None:
    with SelectionClient(server.target, timeout_s=30) as client:
        sid = _session(client)
        ids, emb = _planned_round(client, sid, 0)
        client.submit_embeddings(sid, 0, ids, emb)
        for f in server.manager.get(sid).rounds[0].futures:
            f.result(timeout=30)  # every batch is ready: the server sends them all before the client reads one
        stream = client._stub.StreamBatches(
            pb.StreamBatchesRequest(session_id=sid, round_id=0),
            timeout=30,
            metadata=client._session_metadata(sid),
        )
        first = next(stream)
        stream.cancel()  # the trainer read one batch; the others were sent (or in flight) and are dropped
        with pytest.raises(grpc.RpcError) as err:
            list(stream)
        assert err.value.code() == grpc.StatusCode.CANCELLED
        rest = list(client.stream_batches(sid, 0, received={first.subset_index}))
        got = sorted([first.subset_index] + [b.subset_index for b in rest])
        assert got == list(range(P))  # every batch once, none lost
        state = client.session_state(sid)
        assert (state.rounds_completed, state.batches_delivered) == (1, P)
        # The round is complete, but a retry that still misses batches is served from the recent rounds.
        again = list(client.stream_batches(sid, 0, received={first.subset_index}))
        assert sorted(b.subset_index for b in again) == sorted(b.subset_index for b in rest)
        assert client.session_state(sid).batches_delivered == P  # counted once
        with pytest.raises(grpc.RpcError) as err:
            list(client.stream_batches(sid, 0, received={P}))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and f"[{P}]" in err.value.details()


def test_connection_cut_mid_stream_loses_and_repeats_no_batch(
    server: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    """The trainer's stream thread, through a proxy that cuts the connection after the first batch arrives."""
    caplog.set_level(logging.WARNING, logger="trainer_client._stream")
    proxy = CuttingProxy(server.target)
    client = SelectionClient(proxy.target, timeout_s=30)
    streamer = RoundStreamer(client, queue_size=1)  # one batch queued; the rest wait in gRPC's buffers
    try:
        sid = _session(client)
        received: list[int] = []
        for round_id in range(3):
            ids, emb = _planned_round(client, sid, round_id)
            labels = server.manager.get(sid).labels[ids]
            streamer.submit(StreamJob(round_id, sid, round_id, ids, emb, labels, np.ones(len(ids), np.float32)))
            subsets = []
            while True:
                item = streamer.items.get(timeout=60)
                assert not isinstance(item, StreamFailure), item.error
                if isinstance(item, StreamEnd):
                    break
                assert isinstance(item, StreamBatch) and item.round == round_id
                subsets.append(item.batch.subset_index)
                if len(subsets) == 1:
                    proxy.cut()  # mid-stream: one batch read, the others sent or in flight
            received += subsets
            assert sorted(subsets) == list(range(P)), subsets  # each batch exactly once
        # A cut after the last batch already reached the client's buffers breaks nothing; the others must resume.
        resumed = len(re.findall(r"stream broke after \d batches \(UNAVAILABLE\); resuming", caplog.text))
        assert resumed >= 1 and proxy.connections >= 1 + resumed
        state = client.session_state(sid)
        assert (state.rounds_completed, state.batches_delivered) == (3, 3 * P)
    finally:
        streamer.stop()
        client.close()
        proxy.close()


def test_embedding_upload_cancelled_midway_changes_nothing(server: RunningServer) -> None:
    with SelectionClient(server.target, timeout_s=30) as client:
        sid = _session(client)
        ids, emb = _planned_round(client, sid, 0)
        before = client.session_state(sid)
        half = len(ids) // 2
        sent_first = threading.Event()
        release = threading.Event()

        def chunks() -> Iterator[pb.EmbeddingChunk]:
            yield pb.EmbeddingChunk(
                session_id=sid, round_id=0, dim=10, ids=ids[:half].tobytes(), embeddings=emb[:half].tobytes()
            )
            sent_first.set()
            release.wait(30)  # the trainer dies here: the rest never comes

        call = client._stub.SubmitEmbeddings.future(chunks(), timeout=30, metadata=client._session_metadata(sid))
        assert sent_first.wait(10)
        call.cancel()
        release.set()
        with pytest.raises(grpc.FutureCancelledError):
            call.result()
        assert client.session_state(sid) == before
        assert server.manager.get(sid).rounds[0].state.name == "PLANNED"  # the half upload left no trace
        assert client.submit_embeddings(sid, 0, ids, emb) == len(ids)  # the trainer's retry is accepted whole
        assert sorted(b.subset_index for b in client.stream_batches(sid, 0)) == list(range(P))
