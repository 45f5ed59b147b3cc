"""The payoff schedule and governor: which arm each step trains on, when the probe set's loss is taken, what each
arm cost, and (``govern``) which arm training stays on between measurements (``payoff.py`` holds the estimator).

The schedule is a function of the step and the governor's state. A measurement is three segments: one on the
*governed* arm, one on the other, one on the governed arm again (``A B A``, see ``payoff.py``), with the probe loss
taken before the first step of each segment and after the last. A selection segment is ``L`` steps
(``segment_steps``); a control segment is ``k L``, where ``k`` (``scale``) is the arms' cost ratio per step,
rounded down (1 to ``MAX_SCALE``), so that both arms' segments take about the same wall-clock time: the verdict
compares progress per second, and where a selection step costs many control steps, a control segment of ``L``
steps moves the probe loss by less than SGD's noise (and by less than the shock of the switch from selection),
so no test could tell its progress from 0. ``k`` is fixed when a measurement opens, from the costs charged so
far (before a control step has run, a control step is priced at a selection step's own time, without
selection's overheads), or set by the caller (``control_scale``); ``k`` 1 is the schedule of equal steps.

The first measurement starts at ``start``; the next starts ``every`` segments after it, or 4 (back to back but for
one segment on the governed arm) while training is on selection and the measurements since the last move are
fewer than 2 (no estimate yet) or lean toward a move: they say, before their noise is weighed, that selection's
progress per second is below the control's (``payoff.lean``). At most ``burst`` measurements in a run come 4
segments after the one before. So a run where selection looks to lose is measured densely until the test can
decide (early in a run the probe loss falls fastest and the arms differ most; later a segment's loss change is
mostly the noise of SGD's iterate), and a run where it looks to pay spends little more of its time on the
control than ``every`` asks. Every other step trains on the governed arm, which is selection unless the governor has
moved training to the control. While training is on the control, measurements come half as often (``every``
doubled): a probe of selection at a low rate, which moves training back when selection pays again. The segments between
measurements are the governed arm's, so at any ``k`` each arm's share of the run's time is what it is at ``k`` 1.

States of a measurement (``Phase``) and their transitions, all at a step's start:

- ``IDLE`` -> ``OPEN`` at the measurement's first step (the first probe loss);
- ``OPEN`` -> ``OPEN`` at the second and third segments' first steps (a probe loss each);
- ``OPEN`` -> ``IDLE`` after its last step (the fourth probe loss: the pair is recorded, or dropped when the
  measurement was spoiled, and in ``govern`` mode the arm decided).

A measurement is *spoiled* (``spoil``) when a step of its selection segments did not train on a coreset (the
service was down or a round late: a uniform batch): it would compare the control with itself.

Decisions are deterministic given the seed and the measured losses and times, and they are state: a resumed run
keeps the arm and the measurements of the run it continues.
"""

from __future__ import annotations

import enum
import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any, ClassVar, Literal

from trainer_client.payoff import Arm, ArmCosts, Pair, Payoff, Segment, estimate, lean

Mode = Literal["measure", "govern"]

# The arm a decided verdict puts training on ("undetermined" keeps the arm).
_MOVE: dict[str, Arm] = {"pays": "selection", "loses": "control"}
# The largest control segment, in selection segments: beyond it one measurement outlasts most runs (at L = 20,
# 500 control steps), and a selection that costs more than this many control steps per step is plain to see.
MAX_SCALE = 25


class Phase(enum.IntEnum):
    """Where the current measurement stands (transitions: the module docstring)."""

    IDLE = 0
    OPEN = 1


@dataclass(frozen=True)
class Decision:
    """A decision of the governor at a measurement's end."""

    step: int
    arm: Arm  # the arm training stays on from this step
    verdict: str  # the payoff's verdict on the last ``window`` measurements: "pays", "loses", "undetermined"
    per_second_lo: float | None
    per_second_hi: float | None


@dataclass
class _Open:
    """The measurement in progress (it started at ``Governor.next_start``; its scale is ``Governor.scale``): the
    probe losses taken so far."""

    losses: list[float] = field(default_factory=list)
    spoiled: bool = False


