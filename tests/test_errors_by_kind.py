"""Errors by kind, over a real gRPC server on a free port: a fault of the service is INTERNAL with its message (never
the client's INVALID_ARGUMENT), bytes that break the wire contract are INVALID_ARGUMENT, a stream whose session is
closed under it ends CANCELLED, and a checkpoint that cannot be read for now stays where it is."""

from __future__ import annotations

import logging
import os
import shutil
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from crest.selector.v1 import codec
from crest.selector.v1 import selector_pb2 as pb
from crest.selector.v1 import selector_pb2_grpc as pb_grpc
from selector_service.backends import LocalBackend, SelectionBackend
from selector_service.errors import NotFound
from selector_service.manager import SessionManager
from selector_service.persistence import SessionStore
from selector_service.server import RunningServer, ServerConfig, start_server
from selector_service.session import SessionConfig
from selector_service.tasks import Batch, RoundInput, SelectionTask, deal, fan_out, run_task

P = 4


class FaultyBackend(LocalBackend):
    """A backend with a bug: taking a round raises a stray numpy ValueError, as a service-side defect would."""

    def submit(self, work: RoundInput) -> list[Future[Batch]]:
        return list(np.zeros(3) + np.zeros(len(work.subset_rows)))  # operands could not be broadcast


class FaultySelector(LocalBackend):
    """A backend whose workers fail: every selection raises ValueError."""

    def submit(self, work: RoundInput) -> list[Future[Batch]]:
        def fail(task: SelectionTask) -> list[Batch]:
            raise ValueError(f"selector bug in share {task.first_subset}")

        return [f for task in deal(work, 1) for f in fan_out(self._pool.submit(fail, task), task.num_subsets)]


class GatedBackend:
    """Selects a round's first share at once and holds the others until ``gate`` is set."""

    name = "gated"

    def __init__(self) -> None:
        self.gate = threading.Event()
        self._pool = ThreadPoolExecutor(max_workers=2)

    def _run(self, task: SelectionTask) -> list[Batch]:
        if task.first_subset > 0:
            self.gate.wait(60)
        return run_task(task, "gated")

    def submit(self, work: RoundInput) -> list[Future[Batch]]:
        return [f for task in deal(work, 2) for f in fan_out(self._pool.submit(self._run, task), task.num_subsets)]

    def warm_up(self) -> float:
        return 0.0  # a test double: its first round may compile

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "workers": 2}

    def close(self) -> None:
        self.gate.set()
        self._pool.shutdown(wait=True)


class Session:
    """One session on a server, through raw stubs (the bytes on the wire are the test's to choose)."""

    def __init__(self, target: str, labels: np.ndarray | None = None, config: pb.CrestConfig | None = None) -> None:
        self.channel = grpc.insecure_channel(target)
        self.stub = pb_grpc.SelectorServiceStub(self.channel)
        if labels is None:
            labels = np.random.default_rng(0).permutation(np.repeat(np.arange(10), 200)).astype(np.int64)
        config = config or pb.CrestConfig(subset_fraction=0.05, num_subsets=P, batch_size=20)
        reply = self.stub.CreateSession(
            pb.CreateSessionRequest(dataset_size=len(labels), labels=codec.encode(labels, codec.INT64), config=config),
            timeout=10,
        )
        self.id = reply.session_id
        self.meta = ((codec.SESSION_TOKEN_KEY, reply.session_token),)

    def plan(self, round_id: int = 0) -> np.ndarray:
        request = pb.StartRoundRequest(session_id=self.id, round_id=round_id)
        plan = self.stub.StartRound(request, timeout=10, metadata=self.meta)
        return codec.decode("ids", plan.ids, codec.INT64)

    def submit(self, ids: np.ndarray, embeddings: bytes | None = None, round_id: int = 0) -> Any:
        if embeddings is None:
            emb = np.random.default_rng(round_id).normal(size=(len(ids), 10))
            embeddings = codec.encode(emb, codec.FLOAT32)
        chunk = pb.EmbeddingChunk(
            session_id=self.id, round_id=round_id, ids=codec.encode(ids, codec.INT64), embeddings=embeddings, dim=10
        )
        return self.stub.SubmitEmbeddings(iter([chunk]), timeout=10, metadata=self.meta)

    def stream(self, round_id: int = 0) -> Iterator[pb.WeightedBatch]:
        request = pb.StreamBatchesRequest(session_id=self.id, round_id=round_id)
        return self.stub.StreamBatches(request, timeout=30, metadata=self.meta)  # type: ignore[no-any-return]

    def close(self) -> None:
        self.channel.close()


