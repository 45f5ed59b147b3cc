"""The payoff schedule and governor (trainer_client/governor.py) on synthetic runs: the A B A schedule and its
probes, the governor moving training to the control when selection loses and back when it pays, spoiled
measurements dropped, decisions repeated by a resumed governor, and bad input refused with no state change."""

from __future__ import annotations

import math

import numpy as np
import pytest

from trainer_client.governor import Governor, Phase


def _run(
    gov: Governor,
    steps: range,
    speed: dict[str, object],
    rng: np.random.Generator,
    loss: float = 2.3,
    taken: list[str] | None = None,
    overhead_s: float = 0.002,
) -> float:
    """Drive ``gov`` over ``steps``: each step lowers the probe loss by ``speed[arm](step)`` plus noise and costs
    10 ms (selection ``overhead_s`` more); returns the loss at the end; ``taken`` gets each step's arm."""
    for step in steps:
        if gov.probe_due(step):
            gov.probe(step, loss)
        arm = gov.arm_at(step)
        if taken is not None:
            taken.append(arm)
        loss -= speed[arm](step) + rng.normal(0, 0.002)  # type: ignore[operator]
        gov.charge(arm, 0.010, overhead_s if arm == "selection" else 0.0)
    return loss


def test_the_schedule_is_one_arm_the_other_the_first_with_a_probe_at_each_boundary() -> None:
    gov = Governor("measure", segment_steps=5, every=4, window=4, start=10)
    arms, probes = [], []
    for step in range(50):
        if gov.probe_due(step):
            probes.append(step)
            gov.probe(step, 2.0 - step / 100)
            assert gov.phase == (Phase.IDLE if step in (25, 45) else Phase.OPEN)
        arms.append(gov.arm_at(step)[0])
    assert "".join(arms) == "s" * 15 + "c" * 5 + "s" * 15 + "c" * 5 + "s" * 10
    assert probes == [10, 15, 20, 25, 30, 35, 40, 45]
    assert len(gov.pairs) == 2 and gov.decisions == []  # measuring never moves training
    assert gov.pairs[0].selection == pytest.approx(0.01) and gov.pairs[0].control == pytest.approx(0.01)


def _arms_and_probes(
    gov: Governor, steps: range, speed: dict[str, float], loss: float = 2.0
) -> tuple[str, list[int], float]:
    """Drive ``gov`` over ``steps`` with no noise: each step lowers the probe loss by ``speed[arm]``; (each step's
    arm's initial, the probe steps, the loss at the end)."""
    arms, probes = [], []
    for step in steps:
        if gov.probe_due(step):
            probes.append(step)
            gov.probe(step, loss)
        arm = gov.arm_at(step)
        arms.append(arm[0])
        loss -= speed[arm]
    return "".join(arms), probes, loss


@pytest.mark.parametrize(
    ("speed", "gaps"),
    [
        # Selection looks slower: the next 2 (burst) measurements come 4 segments after the one before.
        ({"selection": 0.001, "control": 0.002}, [20, 20, 30, 30]),
        # Selection looks faster: the second (for an estimate) 4 segments after the first, then every 6.
        ({"selection": 0.002, "control": 0.001}, [20, 30, 30, 30]),
    ],
)
def test_measurements_come_every_4_segments_while_they_lean_toward_a_move_and_the_forecast_knows_it(
    speed: dict[str, float], gaps: list[int]
) -> None:
    """burst=2, every=6: the second measurement starts 4 segments after the first; after it, while the measurements
    say (before their noise is weighed) that selection is the slower arm, measurements start 4 segments after the
    one before, up to 2 in all; otherwise every 6 segments. The forecast made once the first measurement is in
    holds for every later step, and the probes fall on the boundaries."""
    gov = Governor("measure", segment_steps=5, every=6, window=0, start=5, burst=2)
    head, probes, loss = _arms_and_probes(gov, range(21), speed)  # the first measurement: probes at 5-20
    forecast = "".join(gov.arm_at(step)[0] for step in range(21, 131))
    tail, later, _ = _arms_and_probes(gov, range(21, 131), speed, loss)
    assert tail == forecast
    starts = [5]
    for gap in gaps:
        starts.append(starts[-1] + gap)
    assert probes + later == [s + k for s in starts for k in (0, 5, 10, 15)]
    expected = ["s"] * 131
    for s in starts:
        expected[s + 5 : s + 10] = ["c"] * 5
    assert head + tail == "".join(expected)
    assert gov.dense == gaps.count(20)