class Governor:
    """A run's payoff schedule, measurements and decisions.

    Args:
        mode: "measure" (training stays on selection; the payoff is reported) or "govern" (training moves to the
            arm that pays).
        segment_steps: L, the steps of one segment (>= 1).
        every: segments from one measurement's start to the next's while training is on selection (>= 4: a
            measurement takes 3).
        window: the measurements a decision reads, of those since the governor last moved training: the last
            ``window`` (>= 2), or 0 for all of them.
        start: the step of the first measurement.
        burst: the most measurements in a run that start 4 segments after the one before, taken until there are 2
            and while the measurements lean toward a move (>= 0; the module docstring).
        control_scale: a control segment's steps per selection segment step (1 to ``MAX_SCALE``), or 0 for the
            arms' cost ratio at each measurement's opening (the module docstring).
    """

    VERSION: ClassVar[int] = 4

    def __init__(
        self,
        mode: Mode,
        segment_steps: int,
        every: int,
        window: int,
        start: int,
        burst: int = 0,
        control_scale: int = 1,
    ) -> None:
        if mode not in ("measure", "govern"):
            raise ValueError(f"payoff mode must be 'measure' or 'govern', received {mode!r}")
        if not schedule_valid(segment_steps, every, window, burst, control_scale) or start < 0:
            raise ValueError(
                "payoff schedule needs segment_steps >= 1, every >= 4 segments, window 0 or >= 2 measurements, "
                f"start >= 0, burst >= 0 and control_scale 0 to {MAX_SCALE}; received {segment_steps}, {every}, "
                f"{window}, {start}, {burst}, {control_scale}"
            )
        self.mode, self.segment_steps, self.every, self.window = mode, segment_steps, every, window
        self.burst, self.control_scale = burst, control_scale
        # The control segments' scale of the open measurement, or of the last one opened (the forecast's).
        self.scale = max(1, control_scale)
        self.scales: list[int] = []  # each recorded pair's scale
        self.arm: Arm = "selection"  # the governed arm
        self.moved_at = 0  # measurements recorded when the governor last moved training (decisions read the rest)
        self.next_start = start  # the first step of the open measurement, or of the next one
        self.dense = 0  # measurements that started 4 segments after the one before (at most ``burst``)
        self.open: _Open | None = None
        self.pairs: list[Pair] = []
        self.spoiled = 0  # measurements dropped (a selection segment trained on uniform batches)
        self.costs = ArmCosts()
        self.decisions: list[Decision] = []

    @property
    def phase(self) -> Phase:
        return Phase.IDLE if self.open is None else Phase.OPEN

    # -- the schedule ------------------------------------------------------------------------------------------

    @property
    def taken(self) -> int:
        """Measurements finished: recorded or spoiled."""
        return len(self.pairs) + self.spoiled

    def length(self, arm: Arm, scale: int) -> int:
        """Steps of one segment of ``arm`` in a measurement of control scale ``scale``."""
        return self.segment_steps * (scale if arm == "control" else 1)

    def bounds(self, scale: int, arm: Arm | None = None) -> tuple[int, int, int, int]:
        """A measurement's four probe steps, relative to its first step (the last is its length), with ``arm``
        (the governed arm when None) on its outer segments."""
        arm = self.arm if arm is None else arm
        outer, middle = self.length(arm, scale), self.length(_other(arm), scale)
        return 0, outer, outer + middle, 2 * outer + middle

    def period_of(self, arm: Arm, scale: int, dense: bool) -> int:
        """Steps from the start of a measurement governed on ``arm`` (of control scale ``scale``) to the next one's
        start, while the governed arm stays what it is: the measurement, then governed segments up to 4 (``dense``,
        on selection), ``every`` or (on the control) ``2 every`` segments in all."""
        segments = 2 * self.every if arm == "control" else (4 if dense else self.every)
        return self.bounds(scale, arm)[3] + (segments - 3) * self.length(arm, scale)

    def dense_next(self) -> bool:
        """Whether the next measurement starts 4 segments after the last one's, as the measurements stand: training
        is on selection, fewer than ``burst`` measurements came so, and the measurements since the last move are
        fewer than 2 (no estimate yet) or look (before their noise is weighed) to say that selection's progress
        per second is below the control's."""
        since, leaning = self._since()
        return self._dense(since, self.dense, leaning)

    def _since(self) -> tuple[int, bool]:
        """(the measurements since the last move, whether they lean toward a move: none yet, or the lean below 0)."""
        since = self.pairs[self.moved_at :]
        return len(since), not since or lean(since, self.costs) < 0

    def _dense(self, since: int, dense: int, leaning: bool) -> bool:
        """``dense_next`` with ``since`` measurements since the last move, ``dense`` taken 4 segments apart, and
        the lean."""
        return self.arm == "selection" and dense < self.burst and (since < 2 or leaning)

    @property
    def period(self) -> int:
        """Steps from the open (or next) measurement's start to the one after, as the measurements stand (the
        forecast: ``arm_at``)."""
        since, leaning = self._since()
        return self.period_of(self.arm, self.scale, self._dense(since + 1, self.dense, leaning))

    def arm_at(self, step: int) -> Arm:
        """The arm step ``step`` (not before the next probe) trains on, as far as the state knows: a decision at a
        measurement's end may change the steps after it, and a later measurement's start and scale are fixed when
        the one before it ends and when it opens (the forecast takes each measurement as recorded, the lean and the
        scale as they stand), so the forecast of a later step can miss."""
        count, leaning = self._since()
        start, dense = self.next_start, self.dense
        _, outer, inner, end = self.bounds(self.scale)
        while step >= start + end:  # a later measurement's
            count += 1
            gap_dense = self._dense(count, dense, leaning)
            dense += gap_dense
            start += self.period_of(self.arm, self.scale, gap_dense)
        return _other(self.arm) if outer <= step - start < inner else self.arm

    def probe_due(self, step: int) -> bool:
        """Whether the probe loss is taken at the start of step ``step``: the open measurement's next boundary, or
        the next measurement's first step."""
        taken = 0 if self.open is None else len(self.open.losses)
        return step == self.next_start + self.bounds(self.scale)[taken]

    def scale_now(self) -> int:
        """The control scale a measurement opening now takes: ``control_scale`` when set; otherwise the arms' cost
        ratio per step, rounded down (a control segment takes no longer than a selection segment), the control
        priced at a selection step's own time until one of its steps ran."""
        if self.control_scale:
            return self.control_scale
        c = self.costs
        per_step = c.per_step()
        if per_step is not None:
            ratio = per_step[0] / per_step[1] if per_step[1] > 0 else math.inf
        elif c.selection_steps and c.selection_s > 0:
            ratio = (c.selection_s + c.overhead_s) / c.selection_s
        else:
            ratio = 1.0
        # (1e-9: a ratio of whole seconds, 0.03 / 0.01, is 2.9999999999999996 in floating point)
        return max(1, min(MAX_SCALE, int(ratio + 1e-9))) if math.isfinite(ratio) else MAX_SCALE

    # -- what the loader reports -------------------------------------------------------------------------------

    def probe(self, step: int, loss: float) -> Decision | None:
        """The probe set's mean loss at the start of step ``step`` (``probe_due``); at a measurement's last
        boundary the pair is recorded and, in ``govern`` mode, the arm decided (returned)."""
        if not self.probe_due(step):
            raise ValueError(f"no probe loss is due at step {step} (the measurement's next boundary: {self._due()})")
        if not math.isfinite(loss):
            raise ValueError(f"probe loss must be finite, received {loss} at step {step}")
        if self.open is None:
            self.scale = self.scale_now()
            self.open = _Open()
        m = self.open
        m.losses.append(loss)
        if len(m.losses) < 4:
            return None
        self.open = None
        if m.spoiled:
            self.spoiled += 1
        else:
            arms = (self.arm, _other(self.arm), self.arm)
            segs = [Segment(a, self.length(a, self.scale), m.losses[k], m.losses[k + 1]) for k, a in enumerate(arms)]
            self.pairs.append(Pair.of(*segs))
            self.scales.append(self.scale)
        # The next start reads this measurement's lean, with the arm it was measured on (a decision below moves
        # the steps after it, not the next measurement's start).
        dense = self.dense_next()
        self.next_start += self.period_of(self.arm, self.scale, dense)
        self.dense += dense
        return self._decide(step) if self.mode == "govern" and not m.spoiled else None

    def _due(self) -> int:
        return self.next_start + self.bounds(self.scale)[0 if self.open is None else len(self.open.losses)]

    def spoil(self) -> None:
        """The step just taken was a uniform batch inside a selection segment of the open measurement."""
        if self.open is not None:
            self.open.spoiled = True

    def charge(self, arm: Arm, step_s: float, overhead_s: float = 0.0) -> None:
        """One step's own time on ``arm`` and selection's overheads in it (passes, waits: charged to selection
        wherever they fell), seconds."""
        c = self.costs
        if arm == "selection":
            c = replace(c, selection_steps=c.selection_steps + 1, selection_s=c.selection_s + step_s)
        else:
            c = replace(c, control_steps=c.control_steps + 1, control_s=c.control_s + step_s)
        self.costs = replace(c, overhead_s=c.overhead_s + overhead_s)

    def payoff(self) -> Payoff | None:
        """The run's payoff over all its measurements (None before 2)."""
        return estimate(self.pairs, self.costs)

    def _decide(self, step: int) -> Decision:
        since = self.pairs[self.moved_at :]
        recent = estimate(since[-self.window :] if self.window else since, self.costs)
        verdict = "undetermined" if recent is None else recent.verdict()
        arm = _MOVE.get(verdict, self.arm)
        if arm != self.arm:
            self.arm, self.moved_at = arm, len(self.pairs)
        lo = None if recent is None else recent.per_second_lo
        hi = None if recent is None else recent.per_second_hi
        decision = Decision(step, self.arm, verdict, lo, hi)
        self.decisions.append(decision)
        return decision

    # -- state -------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Plain values: the schedule's settings (checked on load), the arm, the measurements and the decisions."""
        return {
            "version": self.VERSION,
            "settings": self._settings(),
            "arm": self.arm,
            "scale": self.scale,
            "scales": list(self.scales),
            "moved_at": self.moved_at,
            "next_start": self.next_start,
            "dense": self.dense,
            "open": None if self.open is None else asdict(self.open),
            "pairs": [[p.selection, p.control] for p in self.pairs],
            "spoiled": self.spoiled,
            "costs": asdict(self.costs),
            "decisions": [asdict(d) for d in self.decisions],
        }

    def _settings(self) -> list[Any]:
        return [self.mode, self.segment_steps, self.every, self.window, self.burst, self.control_scale]

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue ``state_dict()``'s run; refuses another version or other settings. Older states continue as
        their schedule ran (``_upgrade``)."""
        state = _upgrade(state)
        mine = self._settings()
        if state.get("version") != self.VERSION or list(state.get("settings", [])) != mine:
            raise ValueError(
                f"payoff state has version {state.get('version')!r} and settings {state.get('settings')!r} "
                f"(mode, segment_steps, every, window, burst, control_scale); this loader's are {self.VERSION} and "
                f"{mine}"
            )
        self.arm, self.next_start, self.moved_at = state["arm"], int(state["next_start"]), int(state["moved_at"])
        self.dense = int(state["dense"])
        self.scale, self.scales = int(state["scale"]), [int(k) for k in state["scales"]]
        self.open = None if state["open"] is None else _Open(**state["open"])
        self.pairs = [Pair(float(x), float(y)) for x, y in state["pairs"]]
        self.spoiled = int(state["spoiled"])
        self.costs = ArmCosts(**state["costs"])
        self.decisions = [Decision(**d) for d in state["decisions"]]


def schedule_valid(segment_steps: int, every: int, window: int, burst: int, control_scale: int) -> bool:
    """The payoff schedule's one rule (``LoaderConfig`` checks its fields by it, ``Governor`` its arguments):
    segments of >= 1 step, >= 4 segments between measurements (one takes 3), a window of 0 (every measurement
    since the last move) or >= 2, a burst >= 0, and a control scale of 0 (the cost ratio) to ``MAX_SCALE``."""
    return (
        segment_steps >= 1 and every >= 4 and (window == 0 or window >= 2) and burst >= 0
    ) and 0 <= control_scale <= MAX_SCALE


def _upgrade(state: dict[str, Any]) -> dict[str, Any]:
    """An older state as this version reads it.

    - Version 2 to 3: control scale 1 throughout (the only schedule version 2 had).
    - Version 3 to 4: version 3's first ``burst`` measurements came every 4 segments whatever they said, that is
      ``burst - 1`` of them 4 segments after the one before: its ``burst`` is that many of version 4's, all taken
      once ``burst`` measurements were. (Its next measurement's start is in the state already.)
    """
    if state.get("version") == 2:
        state = {
            **state,
            "version": 3,
            "settings": [*state.get("settings", []), 1],
            "scale": 1,
            "scales": [1] * len(state.get("pairs", [])),
        }
    if state.get("version") != 3:
        return state
    settings = list(state.get("settings", []))
    if len(settings) != 6:
        return state  # refused by the settings check
    burst = max(0, int(settings[4]) - 1)
    taken = len(state.get("pairs", [])) + int(state.get("spoiled", 0))
    return {**state, "version": 4, "settings": [*settings[:4], burst, settings[5]], "dense": min(taken, burst)}


def _other(arm: Arm) -> Arm:
    return "control" if arm == "selection" else "selection"
