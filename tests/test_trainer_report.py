"""The trainer's report on itself: what the service accepts and keeps (``selector_service.trainer_report``), and the
trainer's ``ServiceLink`` sending it with every round it starts, directly and ahead of time, over real gRPC.

Round trips over both transports, refusals, metrics and restarts are in ``test_client_contract.py``,
``test_provenance_metrics.py`` and ``test_persistence.py``."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from crest.selector.v1 import selector_pb2 as pb
from crest.selector.v1.api import RoundPlan, TrainerReport
from selector_service import trainer_report
from selector_service.errors import InvalidArgument
from trainer_client._link import ServiceLink
from trainer_client._passes import RoundEmbeddings
from trainer_client.client import SelectionClient
from trainer_client.loader_config import LoaderConfig


def _assert_same(a: TrainerReport, b: TrainerReport) -> None:
    """Equal field by field, NaN (not known) equal to NaN."""
    np.testing.assert_equal(dataclasses.astuple(a), dataclasses.astuple(b))


def test_the_report_travels_in_both_messages_that_carry_it() -> None:
    report = TrainerReport(
        trainer_fallback_batches=1, payoff_measurements=2, payoff_per_second=0.5, payoff_arm="control"
    )
    for message in (pb.StartRoundRequest(**report.proto_fields()), pb.SessionState(**report.proto_fields())):
        _assert_same(TrainerReport.from_proto(message), report)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (dict(trainer_fallback_batches=-1), "trainer_fallback_batches must be a count in [0, 2**64), received -1"),
        (dict(payoff_measurements=1 << 32), "payoff_measurements must be a count in [0, 2**32), received 4294967296"),
        (dict(trainer_control_steps=2.0), "trainer_control_steps must be a count in [0, 2**64), received 2.0"),
        (dict(payoff_per_second_hi="high"), "payoff_per_second_hi must be a number (NaN when not known), received"),
    ],
)
def test_what_only_the_in_process_transport_can_carry_is_refused_naming_it(fields: dict, message: str) -> None:
    """Over gRPC the wire types refuse these in the client; in process the service's check does."""
    with pytest.raises(InvalidArgument) as err:
        trainer_report.validate(TrainerReport(**fields))
    assert message in str(err.value)


def test_numpy_counts_are_kept_as_ints() -> None:
    kept = trainer_report.validate(TrainerReport(trainer_service_errors=np.int64(3), payoff_measurements=np.uint32(2)))
    assert (kept.trainer_service_errors, kept.payoff_measurements) == (3, 2)
    assert type(kept.trainer_service_errors) is int and type(kept.payoff_measurements) is int


def test_descriptions_say_when_the_payoff_is_not_known() -> None:
    assert trainer_report.describe(TrainerReport()) == (
        "trainer: 0 fallback batches, 0 failed calls ridden out, 0 control steps; payoff not measured"
    )
    unknown = trainer_report.validate(TrainerReport(payoff_measurements=1, payoff_per_second=3.0, payoff_arm="control"))
    assert math.isnan(unknown.payoff_per_second)
    assert trainer_report.describe(unknown).endswith("payoff not known after 1 measurement, training on control")


def test_the_link_sends_the_trainers_report_with_every_round_it_starts(
    client: SelectionClient, small_labels: np.ndarray
) -> None:
    """Directly, the report of the moment; ahead of time (``prefetch``), the report of the moment the round was
    queued, even when the trainer's report has moved on by the time it is taken."""
    reports = [
        TrainerReport(trainer_fallback_batches=1, payoff_arm="selection"),
        TrainerReport(trainer_fallback_batches=2, trainer_control_steps=5, payoff_arm="control"),
        TrainerReport(
            trainer_fallback_batches=3,
            trainer_control_steps=5,
            payoff_measurements=2,
            payoff_per_second=1.1,
            payoff_per_second_lo=0.9,
            payoff_per_second_hi=1.3,
            payoff_arm="selection",
        ),
    ]
    now = [reports[0]]
    config = LoaderConfig(batch_size=20, subset_fraction=0.05, num_subsets=2, drop_learned=False)
    link = ServiceLink(client, config, small_labels, 10, 10, streams=True, step=lambda: 0, report=lambda: now[0])

    def kept() -> TrainerReport:
        assert link.session is not None
        return TrainerReport.from_proto(client.session_state(link.session.session_id))

    def submit(round_: int, plan: RoundPlan) -> None:
        n = len(plan.ids)
        embedded = RoundEmbeddings(np.ones((n, 10), np.float32), small_labels[plan.ids], np.ones(n, np.float32), n)
        link.submit(round_, plan, embedded)

    try:
        plan = link.start_round(2)
        assert plan is not None
        _assert_same(kept(), reports[0])
        submit(0, plan)
        now[0] = reports[1]
        link.prefetch(2, trainer_step=5)  # round 1 queued with reports[1]
        now[0] = reports[2]
        link.settle()
        plan = link.start_round(2)  # takes the round started ahead: no new call
        assert plan is not None and plan.round_id == 1 and link.counters.rounds_prefetched == 1
        _assert_same(kept(), reports[1])
        submit(1, plan)
        plan = link.start_round(2)
        assert plan is not None and plan.round_id == 2 and kept() == reports[2]
    finally:
        link.close(end_session=True)