@pytest.fixture
def serve() -> Iterator[Any]:
    running: list[RunningServer] = []

    def start(backend: SelectionBackend) -> tuple[RunningServer, Session]:
        running.append(start_server(ServerConfig(port=0, backend="local"), backend=backend))
        return running[-1], Session(running[-1].target)

    yield start
    for server in running:
        server.stop(grace=0)


def test_a_service_bug_is_internal_with_its_message(serve: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="selector_service.servicer")
    server, session = serve(FaultyBackend(1))
    ids = session.plan()
    with pytest.raises(grpc.RpcError) as err:
        session.submit(ids)
    assert err.value.code() == grpc.StatusCode.INTERNAL, err.value.details()
    assert "ValueError: operands could not be broadcast together" in err.value.details()
    assert "Traceback" in caplog.text and "operands could not be broadcast" in caplog.text  # logged with its trace
    assert server.manager.get(session.id).rounds[0].state.name == "PLANNED"  # nothing changed
    session.close()


def test_a_failing_selector_is_internal_naming_the_round(serve: Any) -> None:
    _, session = serve(FaultySelector(1))
    ids = session.plan()
    session.submit(ids)
    with pytest.raises(grpc.RpcError) as err:
        list(session.stream())
    assert err.value.code() == grpc.StatusCode.INTERNAL
    assert "selection of round 0 of session" in err.value.details()
    assert "ValueError: selector bug in share 0" in err.value.details()
    session.close()


