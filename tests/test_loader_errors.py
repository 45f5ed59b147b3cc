"""The loader's errors by kind, against a real gRPC server on loopback with real torch training.

A failure the service repeats (every selector fails, as on Ray workers without faiss) stops the loader with the
service's message after ``max_persistent_failures`` identical ones, a round delivered in between resets the
count, and an outage (the server stopped) is ridden out on uniform batches however long it lasts. A stream that
ends early leaves a partial round, which is trained on, logged and counted. And the loader's state round-trips
through a checkpoint and refuses one from another version or run, naming both values.

The services' selectors are real ``LocalBackend``s; the backends here only change what their futures report.
"""

from __future__ import annotations

import io
import logging
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any

import numpy as np
import pytest
import torch
from loader_settings import loader_settings
from torch import nn

from selector_service.backends import LocalBackend
from selector_service.errors import SELECTOR_INSTALL, MissingExtra
from selector_service.server import RunningServer, ServerConfig, start_server
from trainer_client._state import LoaderState, PendingRound, Region
from trainer_client.client import SelectionClient, WeightedBatch
from trainer_client.data import FashionMNIST
from trainer_client.embeddings import weighted_loss
from trainer_client.loader import CoresetLoader, SelectionUnavailable
from trainer_client.models import SmallCNN

torch.set_num_threads(1)
SMALL: dict[str, Any] = {"batch_size": 32, "subset_fraction": 0.05, "num_subsets": 2, "check_examples": 128}
FAST_RETRY: dict[str, Any] = {"reconnect_initial_s": 0.01, "reconnect_max_s": 0.05}
NO_FAISS = f"faiss is not installed; {SELECTOR_INSTALL}"  # what selector_service._faiss raises


@pytest.fixture(scope="module")
def fmnist() -> FashionMNIST:
    return FashionMNIST("train", limit=1000)


def _settle(dst: Future[Any], src: Future[Any], error: BaseException | None = None) -> None:
    """Give ``dst`` the outcome of ``src`` (done), or ``error`` instead; nothing when the service withdrew it."""
    if dst.done() or not dst.set_running_or_notify_cancel():
        return
    error = error or src.exception()
    if error is not None:
        dst.set_exception(error)
    else:
        dst.set_result(src.result())


class Reshaped:
    """A real ``LocalBackend`` whose futures ``reshape(call, subset, future)`` replaces; ``call`` counts the
    rounds submitted, from 0."""

    name = "local"

    def __init__(self, reshape: Callable[[int, int, Future[Any]], Future[Any]]) -> None:
        self._inner = LocalBackend(num_workers=2)
        self._reshape = reshape
        self.calls = 0

    def submit(self, work: Any) -> list[Future[Any]]:
        futures = self._inner.submit(work)
        call, self.calls = self.calls, self.calls + 1
        return [self._reshape(call, i, f) for i, f in enumerate(futures)]

    def warm_up(self) -> float:
        return self._inner.warm_up()

    def describe(self) -> dict[str, Any]:
        return self._inner.describe()

    def close(self) -> None:
        self._inner.close()


def _fails(src: Future[Any]) -> Future[Any]:
    """A future that fails as a selector without faiss does, once ``src``'s selection has run."""
    dst: Future[Any] = Future()
    src.add_done_callback(lambda f: _settle(dst, f, MissingExtra(NO_FAISS)))
    return dst


@pytest.fixture
def serve() -> Iterator[Callable[..., RunningServer]]:
    """Start real servers (``serve(backend, port=0)``); all are stopped at the end."""
    started: list[RunningServer] = []

    def start(backend: Any = None, port: int = 0) -> RunningServer:
        server = start_server(ServerConfig(port=port, backend="local"), backend=backend or LocalBackend(2))
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop(grace=0)


