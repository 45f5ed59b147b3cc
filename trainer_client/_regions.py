"""The loader's regions and rounds: when a region ends (``RegionController``), asking the service for a round,
embedding its candidates, and switching training to it ``lookahead_steps`` later. ``CoresetLoader`` inherits these
methods; they are its own, kept here beside the rest of a region's life (the iterator, the payoff and the
checkpoint stay in ``loader.py``, DDP's version of the same steps in ``_mirror.py``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import torch

from crest.selector.v1.api import RoundPlan, SelectionService
from trainer_client._embedding_cache import EmbeddingCache
from trainer_client._link import ServiceLink
from trainer_client._passes import ModelPasses, trainable
from trainer_client._payoff_run import PayoffRun
from trainer_client._state import LoaderState, PendingRound, Region
from trainer_client.difficulty import RoundDifficulty, round_difficulty
from trainer_client.distributed import DistContext
from trainer_client.loader_config import LoaderConfig
from trainer_client.region import Decision, RegionController

log = logging.getLogger("trainer_client.loader")


class RegionRounds:
    """A region's life in the loader: its end, the next round's request, embedding and switch."""

    # What they use of the loader (defined by CoresetLoader).
    config: LoaderConfig
    model: torch.nn.Module
    client: SelectionService
    controller: RegionController
    _state: LoaderState
    _link: ServiceLink
    _dist: DistContext | None
    _passes: ModelPasses
    _cache: EmbeddingCache | None
    _payoff: PayoffRun | None
    _unscored: list[tuple[Any, ...]]
    _fit_batch_size: int
    _share_observed: Callable[[], None]
    _difficulty: list[RoundDifficulty]

    @property
    def difficulty(self) -> list[RoundDifficulty]:
        """Per region switched to, how hard its coresets were against the round's embedded ids (in order)."""
        if self._unscored:
            self._difficulty.extend(round_difficulty(*args) for args in self._unscored)
            self._unscored.clear()
        return self._difficulty

    def _want_round(self) -> None:
        s = self._state
        s.want_at = s.stats.steps + (self.config.lookahead_steps if s.region is not None else 0)
        s.need_request = True

    def _after_step(self) -> None:
        """The optimizer has taken the step of the batch yielded last: count it and run what is due."""
        s = self._state
        if not s.from_region or s.region is None:
            return
        decision = self.controller.after_step()
        if s.want_at is not None:
            return  # already moving to the next region
        if self._payoff is not None and not self._payoff.wants_round(s.stats.steps + self.config.lookahead_steps):
            return  # governed onto the control: the round comes ahead of the next selection segment
        if decision == Decision.CHECK:
            start = time.perf_counter()
            loss = self._passes.check_loss(s.region.check_ids, self.controller)
            result = self.controller.check(trainable(self.model), loss.true_loss, s.stats.steps, loss.predicted)
            s.stats.check_s += time.perf_counter() - start
            s.stats.checks += 1
            if result.reselect:
                s.stats.reselections += 1
                self._want_round()
        elif decision == Decision.RESELECT:
            log.info("step %d: region %d reached its fixed length", s.stats.steps, s.region.round)
            s.stats.reselections += 1
            self._want_round()

    def _give_up_round(self) -> None:
        """The round in flight failed (the link has counted it and set the backoff): ask for another."""
        self._state.pending, self._state.need_request = None, True

    def _request_plan(self) -> RoundPlan | None:
        """Start a round on the service when one is wanted and the backoff allows (rank 0 only)."""
        s = self._state
        if not s.need_request or s.pending is not None:
            return None
        # Only the coresets this region will use are drawn, embedded and selected.
        return self._link.start_round(min(self.controller.num_coresets, self.config.num_subsets))

    def _begin_round(self, plan: RoundPlan) -> None:
        """Embed the round's ids (sharded over the ranks under DDP) and hand them to the stream thread."""
        s = self._state
        start = time.perf_counter()
        embed, ids = self._passes.embed_round, plan.ids
        self._share_observed()
        embedded = embed(ids) if self._cache is None else self._cache.embed_round(ids, s.stats.steps, embed)
        s.stats.embed_s += time.perf_counter() - start
        s.stats.examples_embedded += embedded.embedded
        s.stats.embeddings_reused += embedded.reused
        s.stats.reused_age_steps += embedded.reused_age
        s.stats.rounds_started += 1
        num = min(self.controller.num_coresets, plan.num_subsets)
        session_round = self._link.session_round
        s.pending = PendingRound(s.round, session_round, plan.ids, num, s.stats.steps, losses=embedded.losses)
        self._link.submit(s.round, plan, embedded)
        log.info("step %d: round %d requested: %d ids, %d reused", s.stats.steps, s.round, len(ids), embedded.reused)
        s.round += 1
        s.need_request = False

    def _switch_due(self) -> bool:
        s = self._state
        return s.want_at is not None and s.stats.steps >= s.want_at and s.pending is not None

    def _switch_candidate(self) -> PendingRound | None:
        """The pending round when training should switch to it now, waiting for it at the switch step."""
        if not self._switch_due():
            return None
        s = self._state
        p = s.pending
        assert p is not None and s.want_at is not None
        if not p.ready and p.requested_step <= s.want_at and s.stats.steps == s.want_at:
            first = s.stats.regions == 0
            timeout = self.config.first_batch_timeout_s if first else self.config.deadline_s
            if not self._link.wait(p, timeout):
                self._give_up_round()
                return None
            if not p.ready:
                if self.config.strict:
                    raise TimeoutError(
                        f"round {p.round} from {self.client.target} not ready within {timeout:.1f} s at step "
                        f"{s.stats.steps} ({len(p.coresets)}/{p.num_coresets} coresets arrived)"
                    )
                late = "step %d: round %d late after %.1f s; uniform batches until it arrives"
                log.warning(late, s.stats.steps, p.round, timeout)
        return p if p.ready and s.pending is p else None

    def _switch(self, p: PendingRound) -> None:
        s = self._state
        world = 1 if self._dist is None else self._dist.world_size
        region = s.region = Region.of_round(
            p, self.config.check_examples, self.config.seed, world, self.config.coreset_weights
        )
        used = min(len(p.coresets), p.num_coresets)
        if used < p.num_coresets:
            s.stats.partial_rounds += 1
            log.warning(
                "step %d: round %d ended with %d of its %d coresets (subsets %s); training on those",
                *(s.stats.steps, p.round, used, p.num_coresets, sorted(p.coresets)),
            )
        s.pending, s.want_at, s.pass_perm, s.pass_next = None, None, None, 0
        s.stats.regions += 1
        fixed = self.controller.config.mode == "fixed"  # a fixed region runs no check
        checks = "" if fixed else f"; checks on {len(region.check_ids)} of {len(p.check_ids)} random-subset ids"
        log.info(
            "step %d: region %d: %d coresets, %d examples%s", s.stats.steps, p.round, used, len(region.ids), checks
        )
        if p.losses is not None:
            self._unscored.append(
                (p.round, p.requested_step, s.stats.steps, p.check_ids, p.losses, region.ids, region.weights)
            )
            if log.isEnabledFor(logging.INFO):
                log.info("region %d: %s", p.round, self.difficulty[-1])
        if self.controller.config.mode == "fixed":
            self.controller.start_region()  # the fixed rule needs no model: skip the Hessian estimate
            earliest_end = s.stats.steps + self.controller.reselect_at
        else:
            start = time.perf_counter()
            ids, weights = region.fit_sample(self.config.fit_examples, self.config.seed)
            self._passes.fit(self.controller, ids, weights, self._fit_batch_size, s.stats.steps)
            s.stats.fit_s += time.perf_counter() - start
            earliest_end = s.stats.steps + self.controller.interval  # the first check
        # The next round's size is final now (only a fit changes it): start that round on the stream thread, after
        # this one's upload, so that the step that asks for it finds its plan (see ServiceLink.prefetch).
        self._link.prefetch(min(self.controller.num_coresets, self.config.num_subsets), earliest_end)
