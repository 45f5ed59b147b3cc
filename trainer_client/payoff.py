"""Does selection pay on this run? The estimate of its speedup over a control arm, with an interval, from
measurements taken inside the run (``LoaderConfig.payoff``); and the governor's rule built on it.

A *measurement* is three consecutive segments of equal length with the probe set's mean loss taken at their four
boundaries: one arm, the other arm, the first arm again (``A B A``). The middle segment's loss reduction per step
is compared with the mean of its two neighbours': both neighbours start from models the middle one does not,
one before and one after it, so a rate that changes linearly over the three (the model's progress slowing down,
a learning-rate schedule) cancels out of the comparison. Every measurement gives one pair

    x = selection's probe-loss reduction per step,  y = the control's,

and the run's pairs give the ratio of the mean rates, ``x̄ / ȳ``: selection's speedup *per step* (how many
control steps one selection step is worth, near the losses measured). Its interval is Fieller's for a ratio of
two means of paired samples (the ratios r whose t interval on ``x - r y`` holds 0), which stays honest when ``ȳ``
is small: when the control's own progress cannot be told from 0, the interval is unbounded.

The verdict asks one question of the same test: is selection's progress per second above or below the control's?
That is the test of one ratio, ``r0`` (1 per second: the arms' cost ratio per step), by the paired t statistic of
``x - r0 y``: *pays* when it is significantly positive, *loses* when negative, *undetermined* otherwise. Fieller's
set is exactly the ratios this test keeps, so the verdict and the interval agree; the verdict also stands where the
set is unbounded but still leaves out ``r0`` (it is then two rays, printed as such: late on noisy labels,
selection's coresets raise the probe loss while the control's segments are SGD's noise around 0), and it reads the
sign of the progress, not of the ratio, so a control that makes the probe loss worse is not mistaken for selection
losing. Where selection's steps cost many control steps, ``r0`` is large and the test asks, in effect, whether the
control's progress can be told from 0.

Per wall-second, the speedup is the per-step one times the two arms' costs per step, ``c_control / c_selection``,
where each arm is charged what it really costs: a selection step its share of the embedding passes, fits,
checks and waits for the service, a control step only its own time (``ArmCosts``). The costs are sums over
many steps and taken as known; the interval is the per-step one scaled by the same factor.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

Arm = Literal["selection", "control"]
Verdict = Literal["pays", "loses", "undetermined"]

# Two-sided 90% intervals: the 0.95 quantile of Student's t with df degrees of freedom (df 1..30, then 40, 60, 120).
_T95: tuple[float, ...] = (6.3138, 2.9200, 2.3534, 2.1318, 2.0150, 1.9432, 1.8946, 1.8595, 1.8331, 1.8125)
_T95 += (1.7959, 1.7823, 1.7709, 1.7613, 1.7531, 1.7459, 1.7396, 1.7341, 1.7291, 1.7247)
_T95 += (1.7207, 1.7171, 1.7139, 1.7109, 1.7081, 1.7056, 1.7033, 1.7011, 1.6991, 1.6973)
_T95_TAIL = ((40, 1.6839), (60, 1.6706), (120, 1.6577))
LEVEL = 0.90  # the intervals' coverage


def t95(df: int) -> float:
    """The 0.95 quantile of Student's t with ``df`` (>= 1) degrees of freedom (tabled; conservative between rows)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, received {df}")
    if df <= len(_T95):
        return _T95[df - 1]
    # Between rows, the row of fewer degrees of freedom: a larger quantile, so a wider (conservative) interval.
    return next((value for rows, value in reversed(_T95_TAIL) if df >= rows), _T95[-1])


@dataclass(frozen=True)
class Segment:
    """Consecutive training steps on one arm, between two probe losses (mean cross-entropy, nats)."""

    arm: Arm
    steps: int
    loss_before: float
    loss_after: float

    @property
    def rate(self) -> float:
        """Probe-loss reduction per step (positive when the loss fell)."""
        return (self.loss_before - self.loss_after) / self.steps


@dataclass(frozen=True)
class Pair:
    """One measurement's rates: probe-loss reduction per step of each arm (``A B A``: the outer arm's is the mean
    of its two segments')."""

    selection: float
    control: float

    @classmethod
    def of(cls, first: Segment, middle: Segment, last: Segment) -> Pair:
        """The pair of an ``A B A`` measurement; refuses segments that are not one arm, the other, the first."""
        if not (first.arm == last.arm != middle.arm):
            raise ValueError(
                f"a measurement is one arm, the other, the first again; received {first.arm}, {middle.arm}, {last.arm}"
            )
        outer = (first.rate + last.rate) / 2
        return cls(outer, middle.rate) if first.arm == "selection" else cls(middle.rate, outer)


