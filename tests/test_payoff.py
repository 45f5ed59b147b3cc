"""The payoff estimator (trainer_client/payoff.py) on synthetic arms of known speed: it finds the faster arm, its
90% interval covers the true speedup at about the stated rate, drift in the rate cancels out of an A B A
measurement, and bad measurements are refused."""

from __future__ import annotations

import math

import numpy as np
import pytest

from trainer_client.payoff import LEVEL, ArmCosts, Pair, Segment, estimate, lean, ratio_gap, ratio_interval, t95

STEPS = 20


def _measurements(
    rng: np.random.Generator, speedup: float, n: int, noise: float, outer: str = "selection"
) -> list[Pair]:
    """``n`` A B A measurements of a run whose control reduces the probe loss by ``r(t)`` per step, ``r`` decaying
    as training goes on (drift), and whose selection arm does ``speedup`` times that; each segment's loss change
    carries Gaussian noise of sd ``noise`` (nats)."""
    pairs, loss, t = [], 2.3, 0
    for _ in range(n):
        t += 5 * STEPS  # the steps between two measurements
        segs = []
        for arm in (outer, "control" if outer == "selection" else "selection", outer):
            rate = 0.01 * math.exp(-t / 2000) * (speedup if arm == "selection" else 1.0)
            after = loss - rate * STEPS + rng.normal(0, noise)
            segs.append(Segment(arm, STEPS, loss, after))  # type: ignore[arg-type]
            loss, t = after, t + STEPS
        pairs.append(Pair.of(*segs))
    return pairs


@pytest.mark.parametrize("speedup", [0.6, 1.0, 1.5])
@pytest.mark.parametrize("outer", ["selection", "control"])
def test_the_interval_covers_the_true_speedup_at_the_stated_rate(speedup: float, outer: str) -> None:
    rng = np.random.default_rng(0)
    covered, runs = 0, 1000
    for _ in range(runs):
        _, lo, hi = ratio_interval(_measurements(rng, speedup, 8, noise=0.02, outer=outer))
        covered += lo <= speedup <= hi
    # 1000 runs: the binomial sd of the coverage at 0.9 is 0.0095.
    assert abs(covered / runs - LEVEL) < 0.035, covered / runs


def test_it_finds_the_faster_arm() -> None:
    rng = np.random.default_rng(1)
    wins = [ratio_interval(_measurements(rng, 1.5, 8, noise=0.01))[1] > 1 for _ in range(200)]
    losses = [ratio_interval(_measurements(rng, 0.6, 8, noise=0.01))[2] < 1 for _ in range(200)]
    assert np.mean(wins) > 0.95 and np.mean(losses) > 0.95
    # Equal arms: the interval excludes 1 in about 10% of runs, no more.
    equal = [
        not (lo <= 1 <= hi) for _, lo, hi in (ratio_interval(_measurements(rng, 1.0, 8, 0.01)) for _ in range(500))
    ]
    assert np.mean(equal) < 0.15


def test_a_linear_drift_cancels_out_of_a_measurement() -> None:
    """No noise, a rate falling linearly over the measurement: the pair's ratio is exact."""
    segs = [
        Segment(arm, 10, loss, loss - 10 * rate)
        for arm, loss, rate in (
            ("selection", 2.0, 1.5 * 0.030),
            ("control", 1.5, 0.025),
            ("selection", 1.0, 1.5 * 0.020),
        )
    ]  # type: ignore[arg-type]
    pair = Pair.of(*segs)
    assert pair.selection == pytest.approx(1.5 * 0.025) and pair.control == pytest.approx(0.025)


def test_no_progress_in_either_arm_leaves_the_payoff_undetermined() -> None:
    rng = np.random.default_rng(2)
    pairs = [Pair(rng.normal(0, 0.003), rng.normal(0, 0.003)) for _ in range(6)]
    assert ratio_interval(pairs)[1:] == (-math.inf, math.inf)
    payoff = estimate(pairs, ArmCosts())
    assert payoff is not None and payoff.undetermined and payoff.verdict() == "undetermined"
    assert payoff.describe().startswith("selection's payoff unclear: ")
    # Where the data keep every ratio (no gap either), no "[-inf, inf]" for a user to read as numbers: the line says
    # that no ratio is ruled out, and why.
    rng = np.random.default_rng(1)
    pairs = [Pair(rng.normal(0, 0.003), rng.normal(0, 0.003)) for _ in range(6)]
    payoff = estimate(pairs, ArmCosts())
    assert payoff is not None and payoff.gap is None and payoff.undetermined
    assert payoff.describe() == (
        "selection's payoff unclear: no ratio ruled out at 90% (6 measurements; the arms' progress on the probe set "
        f"is within its noise; point estimate {payoff.per_step:.2f}x per step)"
    )


def test_selection_progressing_where_the_control_does_not_pays_with_an_unbounded_interval() -> None:
    """The control's rate cannot be told from 0, so the ratio's set is two rays; it leaves 1 out, and the
    verdict reads the progress: selection's is above the control's."""
    rng = np.random.default_rng(2)
    pairs = [Pair(0.01 + rng.normal(0, 0.001), rng.normal(0, 0.003)) for _ in range(6)]
    assert ratio_interval(pairs)[1:] == (-math.inf, math.inf)
    gap = ratio_gap(pairs)
    assert gap is not None and gap[0] < 1 < gap[1]
    payoff = estimate(pairs, ArmCosts())
    assert payoff is not None and payoff.undetermined and payoff.verdict() == "pays"
    assert f"[-inf, {gap[0]:.2f}] or [{gap[1]:.2f}, inf] per step" in payoff.describe()