def _train(loader: CoresetLoader, model: nn.Module, steps: int, until: Callable[[], bool] = lambda: False) -> int:
    """Train up to ``steps`` steps, stopping early once ``until()``; returns the steps taken."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for step, (x, y, w) in zip(range(steps), loader, strict=False):
        loss = weighted_loss(model(x), y, w)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if until():
            return step + 1
    return steps


def test_a_failure_the_service_repeats_stops_the_loader_with_the_services_message(
    serve: Callable[..., RunningServer], fmnist: FashionMNIST, caplog: pytest.LogCaptureFixture
) -> None:
    server = serve(Reshaped(lambda _call, _i, f: _fails(f)))
    caplog.set_level(logging.WARNING, logger="trainer_client")
    torch.manual_seed(0)
    model = SmallCNN()
    config = loader_settings(**SMALL, **FAST_RETRY, max_persistent_failures=3)
    client = SelectionClient(server.target, timeout_s=30)
    with client, CoresetLoader(fmnist, model, client, fmnist.targets.numpy(), config=config) as loader:
        with pytest.raises(SelectionUnavailable) as raised:
            _train(loader, model, 2000)  # bounded: the third failed round raises long before
        stats = loader.stats
    message = str(raised.value)
    assert "INTERNAL" in message and NO_FAISS in message and server.target in message and "3 times" in message
    assert stats.persistent_failures == stats.service_errors == 3
    assert stats.regions == 0 and stats.fallback_batches == stats.steps > 0  # uniform batches until it stopped
    errors = [r for r in caplog.records if r.levelno == logging.ERROR and r.name.startswith("trainer_client")]
    assert len(errors) == 2  # the first two are logged as errors, naming the code and the server's message
    assert all("INTERNAL" in r.getMessage() and NO_FAISS in r.getMessage() for r in errors)


def test_a_round_delivered_between_persistent_failures_resets_their_count(
    serve: Callable[..., RunningServer], fmnist: FashionMNIST
) -> None:
    # Two failed rounds, a good one, a failed one, then good ones. (At most three: the service keeps a failed
    # round in flight, and refuses a fifth round while four are.)
    fail_calls = {0, 1, 3}
    server = serve(Reshaped(lambda call, _i, f: _fails(f) if call in fail_calls else f))
    torch.manual_seed(0)
    model = SmallCNN()
    config = loader_settings(**SMALL, **FAST_RETRY, steps_per_round=3, lookahead_steps=0, max_persistent_failures=3)
    client = SelectionClient(server.target, timeout_s=30)
    with client, CoresetLoader(fmnist, model, client, fmnist.targets.numpy(), config=config) as loader:
        _train(loader, model, 2000, until=lambda: loader.stats.regions >= 2)
        stats = loader.stats
    assert stats.persistent_failures == 3 and stats.regions >= 2  # three in all, never three in a row


def test_an_outage_however_long_is_ridden_out_and_counts_as_no_persistent_failure(
    serve: Callable[..., RunningServer], fmnist: FashionMNIST
) -> None:
    server = serve()
    port = server.port
    torch.manual_seed(0)
    model = SmallCNN()
    config = loader_settings(**SMALL, **FAST_RETRY, steps_per_round=4, lookahead_steps=1, max_persistent_failures=1)
    client = SelectionClient(server.target, timeout_s=10)
    with client, CoresetLoader(fmnist, model, client, fmnist.targets.numpy(), config=config) as loader:
        _train(loader, model, 400, until=lambda: loader.stats.regions >= 1)
        server.stop(grace=0)
        _train(loader, model, 2000, until=lambda: loader.stats.service_errors >= 5)
        down, regions = loader.stats.service_errors, loader.stats.regions
        serve(port=port)
        _train(loader, model, 2000, until=lambda: loader.stats.regions > regions)
        stats = loader.stats
    assert down >= 5 and stats.persistent_failures == 0  # UNAVAILABLE five times, and never raised
    assert stats.regions > regions and stats.sessions_opened == 2  # back on coresets, in a new session


def test_a_stream_that_ends_early_leaves_a_partial_round_that_is_trained_on_and_counted(
    serve: Callable[..., RunningServer], fmnist: FashionMNIST, caplog: pytest.LogCaptureFixture
) -> None:
    """The service ends a stream early when a newer stream of the same round supersedes it. Here one opens
    once the loader's stream has sent the first coreset, and the second is held until it has."""
    release = threading.Event()

    def held(src: Future[Any]) -> Future[Any]:
        dst: Future[Any] = Future()

        def settle_when_released(done: Future[Any]) -> None:
            release.wait(30)
            _settle(dst, done)

        src.add_done_callback(lambda f: threading.Thread(target=settle_when_released, args=(f,)).start())
        return dst

    server = serve(Reshaped(lambda call, i, f: held(f) if call == 0 and i > 0 else f))
    caplog.set_level(logging.WARNING, logger="trainer_client")
    torch.manual_seed(0)
    model = SmallCNN()
    config = loader_settings(**SMALL, steps_per_round=6, first_batch_timeout_s=30)
    client = SelectionClient(server.target, timeout_s=30)
    taken: list[WeightedBatch] = []

    def take_over() -> None:
        assert loader.session is not None
        stream = client.stream_batches(loader.session.session_id, 0)
        taken.append(next(stream))  # this stream is now the round's newest: the loader's ends at its next batch
        release.set()
        taken.extend(stream)

    helper = threading.Thread(target=take_over)
    started = threading.Event()

    def on_first_delivery(_batch: Any) -> None:  # the first is subset 0 of round 0, by the loader's stream
        if not started.is_set():
            started.set()
            helper.start()

    server.manager.batch_hooks.append(on_first_delivery)
    try:
        with CoresetLoader(fmnist, model, client, fmnist.targets.numpy(), config=config) as loader:
            _train(loader, model, 3)
            stats, last = loader.stats, loader.last_ids
        helper.join(30)
    finally:
        release.set()
        client.close()
    assert sorted(b.subset_index for b in taken) == [0, 1]  # the other stream received the whole round
    assert stats.partial_rounds == 1 and stats.regions == 1 and stats.fallback_batches == 0
    assert set(last.tolist()) <= set(taken[0].ids.tolist())  # trained on the one coreset that arrived
    assert "round 0 ended with 1 of its 2 coresets" in caplog.text