@dataclass(frozen=True)
class ArmCosts:
    """What each arm's steps cost in wall-clock seconds, as charged: the steps' own time, and selection's
    overheads (embedding passes, the quadratic model's fits, Taylor checks, waits for the service)."""

    selection_steps: int = 0
    selection_s: float = 0.0  # time of the selection arm's steps
    overhead_s: float = 0.0  # selection's passes and waits, wherever in the run they fell
    control_steps: int = 0
    control_s: float = 0.0

    def per_step(self) -> tuple[float, float] | None:
        """(selection's, control's) seconds per step, overheads charged to selection; None before both ran."""
        if not (self.selection_steps and self.control_steps):
            return None
        return (self.selection_s + self.overhead_s) / self.selection_steps, self.control_s / self.control_steps


@dataclass(frozen=True)
class Payoff:
    """Selection's speedup over the control (> 1: selection reaches a probe loss sooner), with 90% intervals.

    ``lo``/``hi`` are ``-inf``/``inf`` where the data cannot bound them (``undetermined``); the per-second values
    are None until both arms' costs are known."""

    measurements: int
    per_step: float
    per_step_lo: float
    per_step_hi: float
    per_second: float | None = None
    per_second_lo: float | None = None
    per_second_hi: float | None = None
    outcome: Verdict = "undetermined"  # the test at 1 per second (per step before costs are known)
    gap: tuple[float, float] | None = None  # an unbounded set's excluded ratios, in the headline's unit

    @property
    def undetermined(self) -> bool:
        """Whether the interval is unbounded (the verdict may still be decided: ``verdict``)."""
        return not (math.isfinite(self.per_step_lo) and math.isfinite(self.per_step_hi))

    def _headline(self) -> tuple[float, float, float, str]:
        """(value, lo, hi, unit): per second once both arms' costs are known, per step before."""
        if self.per_second is not None and self.per_second_lo is not None and self.per_second_hi is not None:
            return self.per_second, self.per_second_lo, self.per_second_hi, "per second"
        return self.per_step, self.per_step_lo, self.per_step_hi, "per step"

    def verdict(self) -> Verdict:
        """ "pays", "loses" or "undetermined": whether selection's probe-loss progress per second (per step before
        the costs are known) is above or below the control's at the 90% level (the module docstring)."""
        return self.outcome

    def describe(self) -> str:
        """One line for a summary, e.g. ``selection paid: 1.30x [1.10, 1.52] per second (8 measurements)``."""
        head = {"pays": "selection paid", "loses": "selection lost", "undetermined": "selection's payoff unclear"}
        value, lo, hi, unit = self._headline()
        count = f"{self.measurements} measurement{'s' if self.measurements != 1 else ''}"
        if self.gap is None and not (math.isfinite(lo) or math.isfinite(hi)):
            # Every ratio is kept: "[-inf, inf]" would read as a number; say what it means instead, and give the
            # point estimate last, as what it is (it can point either way: docs/concepts/payoff.md).
            return (
                f"{head[self.verdict()]}: no ratio ruled out at {LEVEL:.0%} ({count}; the arms' progress on the "
                f"probe set is within its noise; point estimate {value:.2f}x {unit})"
            )
        bounds = f"[{_fmt(lo)}, {_fmt(hi)}]"
        if self.gap is not None:
            bounds = f"[-inf, {_fmt(self.gap[0])}] or [{_fmt(self.gap[1])}, inf]"
        return f"{head[self.verdict()]}: {value:.2f}x {bounds} {unit} ({count}, {LEVEL:.0%} interval)"


def or_nan(x: float | None) -> float:
    """A payoff value where a float must stand (logged metrics, the service's report): nan when not known."""
    return math.nan if x is None else x


def _fmt(x: float) -> str:
    return f"{x:.2f}" if math.isfinite(x) else ("inf" if x > 0 else "-inf")