def test_a_decision_reads_the_measurements_since_the_last_move() -> None:
    """window=0: every measurement since the governor last moved training; the evidence that moved it to the control
    does not hold it there once the control's own measurements say selection pays."""
    rng = np.random.default_rng(1)
    gov = Governor("govern", segment_steps=10, every=4, window=0, start=0)
    _run(gov, range(600), {"selection": lambda s: 0.0005, "control": lambda s: 0.001}, rng)
    moved = next(i for i, d in enumerate(gov.decisions) if d.arm == "control")
    assert gov.moved_at == moved + 1  # the measurements recorded when it moved
    _run(gov, range(600, 2400), {"selection": lambda s: 0.003, "control": lambda s: 0.001}, rng)
    back = next(d for d in gov.decisions[moved + 1 :] if d.arm == "selection")
    assert back.verdict == "pays" and gov.arm == "selection"
    # Back on selection, the decision after the move reads only the measurements taken since it: not 2 yet.
    after = gov.decisions[gov.decisions.index(back) + 1]
    assert after.verdict == "undetermined" and after.per_second_lo is None


def test_the_forecast_of_a_later_measurements_arms_follows_the_period() -> None:
    gov = Governor("measure", segment_steps=5, every=4, window=4, start=10)
    assert [gov.arm_at(s) for s in (14, 15, 19, 20, 35, 36, 55)] == [
        "selection",
        "control",
        "control",
        "selection",
        "control",
        "control",
        "control",
    ]


def test_governing_moves_training_to_the_control_when_selection_loses_and_back_when_it_pays() -> None:
    rng = np.random.default_rng(0)
    gov = Governor("govern", segment_steps=10, every=4, window=3, start=0)
    # Selection makes half the control's progress per step for 1,200 steps.
    taken: list[str] = []
    _run(gov, range(1200), {"selection": lambda s: 0.0005, "control": lambda s: 0.001}, rng, taken=taken)
    assert gov.arm == "control", gov.decisions
    first = next(d for d in gov.decisions if d.arm == "control")
    assert first.verdict == "loses" and first.per_second_hi is not None and first.per_second_hi < 1
    assert first.step <= 8 * 40  # within 8 measurements of 40 steps each
    assert taken[first.step :].count("control") > 0.6 * (1200 - first.step)
    # Then selection makes twice the control's progress: training moves back, on probes at half the rate.
    _run(gov, range(1200, 3200), {"selection": lambda s: 0.002, "control": lambda s: 0.001}, rng)
    back = [d for d in gov.decisions if d.step >= 1200 and d.arm == "selection"]
    assert gov.arm == "selection" and back and back[0].verdict == "pays"
    assert gov.payoff() is not None and gov.spoiled == 0


def test_control_segments_take_the_time_of_a_selection_segment_at_the_arms_cost_ratio() -> None:
    """control_scale 0: a selection step costs 3 control steps (30 ms against 10), so each measurement's control
    segment is 3 segments long; the first, opened before a control step ran, prices the control at a selection
    step's own time. The probes fall on the boundaries, and the forecast made at step 0 holds."""
    gov = Governor("measure", segment_steps=5, every=5, window=0, start=5, control_scale=0)
    forecast_after_open: list[str] = []
    arms, probes = [], []
    for step in range(110):
        if gov.probe_due(step):
            probes.append(step)
            gov.probe(step, 2.0 - step / 100)
            if step == 5:
                forecast_after_open = [gov.arm_at(u)[0] for u in range(5, 110)]
        arm = gov.arm_at(step)
        arms.append(arm[0])
        gov.charge(arm, 0.010, 0.020 if arm == "selection" else 0.0)
    measurement = "s" * 5 + "c" * 15 + "s" * 5
    assert "".join(arms) == "s" * 5 + (measurement + "s" * 10) * 3
    assert "".join(forecast_after_open) == "".join(arms[5:])
    assert probes == [5, 10, 25, 30, 40, 45, 60, 65, 75, 80, 95, 100]
    assert gov.scales == [3, 3, 3] and gov.scale == 3
    # The rates are per step, each segment's loss change over its own steps.
    assert gov.pairs[0].selection == pytest.approx(0.01) and gov.pairs[0].control == pytest.approx(0.01)


def test_equal_time_segments_see_a_costly_selection_lose_sooner_than_equal_steps() -> None:
    """A selection step costs 10 control steps and is worth 4: per second it makes 0.4x the control's progress.
    Over 10 noise seeds, control segments of equal time (scale 0 -> 10) move training to the control every time
    and in fewer measurements than segments of equal steps, whose 20-step change is mostly SGD's noise."""
    speed = {"selection": lambda s: 0.002, "control": lambda s: 0.0005}
    taken: dict[int, list[int]] = {1: [], 0: []}
    for seed in range(10):
        for scale in (1, 0):
            gov = Governor("govern", segment_steps=20, every=4, window=0, start=20, control_scale=scale)
            rng, step, loss = np.random.default_rng(seed), 0, 2.3
            while len(gov.pairs) < 12 and gov.arm == "selection":
                loss = _run(gov, range(step, step + 20), speed, rng, loss, overhead_s=0.090)
                step += 20
            assert all(d.verdict != "pays" for d in gov.decisions)
            taken[scale].append(len(gov.pairs) if gov.arm == "control" else 13)
    assert max(taken[0]) <= 6 and sum(taken[0]) < sum(taken[1]) and max(taken[1]) == 13, taken


