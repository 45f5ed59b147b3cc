"""The loader's side of the payoff (``LoaderConfig.payoff``): the probe set's loss, the control arm's batches, the
clock that charges each step to its arm, and the governor (``governor.py``) that holds the schedule and decides.

- **The probe set** is a small held-out dataset the user gives the loader (``CoresetLoader(probe=...)``). Its
  batches are collated once, on first use, and kept: a probe is one no-grad forward pass over them in eval mode,
  timed (``probe_s``) and charged to neither arm. Under DDP each rank evaluates its contiguous shard and one
  all-reduce sums the losses.
- **The control arm** trains on uniformly sampled batches with weight 1, drawn from their own seeded RNG (so
  switching arms never changes the fallback's or the region's draws); when the labels are skewed (the largest
  class more than twice the smallest) the batches are class-balanced instead, as many examples of every class.
- **The clock.** Each step is charged, at the next step's start, to the arm it trained on: the training loop's
  time between the two ``_next`` calls plus the loader's own time in the step's ``_next``, less the probe and
  less selection's overheads (embedding passes, fits, checks, waits for the service), which go to selection
  wherever they fell. Under DDP rank 0's costs travel with the probe's all-reduce, so every rank's governor reads
  the same numbers and takes the same decision.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from trainer_client.batches import ForwardFn
from trainer_client.distributed import DistContext
from trainer_client.embeddings import per_example_loss
from trainer_client.governor import Decision, Governor
from trainer_client.loader_config import LoaderConfig
from trainer_client.payoff import Arm

log = logging.getLogger("trainer_client.loader")

# Labels count as skewed, and the control arm is class-balanced, when the largest class has more than this many
# times the examples of the smallest.
SKEW = 2.0
# The share of a run's time the probes should stay under; the summary says when they did not.
MEASURE_BUDGET = 0.03
_COSTS = ("selection_steps", "selection_s", "overhead_s", "control_steps", "control_s")


def class_index(labels: np.ndarray, num_classes: int) -> list[np.ndarray] | None:
    """Each class's example ids (int64, ascending) when ``labels`` (int (N,)) are skewed (``SKEW``); None when
    they are balanced enough for uniform control batches. Classes with no example are left out."""
    counts = np.bincount(labels, minlength=num_classes)
    present = counts[counts > 0]
    if len(present) < 2 or present.max() <= SKEW * present.min():
        return None
    order = np.argsort(labels, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(counts)])
    return [order[bounds[c] : bounds[c + 1]].astype(np.int64) for c in range(num_classes) if counts[c]]


def control_batch(
    rng: np.random.Generator, size: int, batch_size: int, classes: list[np.ndarray] | None, rank: int, world: int
) -> np.ndarray:
    """The control arm's next batch: int64 ids, ascending, ``rank``'s share (every ``world``-th) of ``batch_size``
    ids drawn from ``size`` examples; class-balanced when ``classes`` is given (``batch_size // C`` of every class,
    the remainder from classes drawn at random; a class smaller than its share is drawn with replacement)."""
    if classes is None:
        ids = rng.choice(size, size=min(batch_size, size), replace=False)
    else:
        share = np.full(len(classes), batch_size // len(classes))
        share[rng.choice(len(classes), batch_size % len(classes), replace=False)] += 1
        ids = np.concatenate(
            [c[rng.choice(len(c), k, replace=k > len(c))] for c, k in zip(classes, share, strict=True) if k]
        )
    return np.sort(ids).astype(np.int64)[rank::world]


class PayoffRun:
    """One loader's payoff measurement (and, in ``govern`` mode, its governor).

    Args:
        config: the loader's settings (``payoff`` is "measure" or "govern").
        probe: the held-out probe dataset; ``probe[i]`` is collated by ``collate_fn`` and run by ``forward_fn``.
        collate_fn, forward_fn: the loader's.
        model: the replica being trained.
        labels: int64 (N,) the training set's labels; num_classes: C.
        dist: the DDP context, or None in one process.
    """

    VERSION = 1

    def __init__(
        self,
        config: LoaderConfig,
        probe: Dataset,
        collate_fn: Callable[[list[Any]], Any],
        forward_fn: ForwardFn,
        model: torch.nn.Module,
        labels: np.ndarray,
        num_classes: int,
        dist: DistContext | None,
    ) -> None:
        assert config.payoff != "off", "a payoff run needs LoaderConfig.payoff 'measure' or 'govern'"
        size = len(probe)  # type: ignore[arg-type]
        if size < 1:
            raise ValueError("the payoff's probe set is empty; pass a held-out dataset of a few hundred examples")
        self.config, self.probe, self.collate_fn, self.forward_fn = config, probe, collate_fn, forward_fn
        self.model, self.dist, self.dataset_size = model, dist, len(labels)
        length = config.payoff_segment_steps
        self.governor = Governor(
            config.payoff,
            length,
            config.payoff_every,
            config.payoff_window,
            start=length,
            burst=config.payoff_burst,
            control_scale=config.payoff_control_scale,
        )
        self.rng = np.random.default_rng([config.seed, 5])  # the control arm's batches
        self.classes = class_index(labels, num_classes)
        self._batches: list[Any] | None = None  # the probe's collated batches (this rank's shard)
        self.probe_s = 0.0
        self.control_steps = 0
        # (yielded at, arm, the step's own time in its _next, selection's overheads in it): charged at the next step
        self._clock: tuple[float, Arm, float, float] | None = None
        self._step_start = 0.0
        self._overheads = 0.0  # selection's overheads so far, at the step's start
        self._began: float | None = None  # the first step's start, for the probe's share of the run

    # -- the schedule ------------------------------------------------------------------------------------------

    def arm_at(self, step: int) -> Arm:
        return self.governor.arm_at(step)

    def wants_round(self, step: int) -> bool:
        """Whether a region that ends now should be followed by a round that is due at ``step``: not while training
        is governed onto the control and ``step`` trains on it (a fresh round is asked for ahead of the next
        selection segment instead, ``round_ahead``)."""
        return self.governor.arm == "selection" or self.governor.arm_at(step) == "selection"

    def round_ahead(self, step: int, lookahead: int) -> int | None:
        """While governed onto the control: the first step of a selection segment in ``[step, step + lookahead]``,
        for which a fresh round is asked now (the region held since the last one is stale); None otherwise."""
        if self.governor.arm != "control":
            return None
        for u in range(step, step + lookahead + 1):
            if self.arm_at(u) == "selection" and (u == 0 or self.arm_at(u - 1) == "control"):
                return u
        return None

    def control_ids(self, rank: int, world: int, rng: np.random.Generator | None = None) -> np.ndarray:
        """The control arm's next batch (from ``rng``, a copy, for a forecast; the run's own RNG otherwise)."""
        return control_batch(rng or self.rng, self.dataset_size, self.config.batch_size, self.classes, rank, world)

    # -- the clock and the probe -------------------------------------------------------------------------------

    def step_begins(self, overheads_s: float) -> None:
        """At a ``_next``'s start: charge the step before to its arm. ``overheads_s``: selection's overheads so far
        (the loader's embedding, fit, check and wait seconds, summed)."""
        now = time.perf_counter()
        if self._began is None:
            self._began = now
        if self._clock is not None:
            yielded, arm, next_s, overhead = self._clock
            self.governor.charge(arm, next_s + (now - yielded), overhead)
        self._step_start, self._overheads = now, overheads_s

    def step_ends(self, arm: Arm, overheads_s: float, probe_s: float) -> None:
        """At a ``_next``'s end, with the batch of ``arm`` about to be yielded; ``probe_s``: the probe's time in it."""
        now = time.perf_counter()
        overhead = overheads_s - self._overheads
        next_s = max(0.0, now - self._step_start - probe_s - overhead)
        self._clock = (now, arm, next_s, overhead)
        if arm == "control":
            self.control_steps += 1

    def probe_due(self, step: int) -> bool:
        return self.governor.probe_due(step)

    def probe_step(self, step: int) -> tuple[Decision | None, float]:
        """Take the probe loss at the start of ``step`` and give it to the governor: (its decision, if one was
        taken, and the probe's seconds)."""
        start = time.perf_counter()
        total, count = self._loss_sum()
        costs = [float(getattr(self.governor.costs, k)) for k in _COSTS]
        if self.dist is not None:
            # Rank 0's costs travel with the losses (the others add zeros): every rank's governor reads the same.
            mine = costs if self.dist.is_main else [0.0] * len(costs)
            reduced = self.dist.all_reduce_sum([total, count, *mine])
            total, count = float(reduced[0]), float(reduced[1])
            c = self.governor.costs
            self.governor.costs = replace(
                c, **{k: type(getattr(c, k))(v) for k, v in zip(_COSTS, reduced[2:], strict=True)}
            )
        decision = self.governor.probe(step, total / count)
        took = time.perf_counter() - start
        self.probe_s += took
        return decision, took

    @torch.no_grad()
    def _loss_sum(self) -> tuple[float, float]:
        """(summed cross-entropy, examples) of this rank's shard of the probe set, eval mode."""
        if self._batches is None:
            size = len(self.probe)  # type: ignore[arg-type]
            lo, hi = (0, size) if self.dist is None else self.dist.shard_bounds(size)
            step = self.config.embed_batch_size
            self._batches = [
                self.collate_fn([self.probe[i] for i in range(a, min(a + step, hi))]) for a in range(lo, hi, step)
            ]
        was_training = self.model.training
        self.model.eval()
        sums, count = [], 0
        try:
            for batch in self._batches:
                logits, y = self.forward_fn(self.model, batch)
                sums.append(per_example_loss(logits.float(), y).sum())
                count += len(y)
        finally:
            self.model.train(was_training)
        return (float(torch.stack(sums).double().sum()) if sums else 0.0), float(count)

    # -- what the loader reports -------------------------------------------------------------------------------

    def counters(self) -> dict[str, Any]:
        """The payoff's ``LoaderStats`` fields."""
        g, p = self.governor, self.governor.payoff()
        return {
            "control_steps": self.control_steps,
            "probe_s": self.probe_s,
            "payoff_measurements": len(g.pairs),
            "payoff_spoiled": g.spoiled,
            "payoff_arm": g.arm,
            "payoff_per_step": None if p is None else p.per_step,
            "payoff_per_second": None if p is None else p.per_second,
            "payoff_per_second_lo": None if p is None else p.per_second_lo,
            "payoff_per_second_hi": None if p is None else p.per_second_hi,
        }

    def summary(self) -> str:
        """One line for a run's end: whether selection paid (``Payoff.describe``), the control segments' length when
        scaled to the cost ratio, where the governor left training, and what the probes cost (said when above the 3%
        target)."""
        g, p = self.governor, self.governor.payoff()
        if p is None:
            span = g.bounds(g.scale)[3]
            line = (
                f"selection's payoff not measured: {len(g.pairs)} of the 2 measurements it needs (each takes "
                f"{span} steps; the next ends at step {g.next_start + span})"
            )
        else:
            line = p.describe()
        if g.scale > 1:
            line += (
                f"; control segments of {g.length('control', g.scale)} steps, the time of {g.segment_steps} "
                "selection steps"
            )
        if g.mode == "govern":
            arms = ["selection", *(d.arm for d in g.decisions)]
            switches = sum(a != b for a, b in itertools.pairwise(arms))
            if switches:
                line += f"; governed: training on {g.arm} after {switches} switch{'es' if switches != 1 else ''}"
            else:
                line += "; governed: training stayed on selection"
        run_s = 0.0 if self._began is None else time.perf_counter() - self._began
        share = self.probe_s / run_s if run_s > 0 else 0.0
        line += f"; probes took {share:.1%} of the run"
        if share > MEASURE_BUDGET:
            line += f" (above the {MEASURE_BUDGET:.0%} target: a smaller probe set or a larger payoff_every)"
        return line

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": self.VERSION,
            "governor": self.governor.state_dict(),
            "rng": self.rng.bit_generator.state,
            "control_steps": self.control_steps,
            "probe_s": self.probe_s,
        }

    def resume(self, state: dict[str, Any] | None, step: int) -> None:
        """Continue a checkpoint's payoff (``state``), or, for a checkpoint saved without one, start measuring one
        segment after ``step``, the step the run resumes at."""
        if state is None:
            self.governor.next_start = step + self.governor.segment_steps
            log.info("the checkpoint holds no payoff state: measuring from step %d", self.governor.next_start)
            return
        self.load_state_dict(state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != self.VERSION:
            raise ValueError(f"payoff state has version {state.get('version')!r}; this code reads {self.VERSION}")
        self.governor.load_state_dict(state["governor"])
        self.rng.bit_generator.state = state["rng"]
        self.control_steps, self.probe_s = int(state["control_steps"]), float(state["probe_s"])