def test_selection_raising_the_loss_loses_where_the_control_is_noise() -> None:
    """Late on noisy labels: selection's coresets raise the probe loss while the control's segments are SGD's
    noise. The ratio's interval is unbounded, but 1 per second is outside its set and selection's progress is
    below the control's: it loses."""
    rng = np.random.default_rng(3)
    pairs = [Pair(-0.004 + rng.normal(0, 0.001), rng.normal(0, 0.001)) for _ in range(8)]
    costs = ArmCosts(selection_steps=60, selection_s=0.72, control_steps=60, control_s=0.6)
    payoff = estimate(pairs, costs)
    assert payoff is not None and payoff.undetermined and payoff.verdict() == "loses"
    assert payoff.gap is not None and payoff.gap[0] < 1 < payoff.gap[1]
    assert payoff.describe().startswith("selection lost: ")


def test_a_control_that_worsens_the_probe_loss_does_not_make_selection_lose() -> None:
    """A negative ratio from a control that raises the loss while selection lowers it: selection pays."""
    pairs = [Pair(0.010 + d, -0.010 + d) for d in (-0.001, 0.0, 0.001, 0.0005)]
    payoff = estimate(pairs, ArmCosts())
    assert payoff is not None and payoff.per_step < 0 and payoff.verdict() == "pays"


def test_costs_turn_the_per_step_speedup_into_a_per_second_one() -> None:
    pairs = [Pair(0.03 + d, 0.02 + d / 2) for d in (-0.002, 0.0, 0.001, 0.002, -0.001)]
    # Selection: 100 steps at 10 ms plus 0.2 s of embedding passes (12 ms a step); control: 50 steps at 10 ms.
    costs = ArmCosts(selection_steps=100, selection_s=1.0, overhead_s=0.2, control_steps=50, control_s=0.5)
    payoff = estimate(pairs, costs)
    assert payoff is not None and payoff.per_second is not None
    assert payoff.per_second == pytest.approx(payoff.per_step * 10 / 12)
    assert payoff.per_second_lo == pytest.approx(payoff.per_step_lo * 10 / 12)
    assert payoff.per_step_lo < payoff.per_step < payoff.per_step_hi
    assert payoff.describe().startswith(f"selection paid: {payoff.per_second:.2f}x [")
    assert "per second (5 measurements, 90% interval)" in payoff.describe()
    assert estimate(pairs[:1], costs) is None  # one measurement gives no interval
    assert estimate(pairs, ArmCosts()).per_second is None  # type: ignore[union-attr]


def test_the_lean_reads_progress_per_second_at_the_arms_cost_ratio() -> None:
    """The lean is the mean of x - r y, r selection's cost per step over the control's (1 before both ran): a
    selection twice as fast per step leans to pays at equal costs and to loses at 3 times the cost."""
    pairs = [Pair(0.002, 0.001), Pair(0.004, 0.002)]
    assert lean(pairs, ArmCosts()) == pytest.approx(0.0015)
    equal = ArmCosts(selection_steps=10, selection_s=0.1, control_steps=10, control_s=0.1)
    assert lean(pairs, equal) == pytest.approx(0.0015)
    dearer = ArmCosts(selection_steps=10, selection_s=0.2, overhead_s=0.1, control_steps=10, control_s=0.1)
    assert lean(pairs, dearer) == pytest.approx(0.003 - 3 * 0.0015)
    with pytest.raises(ValueError, match="at least 1 measurement, received 0"):
        lean([], equal)


def test_bad_measurements_are_refused() -> None:
    seg = Segment("selection", STEPS, 1.0, 0.9)
    with pytest.raises(ValueError, match="one arm, the other, the first again; received selection, selection, control"):
        Pair.of(seg, seg, Segment("control", STEPS, 0.9, 0.8))
    with pytest.raises(ValueError, match="at least 2 measurements, received 1"):
        ratio_interval([Pair(0.1, 0.1)])
    with pytest.raises(ValueError, match=r"finite, received \[\(0.1, 0.1\), \(nan, 0.1\)\]"):
        ratio_interval([Pair(0.1, 0.1), Pair(math.nan, 0.1)])
    with pytest.raises(ValueError, match="must be >= 1, received 0"):
        t95(0)


@pytest.mark.parametrize("df", [1, 2, 5, 9, 30, 35, 60, 119, 500])
def test_the_t_quantile_against_the_integrated_density(df: int) -> None:
    """Oracle: Student's t density integrated numerically from 0 to t95(df) holds 0.45 of the mass (no less: the
    table rounds towards wider intervals between its rows)."""
    q = t95(df)
    x = np.linspace(0.0, q, 200_001)
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    pdf = np.exp(log_norm - (df + 1) / 2 * np.log1p(x * x / df))
    mass = float(np.sum((pdf[1:] + pdf[:-1]) / 2 * np.diff(x)))
    assert 0.45 - 5e-5 <= mass <= 0.452, mass