def test_a_version_2_state_continues_at_scale_1() -> None:
    gov = Governor("govern", segment_steps=10, every=4, window=3, start=0)
    _run(gov, range(95), {"selection": lambda s: 0.0005, "control": lambda s: 0.001}, np.random.default_rng(0))
    state = gov.state_dict()
    old = {k: v for k, v in state.items() if k not in ("scale", "scales", "dense")}
    old |= {"version": 2, "settings": state["settings"][:5]}
    resumed = Governor("govern", segment_steps=10, every=4, window=3, start=0)
    resumed.load_state_dict(old)
    assert resumed.state_dict() == state


def test_a_version_3_state_continues_with_its_burst_spent_as_it_ran() -> None:
    """Version 3 took its first ``burst`` measurements every 4 segments whatever they said: ``burst - 1`` of them 4
    segments after the one before, version 4's ``burst``."""
    gov = Governor("govern", segment_steps=10, every=6, window=3, start=0, burst=2)
    _run(gov, range(130), {"selection": lambda s: 0.0005, "control": lambda s: 0.005}, np.random.default_rng(0))
    state = gov.state_dict()
    assert gov.taken == 3 and state["dense"] == 2
    old = {k: v for k, v in state.items() if k != "dense"}
    old |= {"version": 3, "settings": [*state["settings"][:4], 3, state["settings"][5]]}
    resumed = Governor("govern", segment_steps=10, every=6, window=3, start=0, burst=2)
    resumed.load_state_dict(old)
    assert resumed.state_dict() == state


def test_a_measurement_with_uniform_batches_in_its_selection_segments_is_dropped() -> None:
    gov = Governor("measure", segment_steps=2, every=4, window=2, start=0)
    for step in range(8):
        if gov.probe_due(step):
            gov.probe(step, 1.0 - step / 10)
        if step == 1:
            gov.spoil()
    gov.probe(8, 0.2)  # the first boundary of the second measurement
    assert gov.spoiled == 1 and gov.pairs == []


def test_a_resumed_governor_repeats_the_decisions_of_an_uninterrupted_one() -> None:
    speed = {"selection": lambda s: 0.0005, "control": lambda s: 0.001}
    whole = Governor("govern", segment_steps=10, every=4, window=3, start=0)
    _run(whole, range(800), speed, np.random.default_rng(3))
    first = Governor("govern", segment_steps=10, every=4, window=3, start=0)
    rng = np.random.default_rng(3)
    loss = _run(first, range(415), speed, rng)  # stops inside a measurement
    assert first.phase == Phase.OPEN
    resumed = Governor("govern", segment_steps=10, every=4, window=3, start=0)
    resumed.load_state_dict(first.state_dict())
    _run(resumed, range(415, 800), speed, rng, loss)
    assert resumed.decisions == whole.decisions and resumed.pairs == whole.pairs
    assert resumed.costs.control_steps == whole.costs.control_steps
    assert resumed.costs.selection_s == pytest.approx(whole.costs.selection_s)


def test_bad_settings_probes_and_states_are_refused() -> None:
    with pytest.raises(ValueError, match="must be 'measure' or 'govern', received 'always'"):
        Governor("always", 10, 4, 3, 0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"every >= 4 segments.*received 10, 3, 3, 0"):
        Governor("measure", 10, 3, 3, 0)
    gov = Governor("measure", segment_steps=10, every=4, window=3, start=20)
    before = gov.state_dict()
    with pytest.raises(ValueError, match=r"no probe loss is due at step 25 \(the measurement's next boundary: 20\)"):
        gov.probe(25, 1.0)
    with pytest.raises(ValueError, match="probe loss must be finite, received nan at step 20"):
        gov.probe(20, math.nan)
    assert gov.state_dict() == before
    other = Governor("govern", segment_steps=10, every=4, window=3, start=20)
    refused = r"settings \['measure', 10, 4, 3, 0, 1\].*this loader's are 4 and \['govern'"
    with pytest.raises(ValueError, match=refused):
        other.load_state_dict(before)
    with pytest.raises(ValueError, match=r"control_scale 0 to 25; received 10, 4, 3, 20, 0, 26"):
        Governor("measure", 10, 4, 3, 20, control_scale=26)