def test_bytes_that_break_the_wire_contract_are_invalid_argument(serve: Any) -> None:
    _, session = serve(LocalBackend(1))
    ids = session.plan()
    with pytest.raises(grpc.RpcError) as err:
        session.submit(ids, embeddings=b"\0" * (40 * len(ids) + 3))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"message 0.embeddings: received {40 * len(ids) + 3} bytes" in err.value.details()
    bad_enum = pb.CreateSessionRequest(
        dataset_size=20, labels=codec.encode(np.arange(20) % 2, codec.INT64), config=pb.CrestConfig(similarity=9)
    )
    with pytest.raises(grpc.RpcError) as err:
        session.stub.CreateSession(bad_enum, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "config.similarity: unknown enum value 9" in err.value.details()
    assert session.submit(ids).num_received == len(ids)  # the round took nothing from the refused call
    session.close()


def test_one_wide_embeddings_are_selected_not_a_crash(serve: Any) -> None:
    """dim 1 decodes to shape (n,); the service reshapes it to (n, 1) (it used to fail on shape[1], a bug)."""
    server, default = serve(LocalBackend(1))
    default.close()
    config = pb.CrestConfig(
        subset_fraction=0.2,
        num_subsets=2,
        batch_size=9,
        embedding_dim=1,
        embedding_kind=pb.EMBEDDING_LAST_LAYER_GRADIENT,
    )
    session = Session(server.target, labels=np.arange(600) % 3, config=config)
    ids = session.plan()
    chunk = pb.EmbeddingChunk(
        session_id=session.id,
        round_id=0,
        ids=codec.encode(ids, codec.INT64),
        embeddings=codec.encode(np.linspace(0, 1, len(ids)), codec.FLOAT32),
        dim=1,
    )
    assert session.stub.SubmitEmbeddings(iter([chunk]), timeout=10, metadata=session.meta).num_received == len(ids)
    assert sorted(b.subset_index for b in session.stream()) == [0, 1]
    session.close()


def test_closing_a_session_mid_stream_cancels_the_stream(serve: Any) -> None:
    backend = GatedBackend()
    server, session = serve(backend)
    ids = session.plan()
    session.submit(ids)
    stream = session.stream()
    first = next(stream)  # the first share's batches are sent; the stream now waits on the held shares
    assert first.subset_index in (0, 1)
    closed = session.stub.CloseSession(pb.CloseSessionRequest(session_id=session.id), timeout=10, metadata=session.meta)
    assert closed.rounds_completed == 0
    with pytest.raises(grpc.RpcError) as err:
        list(stream)
    assert err.value.code() == grpc.StatusCode.CANCELLED, err.value.details()
    assert f"session {session.id} was closed while round 0 was streaming" in err.value.details()
    backend.gate.set()
    assert server.manager.totals()["sessions"] == 0
    session.close()


def test_a_checkpoint_that_cannot_be_read_now_stays_in_place(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """An I/O error (EIO, from reading /proc/self/mem at offset 0) is not corruption: the file is not moved aside,
    the older checkpoint is not used, and once the file reads again a restart restores the session."""
    if not Path("/proc/self/mem").exists():
        pytest.skip("needs Linux /proc to raise a real EIO")
    backend = LocalBackend(1)
    store = SessionStore(tmp_path, read_attempts=2, retry_delay_s=0.0)
    manager = SessionManager(backend, store=store)
    labels = (np.arange(1000) % 10).astype(np.int64)
    sid = manager.create(labels, 10, SessionConfig(subset_fraction=0.05, batch_size=20)).session.id
    manager.start_round(sid, 0, 0)  # a second checkpoint: the first becomes .prev
    newest, previous = store.path(sid), store.path(sid, previous=True)
    saved = tmp_path / "saved.npz"
    shutil.move(newest, saved)
    os.symlink("/proc/self/mem", newest)  # every read of it fails with EIO
    caplog.set_level(logging.WARNING, logger="selector_service.persistence")

    restarted = SessionManager(backend, store=SessionStore(tmp_path, read_attempts=2, retry_delay_s=0.0))
    with pytest.raises(NotFound):
        restarted.get(sid)
    assert newest.is_symlink() and previous.exists()  # left in place, the older checkpoint untouched
    assert list(store.dir.glob("*.corrupt")) == []
    assert "attempt 1 of 2" in caplog.text
    assert f"session {sid} not restored: cannot read" in caplog.text and "Input/output error" in caplog.text

    newest.unlink()
    shutil.move(saved, newest)  # the disk recovers
    again = SessionManager(backend, store=SessionStore(tmp_path))
    assert again.get(sid).next_round_id == 1  # the newest checkpoint, not the previous one
    backend.close()


def test_failed_rounds_leave_the_rounds_in_flight(serve: Any) -> None:
    """A failed round no longer counts against max_rounds_in_flight (4): after six failures the session still
    starts rounds, each failure is reported again to a retried stream, and none counts as completed."""
    server, session = serve(FaultySelector(1))
    for round_id in range(6):
        session.submit(session.plan(round_id), round_id=round_id)
        with pytest.raises(grpc.RpcError) as err:
            list(session.stream(round_id))
        assert err.value.code() == grpc.StatusCode.INTERNAL, err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        list(session.stream(5))  # a retry of the last failed round: told again
    assert err.value.code() == grpc.StatusCode.INTERNAL and "failed in selection" in err.value.details()
    state = server.manager.get(session.id)
    assert (len(state.rounds), state.rounds_completed, state.next_round_id) == (0, 0, 6)
    session.close()
