"""The payoff schedule and governor: which arm each step trains on, when the probe set's loss is taken, what each
arm cost, and (``govern``) which arm training stays on between measurements (``payoff.py`` holds the estimator).

The schedule is a function of the step and the governor's state. A measurement takes ``3 L`` steps (``L``:
``segment_steps``): ``L`` steps on the *governed* arm, ``L`` on the other, ``L`` on the governed arm again
(``A B A``, see ``payoff.py``), with the probe loss taken before the first step of each segment and after the last.
The first measurement starts at ``start``; the first ``burst`` measurements come every 4 segments, back to back
but for one segment on the governed arm, because the probe loss falls fastest early in a run and the arms differ
most there (later, a segment's loss change is mostly the noise of SGD's iterate); the next every ``every``
segments. Every other step trains on the governed arm, which is selection unless the governor has moved training
to the control. While training is on the control, measurements come half as often (``every`` doubled): a probe
of selection at a low rate, which moves training back when selection pays again.

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

from trainer_client.payoff import Arm, ArmCosts, Pair, Payoff, Segment, estimate

Mode = Literal["measure", "govern"]

# The arm a decided verdict puts training on ("undetermined" keeps the arm).
_MOVE: dict[str, Arm] = {"pays": "selection", "loses": "control"}


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
    """The measurement in progress (it started at ``Governor.next_start``): the probe losses taken so far."""

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
        burst: the first measurements, taken every 4 segments (>= 0).
    """

    VERSION: ClassVar[int] = 2

    def __init__(self, mode: Mode, segment_steps: int, every: int, window: int, start: int, burst: int = 0) -> None:
        if mode not in ("measure", "govern"):
            raise ValueError(f"payoff mode must be 'measure' or 'govern', received {mode!r}")
        if not schedule_valid(segment_steps, every, window, burst) or start < 0:
            raise ValueError(
                "payoff schedule needs segment_steps >= 1, every >= 4 segments, window 0 or >= 2 measurements, "
                f"start >= 0 and burst >= 0; received {segment_steps}, {every}, {window}, {start}, {burst}"
            )
        self.mode, self.segment_steps, self.every, self.window = mode, segment_steps, every, window
        self.burst = burst
        self.arm: Arm = "selection"  # the governed arm
        self.moved_at = 0  # measurements recorded when the governor last moved training (decisions read the rest)
        self.next_start = start  # the first step of the open measurement, or of the next one
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

    def period_after(self, taken: int) -> int:
        """Steps from the start of the measurement that finishes as the ``taken``-th to the next one's start, while
        the governed arm stays what it is."""
        if self.arm == "control":
            return 2 * self.every * self.segment_steps
        return (4 if taken < self.burst else self.every) * self.segment_steps

    @property
    def period(self) -> int:
        """Steps from the open (or next) measurement's start to the one after."""
        return self.period_after(self.taken + 1)

    def arm_at(self, step: int) -> Arm:
        """The arm step ``step`` (not before the next probe) trains on, as far as the state knows: a decision at a
        measurement's end may change the steps after it (the forecast of a later step can miss)."""
        start, taken, length = self.next_start, self.taken, self.segment_steps
        while step >= start + 3 * length:  # a later measurement's
            taken += 1
            start += self.period_after(taken)
        if length <= step - start < 2 * length:
            return _other(self.arm)
        return self.arm

    def probe_due(self, step: int) -> bool:
        """Whether the probe loss is taken at the start of step ``step``: the open measurement's next boundary, or
        the next measurement's first step."""
        taken = 0 if self.open is None else len(self.open.losses)
        return step == self.next_start + taken * self.segment_steps

    # -- what the loader reports -------------------------------------------------------------------------------

    def probe(self, step: int, loss: float) -> Decision | None:
        """The probe set's mean loss at the start of step ``step`` (``probe_due``); at a measurement's last
        boundary the pair is recorded and, in ``govern`` mode, the arm decided (returned)."""
        if not self.probe_due(step):
            raise ValueError(f"no probe loss is due at step {step} (the measurement's next boundary: {self._due()})")
        if not math.isfinite(loss):
            raise ValueError(f"probe loss must be finite, received {loss} at step {step}")
        if self.open is None:
            self.open = _Open()
        m = self.open
        m.losses.append(loss)
        if len(m.losses) < 4:
            return None
        self.open = None
        self.next_start += self.period  # the arm has not changed yet: the period it was measured with
        if m.spoiled:
            self.spoiled += 1
            return None
        arms = (self.arm, _other(self.arm), self.arm)
        segs = [Segment(a, self.segment_steps, m.losses[k], m.losses[k + 1]) for k, a in enumerate(arms)]
        self.pairs.append(Pair.of(*segs))
        return self._decide(step) if self.mode == "govern" else None

    def _due(self) -> int:
        return self.next_start + (0 if self.open is None else len(self.open.losses)) * self.segment_steps

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
            "settings": [self.mode, self.segment_steps, self.every, self.window, self.burst],
            "arm": self.arm,
            "moved_at": self.moved_at,
            "next_start": self.next_start,
            "open": None if self.open is None else asdict(self.open),
            "pairs": [[p.selection, p.control] for p in self.pairs],
            "spoiled": self.spoiled,
            "costs": asdict(self.costs),
            "decisions": [asdict(d) for d in self.decisions],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue ``state_dict()``'s run; refuses another version or other settings."""
        mine = [self.mode, self.segment_steps, self.every, self.window, self.burst]
        if state.get("version") != self.VERSION or list(state.get("settings", [])) != mine:
            raise ValueError(
                f"payoff state has version {state.get('version')!r} and settings {state.get('settings')!r} "
                f"(mode, segment_steps, every, window, burst); this loader's are {self.VERSION} and {mine}"
            )
        self.arm, self.next_start, self.moved_at = state["arm"], int(state["next_start"]), int(state["moved_at"])
        self.open = None if state["open"] is None else _Open(**state["open"])
        self.pairs = [Pair(float(x), float(y)) for x, y in state["pairs"]]
        self.spoiled = int(state["spoiled"])
        self.costs = ArmCosts(**state["costs"])
        self.decisions = [Decision(**d) for d in state["decisions"]]


def schedule_valid(segment_steps: int, every: int, window: int, burst: int) -> bool:
    """The payoff schedule's one rule (``LoaderConfig`` checks its fields by it, ``Governor`` its arguments):
    segments of >= 1 step, >= 4 segments between measurements (one takes 3), a window of 0 (every measurement
    since the last move) or >= 2, and a burst >= 0."""
    return segment_steps >= 1 and every >= 4 and (window == 0 or window >= 2) and burst >= 0


def _other(arm: Arm) -> Arm:
    return "control" if arm == "selection" else "selection"