@dataclass(frozen=True)
class _Fieller:
    """Fieller's test of a ratio r of the mean rates, built once from the pairs: r is kept at the 90% level where
    ``a r^2 + b r + c <= 0``, i.e. where the paired t test holds ``mx - r my`` at 0:
    (mx - r my)^2 <= t^2 (vxx - 2 r vxy + r^2 vyy), the v's the variances and covariance of the two means."""

    mx: float
    my: float
    a: float
    b: float
    c: float

    @classmethod
    def of(cls, pairs: Sequence[Pair]) -> _Fieller:
        n = len(pairs)
        if n < 2:
            raise ValueError(f"an interval needs at least 2 measurements, received {n}")
        xs = [p.selection for p in pairs]
        ys = [p.control for p in pairs]
        if not all(math.isfinite(v) for v in xs + ys):
            raise ValueError(f"measurement rates must be finite, received {list(zip(xs, ys, strict=True))}")
        mx, my = sum(xs) / n, sum(ys) / n
        vxx = sum((x - mx) ** 2 for x in xs) / (n - 1) / n
        vyy = sum((y - my) ** 2 for y in ys) / (n - 1) / n
        vxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / (n - 1) / n
        t2 = t95(n - 1) ** 2
        return cls(mx, my, my * my - t2 * vyy, -2 * (mx * my - t2 * vxy), mx * mx - t2 * vxx)

    def interval(self) -> tuple[float, float, float]:
        ratio = self.mx / self.my if self.my != 0 else math.nan
        a, b, c = self.a, self.b, self.c
        disc = b * b - 4 * a * c
        if a <= 0 or disc < 0:
            return ratio, -math.inf, math.inf
        root = math.sqrt(disc)
        return ratio, (-b - root) / (2 * a), (-b + root) / (2 * a)

    def gap(self) -> tuple[float, float] | None:
        a, b, c = self.a, self.b, self.c
        disc = b * b - 4 * a * c
        if a >= 0 or disc <= 0:
            return None
        root = math.sqrt(disc)
        return (-b + root) / (2 * a), (-b - root) / (2 * a)  # a < 0: this order is ascending

    def compare(self, r0: float) -> Verdict:
        if self.a * r0 * r0 + self.b * r0 + self.c <= 0:
            return "undetermined"
        return "pays" if self.mx - r0 * self.my > 0 else "loses"


def ratio_interval(pairs: Sequence[Pair]) -> tuple[float, float, float]:
    """(x̄/ȳ, lo, hi): the ratio of the mean selection rate to the mean control rate over ``pairs`` (at least 2),
    with Fieller's 90% interval; (ratio, -inf, inf) when the interval is unbounded (the mean control rate is
    not distinguishable from 0, or the data allow every ratio), ratio nan when ȳ is 0."""
    return _Fieller.of(pairs).interval()


def ratio_gap(pairs: Sequence[Pair]) -> tuple[float, float] | None:
    """The ratios an unbounded Fieller set leaves out, (lo, hi), when it is two rays; None otherwise."""
    return _Fieller.of(pairs).gap()


def compare(pairs: Sequence[Pair], r0: float) -> Verdict:
    """Whether selection's rate is above ``r0`` times the control's ("pays"), below ("loses"), or neither at the
    90% level: the paired t test of ``x - r0 y`` (Fieller's test of the ratio ``r0``)."""
    return _Fieller.of(pairs).compare(r0)


def lean(pairs: Sequence[Pair], costs: ArmCosts) -> float:
    """The mean of ``x - r0 y`` over ``pairs`` (at least 1), the numerator of the verdict's test without its noise:
    above 0 where selection's progress per second looks above the control's (per step before the costs are
    known), below 0 where it looks below."""
    if not pairs:
        raise ValueError("a lean needs at least 1 measurement, received 0")
    per_step = costs.per_step()
    r0 = per_step[0] / per_step[1] if per_step is not None and min(per_step) > 0 else 1.0
    return sum(p.selection - r0 * p.control for p in pairs) / len(pairs)


def estimate(pairs: Sequence[Pair], costs: ArmCosts) -> Payoff | None:
    """The payoff from a run's measurements and its arms' costs; None with fewer than 2 measurements."""
    if len(pairs) < 2:
        return None
    test = _Fieller.of(pairs)
    (ratio, lo, hi), gap = test.interval(), test.gap()
    per_step = costs.per_step()
    if per_step is None or min(per_step) <= 0:
        return Payoff(len(pairs), ratio, lo, hi, outcome=test.compare(1.0), gap=gap)
    scale = per_step[1] / per_step[0]  # control's seconds per step over selection's
    return Payoff(
        len(pairs),
        ratio,
        lo,
        hi,
        ratio * scale,
        lo * scale,
        hi * scale,
        outcome=test.compare(1 / scale),  # 1 per second is 1 / scale per step
        gap=None if gap is None else (gap[0] * scale, gap[1] * scale),
    )
