"""One contract, two transports: every scenario here runs against the gRPC client over real loopback
(``SelectionClient`` to a server selecting in threads) and against the in-process selection
(``InProcessSelection``, the same service code with no server), and both must behave the same: the same
plans and coresets for the same seed, the same status codes and messages for the same bad calls, nothing
changed by a refused call. The gRPC-only parts of the contract (bytes on the wire, bearer tokens, health,
message sizes) are ``test_service.py``'s.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest
import torch

from crest.selector.v1.api import SelectionService, SessionInfo, TrainerReport
from selector_service.backends import LocalBackend
from selector_service.inprocess import InProcessSelection
from selector_service.server import ServerConfig, start_server
from trainer_client import CoresetLoader, LoaderConfig, weighted_loss
from trainer_client.client import SelectionClient
from trainer_client.data import FashionMNIST
from trainer_client.models import SmallCNN

TRANSPORTS = ("grpc", "in-process")


def _embed(ids: np.ndarray, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(len(ids), 10)).astype(np.float32)


def _transport(name: str) -> Iterator[SelectionService]:
    if name == "in-process":
        with InProcessSelection(num_workers=2) as selection:
            yield selection
        return
    running = start_server(ServerConfig(port=0, backend="local"), backend=LocalBackend(num_workers=2))
    try:
        with SelectionClient(running.target, timeout_s=30) as client:
            client.wait_ready(timeout_s=10)
            yield client
    finally:
        running.stop(grace=0)


@pytest.fixture(params=TRANSPORTS)
def service(request: pytest.FixtureRequest) -> Iterator[SelectionService]:
    yield from _transport(request.param)


@pytest.fixture
def planned(service: SelectionService, small_labels: np.ndarray) -> tuple[str, np.ndarray]:
    info = service.create_session(small_labels, subset_fraction=0.05, num_subsets=2, batch_size=20)
    return info.session_id, service.start_round(info.session_id, 0, 0).ids


def test_both_transports_are_the_interface(service: SelectionService) -> None:
    assert isinstance(service, SelectionService)
    service.wait_ready(timeout_s=10)


def test_round_trip_delivers_valid_weighted_batches(service: SelectionService, small_labels: np.ndarray) -> None:
    info = service.create_session(small_labels, subset_fraction=0.05, num_subsets=3, batch_size=20, seed=1)
    assert (info.num_classes, info.subset_size, info.batch_size, info.num_subsets) == (10, 100, 20, 3)
    plan = service.start_round(info.session_id, 0, trainer_step=0)
    assert len(plan.ids) <= 300 and (np.diff(plan.ids) > 0).all() and plan.num_subsets == 3
    assert service.submit_embeddings(info.session_id, 0, plan.ids, _embed(plan.ids), small_labels[plan.ids]) == len(
        plan.ids
    )
    batches = list(service.stream_batches(info.session_id, 0))
    assert sorted(b.subset_index for b in batches) == [0, 1, 2]
    for b in batches:
        assert len(b.ids) == 20 and len(np.unique(b.ids)) == 20
        assert np.isin(b.ids, plan.ids).all()
        assert (b.weights > 0).all() and np.isclose(b.weights.mean(), 1.0, atol=1e-5)
        assert (np.bincount(small_labels[b.ids], minlength=10) == 2).all()  # 20 slots over 10 balanced classes
    state = service.session_state(info.session_id)
    assert (state.rounds_completed, state.batches_delivered, state.examples_delivered) == (1, 3, 60)
    assert service.close_session(info.session_id) == 1


def test_same_seed_same_coresets(service: SelectionService, small_labels: np.ndarray) -> None:
    runs = []
    for _ in range(2):
        info = service.create_session(small_labels, subset_fraction=0.05, num_subsets=2, batch_size=20, seed=5)
        plan = service.start_round(info.session_id, 0, 0)
        service.submit_embeddings(info.session_id, 0, plan.ids, _embed(plan.ids, seed=3))
        runs.append(
            sorted(
                (b.subset_index, b.ids.tolist(), b.weights.tolist()) for b in service.stream_batches(info.session_id, 0)
            )
        )
    assert runs[0] == runs[1]


def test_unknown_session_is_not_found_naming_the_id(service: SelectionService) -> None:
    for call in (
        lambda: service.start_round("nope", 0, 0),
        lambda: service.session_state("nope"),
        lambda: service.close_session("nope"),
        lambda: list(service.stream_batches("nope", 0)),
        lambda: service.submit_embeddings("nope", 0, np.arange(3), _embed(np.arange(3))),
    ):
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert "'nope'" in err.value.details()


def test_round_order_is_enforced(service: SelectionService, planned: tuple[str, np.ndarray]) -> None:
    sid, _ = planned
    before = service.session_state(sid)
    for round_id, code, text in (
        (0, grpc.StatusCode.ALREADY_EXISTS, "round 0 of session"),
        (5, grpc.StatusCode.FAILED_PRECONDITION, "expects round 1 next"),
    ):
        with pytest.raises(grpc.RpcError) as err:
            service.start_round(sid, round_id, 0)
        assert err.value.code() == code and text in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        list(service.stream_batches(sid, 0))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "no embeddings yet" in err.value.details()
    assert service.session_state(sid) == before


def test_rounds_in_flight_are_bounded(service: SelectionService, small_labels: np.ndarray) -> None:
    sid = service.create_session(small_labels, subset_fraction=0.05, num_subsets=1, batch_size=10).session_id
    for r in range(4):
        service.start_round(sid, r, r)
    with pytest.raises(grpc.RpcError) as err:
        service.start_round(sid, 4, 4)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "4 rounds in flight" in err.value.details()


def test_learned_examples_leave_the_pool_and_come_back_when_their_loss_rises(service: SelectionService) -> None:
    labels = np.random.default_rng(3).permutation(np.repeat(np.arange(10), 100)).astype(np.int64)
    info = service.create_session(
        labels,
        subset_fraction=0.1,
        num_subsets=2,
        batch_size=20,
        drop_learned=True,
        drop_window=1,
        min_pool_fraction=0.5,
    )
    sid = info.session_id
    config = service.session_state(sid).config
    assert config.drop_learned and config.drop_threshold == pytest.approx(0.1) and config.drop_window == 1
    plan0 = service.start_round(sid, 0, 0)
    service.submit_embeddings(sid, 0, plan0.ids, _embed(plan0.ids), losses=np.zeros(len(plan0.ids), np.float32))
    list(service.stream_batches(sid, 0))
    state = service.session_state(sid)
    assert state.excluded_size == len(plan0.ids) and state.active_size == 1000 - len(plan0.ids)
    excluded = set(plan0.ids.tolist())
    plan1 = service.start_round(sid, 1, 10)
    retested = np.array(sorted(set(plan1.ids.tolist()) & excluded))
    assert len(retested) >= 1  # a few excluded ids come back in the plan to be re-tested
    losses = np.where(np.isin(plan1.ids, retested), 5.0, 1.0).astype(np.float32)
    service.submit_embeddings(sid, 1, plan1.ids, _embed(plan1.ids), losses=losses)
    batches = list(service.stream_batches(sid, 1))
    for b in batches:
        assert not set(b.ids.tolist()) & excluded  # excluded examples are never selected
    state = service.session_state(sid)
    assert state.readmitted_total == len(retested)
    assert state.excluded_size == len(excluded) - len(retested)


def test_joint_selection_spends_the_coreset_where_the_embeddings_spread(
    service: SelectionService, small_labels: np.ndarray
) -> None:
    """Class 0's embeddings are scattered, the other classes' are tight clusters: per-class selection splits the
    coreset by class share (2 each), joint selection covers each tight class with one pick and spends the rest on
    class 0; the session reports the setting it runs."""
    rng = np.random.default_rng(0)
    picked = {}
    for joint in (False, True):
        info = service.create_session(
            small_labels, subset_fraction=0.05, num_subsets=1, batch_size=20, seed=2, joint_selection=joint
        )
        assert service.session_state(info.session_id).config.joint_selection == joint
        plan = service.start_round(info.session_id, 0, 0)
        y = small_labels[plan.ids]
        emb = 100.0 * np.eye(10, dtype=np.float32)[y] + rng.normal(scale=1e-3, size=(len(y), 10)).astype(np.float32)
        emb[y == 0] = rng.normal(scale=30.0, size=(int((y == 0).sum()), 10))
        service.submit_embeddings(info.session_id, 0, plan.ids, emb, y)
        (batch,) = service.stream_batches(info.session_id, 0)
        picked[joint] = np.bincount(small_labels[batch.ids], minlength=10)
        assert len(np.unique(batch.ids)) == 20 and np.isin(batch.ids, plan.ids).all()
    assert (picked[False] == 2).all()
    assert picked[True][0] == 10 and picked[True][1:].sum() == 10  # all 10 of class 0 in the subset; one per rest


def test_rounds_can_ask_for_fewer_subsets_and_share_the_first_ones(
    service: SelectionService, small_labels: np.ndarray
) -> None:
    plans = []
    for count in (2, 4):
        sid = service.create_session(
            small_labels, subset_fraction=0.05, num_subsets=4, batch_size=20, seed=9
        ).session_id
        plan = service.start_round(sid, 0, 0, num_subsets=count)
        assert plan.num_subsets == count
        service.submit_embeddings(sid, 0, plan.ids, _embed(plan.ids))
        plans.append({b.subset_index: b.ids.tolist() for b in service.stream_batches(sid, 0)})
        with pytest.raises(grpc.RpcError) as err:
            service.start_round(sid, 1, 0, num_subsets=5)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "exceeds the session's 4" in err.value.details()
    assert sorted(plans[0]) == [0, 1] and sorted(plans[1]) == [0, 1, 2, 3]


# A trainer's report with every field set: counts, a payoff whose interval is unbounded below, the control arm.
REPORT = TrainerReport(
    trainer_fallback_batches=7,
    trainer_service_errors=2,
    trainer_control_steps=40,
    payoff_measurements=3,
    payoff_per_second=1.25,
    payoff_per_second_lo=-math.inf,
    payoff_per_second_hi=2.5,
    payoff_arm="control",
)


def _kept(service: SelectionService, sid: str) -> tuple[Any, ...]:
    """The session's trainer report as the service keeps it, as a tuple (compare with ``np.testing.assert_equal``,
    which holds NaN equal to NaN)."""
    return dataclasses.astuple(TrainerReport.from_proto(service.session_state(sid)))


def test_the_trainers_report_round_trips_keeping_the_largest_counts_and_the_last_payoff(
    service: SelectionService, small_labels: np.ndarray
) -> None:
    sid = service.create_session(small_labels, subset_fraction=0.05, num_subsets=2, batch_size=20).session_id
    np.testing.assert_equal(_kept(service, sid), dataclasses.astuple(TrainerReport()))  # nothing reported yet
    service.start_round(sid, 0, 0, report=REPORT)
    assert _kept(service, sid) == dataclasses.astuple(REPORT)
    # A trainer resumed from an older checkpoint: smaller counts but one (kept at its largest), one measurement.
    resumed = TrainerReport(
        trainer_fallback_batches=3, trainer_control_steps=50, payoff_measurements=1, payoff_arm="selection"
    )
    service.start_round(sid, 1, 10, trainer_wait_s=0.5, report=resumed)
    kept = TrainerReport.from_proto(service.session_state(sid))
    assert (kept.trainer_fallback_batches, kept.trainer_service_errors, kept.trainer_control_steps) == (7, 2, 50)
    assert (kept.payoff_measurements, kept.payoff_arm) == (1, "selection")
    assert all(math.isnan(v) for v in (kept.payoff_per_second, kept.payoff_per_second_lo, kept.payoff_per_second_hi))
    # A round started with no report: the counts stay, the payoff is the call's (none).
    service.start_round(sid, 2, 20)
    np.testing.assert_equal(
        _kept(service, sid),
        dataclasses.astuple(
            TrainerReport(trainer_fallback_batches=7, trainer_service_errors=2, trainer_control_steps=50)
        ),
    )
    assert service.session_state(sid).trainer_wait_s == 0.5


# Bad trainer reports, each refused naming what came, with nothing changed.
BAD_REPORTS = {
    "unknown arm": (
        dict(payoff_arm="bogus"),
        "payoff_arm must be 'selection', 'control' or '' (not reported), received 'bogus'",
    ),
    "lo above hi": (
        dict(payoff_per_second=1.0, payoff_per_second_lo=1.5, payoff_per_second_hi=0.5),
        "payoff_per_second_lo must be <= payoff_per_second_hi, received lo 1.5 > hi 0.5",
    ),
    "infinite estimate": (
        dict(payoff_per_second=math.inf),
        "payoff_per_second must be finite, or NaN when not known, received inf",
    ),
    "interval bounded inwards": (dict(payoff_per_second_lo=math.inf), "received lo inf, hi 2.5"),
}


@pytest.mark.parametrize("case", sorted(BAD_REPORTS))
def test_a_bad_report_is_refused_the_same_way_and_changes_nothing(
    service: SelectionService, small_labels: np.ndarray, case: str
) -> None:
    sid = service.create_session(small_labels, subset_fraction=0.05, num_subsets=2, batch_size=20).session_id
    service.start_round(sid, 0, 0, report=REPORT)
    before = service.session_state(sid)
    fields, message = BAD_REPORTS[case]
    bad = dataclasses.replace(REPORT, trainer_fallback_batches=99, **fields)
    with pytest.raises(grpc.RpcError) as err:
        service.start_round(sid, 1, 5, trainer_wait_s=3.0, report=bad)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert message in err.value.details()
    assert service.session_state(sid) == before  # no round started, no count or wait taken, the report as it was
    assert service.start_round(sid, 1, 5, report=REPORT).round_id == 1
    assert _kept(service, sid) == dataclasses.astuple(REPORT)


# Bad embeddings a caller can send through the interface, each refused naming what came, with nothing changed.
BAD_SUBMISSIONS = {
    "wrong dim": (lambda ids: dict(embeddings=np.zeros((len(ids), 7), np.float32)), "embedding dim 7, the session"),
    "NaN": (lambda ids: dict(embeddings=np.full((len(ids), 10), np.nan, np.float32)), "is not finite"),
    "id outside the plan": (lambda ids: dict(ids=np.append(ids[:-1], 1_000_000)), "id 1000000 is not in the round's"),
    "missing ids": (lambda ids: dict(ids=ids[:-5], embeddings=_embed(ids[:-5])), "missing 5"),
    "wrong labels": (lambda ids: dict(labels=np.full(len(ids), 11)), "label 11 for id"),
    "negative loss": (lambda ids: dict(losses=-np.ones(len(ids), np.float32)), "loss -1.0"),
}


@pytest.mark.parametrize("case", sorted(BAD_SUBMISSIONS))
def test_bad_embeddings_are_refused_the_same_way_and_change_nothing(
    service: SelectionService, planned: tuple[str, np.ndarray], case: str
) -> None:
    sid, ids = planned
    before = service.session_state(sid)
    make, message = BAD_SUBMISSIONS[case]
    call = dict(ids=ids, embeddings=_embed(ids)) | make(ids)
    with pytest.raises(grpc.RpcError) as err:
        service.submit_embeddings(sid, 0, **call)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert message in err.value.details()
    assert service.session_state(sid) == before
    assert service.submit_embeddings(sid, 0, ids, _embed(ids)) == len(ids)  # the round is untouched
    assert len(list(service.stream_batches(sid, 0))) == 2


def test_another_sessions_token_is_refused_and_changes_nothing(
    service: SelectionService, small_labels: np.ndarray
) -> None:
    a = service.create_session(small_labels, subset_fraction=0.05, num_subsets=2, batch_size=20)
    b = service.create_session(small_labels, subset_fraction=0.05, num_subsets=2, batch_size=20)
    assert a.token and b.token and a.token != b.token
    plan = service.start_round(a.session_id, 0, 0)
    before = service.session_state(a.session_id)
    service.attach_session(SessionInfo(a.session_id, 10, 0, 0, 0, b.token))  # b's token on a's session
    for call in (
        lambda: service.session_state(a.session_id),
        lambda: service.start_round(a.session_id, 1, 0),
        lambda: service.submit_embeddings(a.session_id, 0, plan.ids, _embed(plan.ids)),
        lambda: list(service.stream_batches(a.session_id, 0)),
        lambda: service.close_session(a.session_id),
    ):
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED and a.session_id in err.value.details()
    service.attach_session(a)
    assert service.session_state(a.session_id) == before
    assert service.submit_embeddings(a.session_id, 0, plan.ids, _embed(plan.ids)) == len(plan.ids)


def test_settings_are_checked_before_any_call(service: SelectionService, small_labels: np.ndarray) -> None:
    with pytest.raises(TypeError, match="unexpected keyword argument 'subset_fractions'"):
        service.create_session(small_labels, subset_fractions=0.1)
    with pytest.raises(ValueError, match="similarity"):
        service.create_session(small_labels, similarity="cosine")


def test_both_transports_select_the_same_coresets(small_labels: np.ndarray) -> None:
    """The same session, seed and embeddings give the same plans and the same coresets in process as over gRPC."""
    out = {}
    for name in TRANSPORTS:
        for service in _transport(name):
            sid = service.create_session(small_labels, subset_fraction=0.05, num_subsets=3, batch_size=20, seed=4)
            rounds = []
            for r in range(2):
                plan = service.start_round(sid.session_id, r, r)
                service.submit_embeddings(sid.session_id, r, plan.ids, _embed(plan.ids, seed=r))
                batches = sorted(
                    (b.subset_index, b.ids.tolist(), b.weights.tolist())
                    for b in service.stream_batches(sid.session_id, r)
                )
                rounds.append((plan.ids.tolist(), batches))
            out[name] = rounds
    assert out["grpc"] == out["in-process"]


def _demo_loop(service: SelectionService, steps: int) -> tuple[list[tuple[list[int], list[float]]], Any]:
    """The demo's training loop (``trainer_client.train``: SmallCNN, SGD, the recommended recipe) on the first 6,000
    Fashion-MNIST examples; every step's (ids, weights) and the loader's counters."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    data = FashionMNIST("train", limit=6000)
    model = SmallCNN(num_classes=10)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    config = LoaderConfig(batch_size=64, subset_fraction=0.1)  # r = 600 of 6,000, as the quick benchmarks
    seen = []
    with CoresetLoader(data, model, service, data.targets.numpy(), config=config) as loader:
        for _, (x, y, w) in zip(range(steps), loader, strict=False):
            seen.append((loader.last_ids.tolist(), w.tolist()))
            logits = model(x)
            if config.training_logits:
                loader.observe_logits(logits)
            loss = weighted_loss(logits, y, w)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        stats = loader.stats
    return seen, stats


@pytest.mark.slow
def test_the_demo_loop_trains_in_process_on_the_batches_it_gets_over_grpc() -> None:
    runs = {}
    for name in TRANSPORTS:
        for service in _transport(name):
            runs[name] = _demo_loop(service, steps=100)
    for name, (_, stats) in runs.items():
        assert stats.fallback_batches == 0 and stats.service_errors == 0, (name, stats)
        assert stats.regions >= 4, (name, stats)  # 20-step regions: every batch after the first came from a round
    assert runs["in-process"][0] == runs["grpc"][0]