# -- the state a checkpoint holds -------------------------------------------------------------------------------


def _coreset(subset: int, ids: list[int]) -> WeightedBatch:
    return WeightedBatch(3, subset, np.array(ids, np.int64), np.ones(len(ids), np.float32), 40, 1.5, "local-1")


def _state() -> LoaderState:
    """A state in mid-run: a region, its pass, a round ready in flight, advanced RNGs and counters."""
    s = LoaderState.new(dataset_size=100, seed=5, batch_size=4)
    ids = np.arange(10, 18, dtype=np.int64)
    weights = np.linspace(0.5, 1.5, 8).astype(np.float32)
    s.region = Region(2, ids, weights, np.arange(40, 60, dtype=np.int64), np.zeros(8, np.int64))
    s.pass_perm, s.pass_next = s.rng.permutation(8), 1
    coresets = {0: _coreset(0, [1, 2, 3]), 1: _coreset(1, [7, 8, 9])}
    s.pending = PendingRound(3, 3, np.arange(60, 80, dtype=np.int64), 2, 40, coresets, ended=True)
    s.fallback_rng.integers(0, 100, size=7)
    s.round, s.want_at, s.from_region, s.yielded = 4, 42, True, True
    s.stats.steps, s.stats.regions, s.stats.partial_rounds, s.stats.wait_s = 42, 3, 1, 0.25
    return s


def _through_a_checkpoint(state: dict[str, Any]) -> dict[str, Any]:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def _load(state: dict[str, Any], **changes: int) -> LoaderState:
    run = {"dataset_size": 100, "seed": 5, "batch_size": 4, "world_size": 1} | changes
    return LoaderState.from_state_dict(state, **run)


def test_loader_state_round_trips_through_a_checkpoint() -> None:
    before = _state()
    after = _load(_through_a_checkpoint(before.state_dict()))
    assert (after.round, after.want_at, after.need_request, after.from_region, after.yielded) == (
        4,
        42,
        False,
        True,
        True,
    )
    assert after.stats == before.stats
    assert before.region is not None and after.region is not None
    for name in ("ids", "weights", "check_ids", "owner"):
        np.testing.assert_array_equal(getattr(after.region, name), getattr(before.region, name))
    assert after.pass_perm is not None and before.pass_perm is not None
    np.testing.assert_array_equal(after.pass_perm, before.pass_perm)
    assert after.pass_next == 1
    assert after.pending is not None and after.pending.ready and after.pending.losses is None
    for k, b in before.pending.coresets.items():  # type: ignore[union-attr]
        a = after.pending.coresets[k]
        np.testing.assert_array_equal(a.ids, b.ids)
        np.testing.assert_array_equal(a.weights, b.weights)
        assert (a.round_id, a.subset_index, a.trainer_step, a.selection_ms, a.worker) == (
            b.round_id,
            b.subset_index,
            b.trainer_step,
            b.selection_ms,
            b.worker,
        )
    # The RNGs continue where they were: the next pass and the next uniform batch are the same.
    np.testing.assert_array_equal(after.rng.permutation(8), before.rng.permutation(8))
    np.testing.assert_array_equal(after.fallback_rng.integers(0, 100, 5), before.fallback_rng.integers(0, 100, 5))
    # Another world size deals the pool again; a round still in flight is dropped and asked for again.
    assert set(_load(before.state_dict(), world_size=2).region.owner.tolist()) == {0, 1}  # type: ignore[union-attr]
    in_flight = before.state_dict()
    in_flight["pending"]["ready"] = False
    reloaded = _load(in_flight)
    assert reloaded.pending is None and reloaded.need_request


def test_loader_state_reads_version_2_and_refuses_another_version_or_run() -> None:
    state = _state().state_dict()
    v2 = {**state, "version": 2}
    v2["pending"] = {
        **state["pending"],
        "coresets": {k: (c["ids"], c["weights"]) for k, c in state["pending"]["coresets"].items()},
    }
    old = _load(v2).pending
    assert old is not None and old.coresets[1].ids.tolist() == [7, 8, 9]
    assert old.coresets[1].trainer_step == 40 and np.isnan(old.coresets[1].selection_ms)  # not kept by v2
    with pytest.raises(ValueError, match=r"loader state has version 99; this code reads 2 or 3"):
        _load({**state, "version": 99})
    with pytest.raises(ValueError, match=r"saved with dataset_size 100; this loader has 50"):
        _load(state, dataset_size=50)
    with pytest.raises(ValueError, match=r"saved with seed 5; this loader has 6"):
        _load(state, seed=6)
    with pytest.raises(ValueError, match=r"saved with batch_size 4; this loader has 8"):
        _load(state, batch_size=8)
