"""The trainer's report on itself (``TrainerReport``, sent with every StartRound) as the service keeps it: checked
at the edge, merged into the session's, saved in its state and described for ``crest inspect``.

The service only keeps the report for monitoring (``GetSessionState``, the per-session Prometheus metrics);
selection never reads it. Imports neither the selection engine nor gRPC's server, so ``crest inspect`` can load it.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, replace
from typing import Any

from crest.selector.v1.api import PAYOFF_ARMS, TrainerReport
from selector_service.errors import InvalidArgument

__all__ = ["describe", "from_state", "merge", "to_state", "validate"]

# The counts of a report and the bits of their wire type (uint64, or uint32): each in [0, 2**bits).
COUNTS = {
    "trainer_fallback_batches": 64,
    "trainer_service_errors": 64,
    "trainer_control_steps": 64,
    "payoff_measurements": 32,
}
# The counts that are cumulative over the trainer's run: the service keeps the largest received.
CUMULATIVE = ("trainer_fallback_batches", "trainer_service_errors", "trainer_control_steps")
PAYOFF = ("payoff_per_second", "payoff_per_second_lo", "payoff_per_second_hi")
# Fewest measurements that give the payoff an estimate (the wire contract: below it the floats mean nothing).
MIN_MEASUREMENTS = 2


def validate(report: TrainerReport) -> TrainerReport:
    """``report`` as the service keeps it, or ``InvalidArgument`` naming the field and the value received.

    Counts are integers that fit their wire type. The payoff's estimate is finite or NaN (not known); its interval's
    lo is finite, -inf (unbounded) or NaN, hi finite, +inf or NaN, and lo <= hi when both are finite. The arm is
    one of ``PAYOFF_ARMS``. Below ``MIN_MEASUREMENTS`` measurements the three payoff floats are read as not known
    (NaN), whatever came: over gRPC an unset double arrives as 0, which is not an estimate.
    """
    for name, bits in COUNTS.items():
        value = getattr(report, name)
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 0 <= int(value) < 1 << bits:
            raise InvalidArgument(f"{name} must be a count in [0, 2**{bits}), received {value!r}")
    for name in PAYOFF:
        value = getattr(report, name)
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise InvalidArgument(f"{name} must be a number (NaN when not known), received {value!r}")
    est, lo, hi = (float(getattr(report, name)) for name in PAYOFF)
    if math.isinf(est):
        raise InvalidArgument(f"payoff_per_second must be finite, or NaN when not known, received {est}")
    if lo == math.inf or hi == -math.inf:
        raise InvalidArgument(
            f"the payoff's interval is unbounded only outwards (lo -inf, hi +inf), received lo {lo}, hi {hi}"
        )
    if math.isfinite(lo) and math.isfinite(hi) and lo > hi:
        raise InvalidArgument(f"payoff_per_second_lo must be <= payoff_per_second_hi, received lo {lo} > hi {hi}")
    if report.payoff_arm not in PAYOFF_ARMS:
        raise InvalidArgument(
            f"payoff_arm must be 'selection', 'control' or '' (not reported), received {report.payoff_arm!r}"
        )
    if report.payoff_measurements < MIN_MEASUREMENTS:
        est = lo = hi = math.nan
    kept: dict[str, Any] = {name: int(getattr(report, name)) for name in COUNTS}  # numpy integers as int
    kept.update(payoff_per_second=est, payoff_per_second_lo=lo, payoff_per_second_hi=hi)
    return replace(report, **kept)


def merge(kept: TrainerReport, received: TrainerReport) -> TrainerReport:
    """The session's report after ``received`` (validated): the largest of each cumulative count (a trainer resumed
    from a checkpoint reports less than it had), and ``received``'s payoff, as one estimate with its count."""
    return replace(received, **{name: max(getattr(kept, name), getattr(received, name)) for name in CUMULATIVE})


def to_state(report: TrainerReport) -> dict[str, Any]:
    """The report in a session's ``state_dict`` (JSON: NaN and infinities as JSON's extensions)."""
    return asdict(report)


def from_state(state: dict[str, Any] | None) -> TrainerReport:
    """The report of a ``state_dict`` (``TrainerReport()`` for a state saved before sessions kept one); a state
    that does not hold a valid report raises ``InvalidArgument`` or ``TypeError``, naming what it holds."""
    if state is None:
        return TrainerReport()
    return validate(TrainerReport(**state))


def _count(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def describe(report: TrainerReport) -> str:
    """One line for ``crest inspect``: the trainer's counts, then its payoff and the arm it trains on."""
    r = report
    counts = (
        f"{_count(r.trainer_fallback_batches, 'fallback batch', 'fallback batches')}, "
        f"{_count(r.trainer_service_errors, 'failed call', 'failed calls')} ridden out, "
        f"{_count(r.trainer_control_steps, 'control step', 'control steps')}"
    )
    measurements = _count(r.payoff_measurements, "measurement", "measurements")
    if r.payoff_measurements == 0:
        payoff = "payoff not measured"
    elif math.isnan(r.payoff_per_second):
        payoff = f"payoff not known after {measurements}"
    else:
        payoff = (
            f"payoff {r.payoff_per_second:.3g}x per second, 90% interval [{r.payoff_per_second_lo:.3g}, "
            f"{r.payoff_per_second_hi:.3g}], over {measurements}"
        )
    arm = f", training on {r.payoff_arm}" if r.payoff_arm else ""
    return f"trainer: {counts}; {payoff}{arm}"
