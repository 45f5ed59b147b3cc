"""The forecast of a future step's batch: what the loader's schedule will draw for it, as far as the schedule
knows now. The input pipeline (``_fetch.py``) gives forecast batches to the ``DataLoader``'s workers ahead of
need; the loader uses one only when its ids are the ids it then draws, so a wrong forecast costs a fetch, never
a different batch.

The forecast replays the loader's step (``CoresetLoader._next``) on a copy of its state, with the service's
part replaced by what is known:

- inside a region, its batches continue (the pass over the pool is replayed on a copy of the RNG);
- the fixed rule ends the region at a known step; a Taylor check's outcome is not known and is forecast to keep
  the region (most checks do);
- at the step a new region is due, its batches are known when its round has arrived (its coresets are all here);
  otherwise that step is unknown (``None``): the loader will wait for the round there;
- after that step, while the round is late or none is in flight, uniform batches continue (replayed on a copy
  of the fallback RNG).

The embedding pass that ends a region of the fixed rule runs at a known step too (``pass_step``); once the next
round's plan has come back (``ServiceLink.prefetch``), its candidates are known, and the pipeline gives their
chunks to the workers right after the batch of the step before, as a ``DataLoader`` prefetches its next batches.
"""

from __future__ import annotations

import copy
from dataclasses import replace

import numpy as np

from trainer_client._payoff_run import PayoffRun
from trainer_client._state import LoaderState, Region
from trainer_client.loader_config import LoaderConfig
from trainer_client.region import Decision, RegionController


class Forecaster:
    """A loader's forecasts (``forecast_ids``), with the region of its pending round built once per round.

    Args:
        config: the loader's settings.
        controller: the loader's region controller (read, never changed).
        rank, world_size: this rank's place under DDP (0, 1 in one process).
    """

    def __init__(
        self,
        config: LoaderConfig,
        controller: RegionController,
        rank: int = 0,
        world_size: int = 1,
        payoff: PayoffRun | None = None,
    ) -> None:
        self.config, self.controller, self.rank, self.world_size = config, controller, rank, world_size
        self.payoff = payoff
        self._next: tuple[tuple[int, int], Region] | None = None  # the pending round's region, by (round, coresets)

    def __call__(self, state: LoaderState, step: int) -> np.ndarray | None:
        """This rank's ids at ``step`` as far as ``state`` (a step's end) knows them; None for a past step."""
        if step < state.stats.steps:
            return None
        p, region = state.pending, None
        if p is not None and p.ready:
            key = (p.round, len(p.coresets))
            if self._next is None or self._next[0] != key:
                cfg = self.config
                region = Region.of_round(p, cfg.check_examples, cfg.seed, self.world_size, cfg.coreset_weights)
                self._next = key, region
            region = self._next[1]
        return forecast_ids(
            state,
            self.controller,
            step,
            lookahead_steps=self.config.lookahead_steps,
            selecting=self.config.selection == "crest",
            next_region=region,
            rank=self.rank,
            world_size=self.world_size,
            payoff=self.payoff,
        )


def forecast_ids(
    state: LoaderState,
    controller: RegionController,
    step: int,
    *,
    lookahead_steps: int,
    selecting: bool,
    next_region: Region | None,
    rank: int = 0,
    world_size: int = 1,
    payoff: PayoffRun | None = None,
) -> np.ndarray | None:
    """The ids (int64, this rank's share) the loader will train on at ``step`` (>= ``state.stats.steps``, the next
    step), or None when they depend on a round not here yet.

    ``state`` is the loader's between two steps (it is not changed); ``selecting`` is False in uniform mode (no
    rounds); ``next_region`` is the region of the pending round when it has arrived; ``payoff`` the loader's payoff
    run (its arms as its governor knows them now: a decision at a probe may change later steps).
    """
    sim = replace(state, rng=copy.deepcopy(state.rng), fallback_rng=copy.deepcopy(state.fallback_rng))
    control_rng = None if payoff is None else copy.deepcopy(payoff.rng)
    fixed = controller.config.mode == "fixed"
    calls = 0  # after_step calls replayed in the controller's current region
    since_switch: int | None = None  # steps replayed in a region switched to in the replay
    pending = sim.pending is not None or sim.need_request  # a round is in flight or about to be asked for
    for u in range(sim.stats.steps, step + 1):
        # The decision for the batch yielded last (CoresetLoader._after_step, or the first round's request).
        if sim.yielded and sim.from_region and sim.region is not None:
            if since_switch is None:
                calls += 1
                decision = controller.decision_in(calls)
            else:
                since_switch += 1
                reselect = fixed and since_switch == controller.reselect_at
                decision = Decision.RESELECT if reselect else Decision.NONE  # a new fit's checks: not known
            wanted = payoff is None or payoff.wants_round(u + lookahead_steps)
            if sim.want_at is None and decision == Decision.RESELECT and wanted:
                sim.want_at, pending, next_region = u + lookahead_steps, True, None
        elif not sim.yielded and selecting and sim.region is None and not pending and sim.want_at is None:
            sim.want_at, pending = u, True
        sim.yielded = True
        # A fresh round ahead of a selection segment while governed onto the control (CoresetLoader._payoff_step).
        ahead = None if payoff is None else payoff.round_ahead(u, lookahead_steps)
        if ahead is not None and sim.want_at is None and not pending:
            sim.want_at, pending, next_region = ahead, True, None
        # The switch to the next region.
        due = sim.want_at is not None and u >= sim.want_at
        if due and next_region is not None:
            sim.region, sim.pass_perm, sim.pass_next = next_region, None, 0
            sim.want_at, pending, next_region, since_switch, due = None, False, None, 0, False
        elif due and u == sim.want_at and pending:
            return None  # the loader waits for the round here: its batch is not known yet
        # The batch.
        control = payoff is not None and payoff.arm_at(u) == "control"
        if control:
            assert payoff is not None
            ids = payoff.control_ids(rank, world_size, control_rng)
        elif sim.region is not None and not due:
            ids, _ = sim.region_batch(rank, world_size)
        else:
            ids, _ = sim.uniform_batch(rank, world_size)
        sim.from_region = not control and sim.region is not None and not due
        if u == step:
            return ids
    raise ValueError(f"step {step} is before the loader's next step {state.stats.steps}")


def pass_step(
    state: LoaderState, controller: RegionController, payoff: PayoffRun | None = None, lookahead_steps: int = 0
) -> int | None:
    """The step at which the loader will run its next embedding pass (the ``stats.steps`` of the ``_next`` that
    runs it, before that step's batch), when the schedule knows it: inside a region of the fixed rule, with no
    round wanted yet. None otherwise (a Taylor check's outcome is not known, nor when a late round arrives).

    ``state`` is the loader's between two steps; the pass is due at the ``after_step`` call that returns
    ``RESELECT``, which the next step's ``_next`` makes first. With ``payoff``, the control arm's steps make no call
    (the region pauses), and a region that ends where the control is governed asks for no round.
    """
    if controller.config.mode != "fixed" or state.region is None or not (state.yielded and state.from_region):
        return None
    if state.want_at is not None or state.pending is not None or state.need_request:
        return None
    calls = controller.reselect_at - controller.steps_since_fit  # decision_in(calls) is RESELECT
    if calls < 1:
        return None
    if payoff is None:
        return state.stats.steps + calls - 1
    u, horizon = state.stats.steps, state.stats.steps + 4 * controller.reselect_at + 2 * payoff.governor.period
    while u < horizon:  # the _next at step u makes the call for the batch of step u - 1 when it trained on selection
        if u == state.stats.steps or payoff.arm_at(u - 1) == "selection":
            calls -= 1
            if calls == 0:
                return u if payoff.wants_round(u + lookahead_steps) else None
        u += 1
    return None
