"""``CoresetLoader``: weighted mini-batch coresets from the selection service, as a PyTorch batch iterator.

The loop changes by a few lines::

    loader = CoresetLoader(dataset, model, SelectionClient("localhost:50051"), labels=labels)
    for step, (x, y, w) in zip(range(num_steps), loader):
        loss = weighted_loss(model(x), y, w)
        ...

Each *region* trains on the union of one round's coresets, reshuffled into batches every pass (their weights have
mean 1, as the service's engine normalised them). A ``RegionController`` (``region.py``) ends the region: in CREST
mode when the quadratic model of the coreset loss stops predicting the loss on the round's random subsets, in
fixed mode after a set number of steps. At that step the loader asks the service for a round (started ahead, on
the stream thread, when its size is known: ``LoaderConfig.prefetch_rounds``), embeds its candidates with the
current model (one no-grad forward pass), and a background thread streams them out and the weighted batches back.
Training switches to the new region exactly ``lookahead_steps`` later, waiting there (bounded by ``deadline_s``,
counted in ``wait_s``) if the round is late, so for a seed the batches do not depend on timing and a resumed run
continues with the same batches. It never blocks beyond that: see ``CoresetLoader`` for what a failure does.

This module schedules the steps: iteration, the payoff's arms, checkpoints. A region's end, its next round and
the switch to it are ``_regions.py``; the link to the service is ``_link.py``, the model passes
``_passes.py``, the input pipeline (DataLoader workers fetching batches ahead) ``_fetch.py`` with its forecast
``_forecast.py``, the checkpointed state ``_state.py``, the training logits' rows ``_observed.py``, and the DDP
steps (every rank follows rank 0) ``_mirror.py``.

Under ``torch.distributed`` (more than one rank) every rank builds the loader with the same arguments and
iterates it in step. Rank 0 alone talks to the service and broadcasts its service events, so every rank switches,
falls back and reconnects at the same steps; the ranks embed disjoint shards of each round's candidates; each
region's pool is dealt between the ranks (``distributed.owners``), so every step's global batch is the union of
the ranks' batches; the Taylor check sums per-rank shards of the loss, and the quadratic model is fitted on every
rank (identical weights give identical fits; rank 0's interval is broadcast).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import asdict, fields, replace
from typing import Any, TypeVar, cast

import numpy as np
import torch
from numpy.typing import ArrayLike
from torch.utils.data import DataLoader, Dataset, default_collate

from crest.selector.v1.api import SelectionService, SessionInfo, TrainerReport
from trainer_client._embedding_cache import EmbeddingCache
from trainer_client._fetch import InputPipeline, Workers
from trainer_client._forecast import Forecaster, pass_step
from trainer_client._link import ServiceLink
from trainer_client._mirror import FollowsRankZero
from trainer_client._observed import SHARE_EVERY, TrainingRows
from trainer_client._passes import ModelPasses
from trainer_client._payoff_run import PayoffRun
from trainer_client._regions import RegionRounds
from trainer_client._state import LoaderState, on_cpu
from trainer_client.batches import (
    Embedder,
    ForwardFn,
    default_forward,
    label_array,
    last_linear,
    model_device,
    with_weights,
)
from trainer_client.difficulty import RoundDifficulty
from trainer_client.distributed import DistContext
from trainer_client.governor import Decision as GovernorDecision
from trainer_client.loader_config import LoaderConfig, LoaderStats, SelectionUnavailable
from trainer_client.payoff import Arm, or_nan
from trainer_client.region import RegionController

log = logging.getLogger(__name__)

__all__ = ["CoresetLoader", "LoaderConfig", "LoaderStats", "SelectionUnavailable"]

T = TypeVar("T")

# Uniform batches with no region yet at which the loader logs an ERROR (``ServiceLink.report_no_coresets``).
NO_CORESETS_AT = frozenset((50, 500, 5_000, 50_000))


class CoresetLoader(RegionRounds, FollowsRankZero):
    """Infinite iterator of weighted batches selected by the service.

    Yields ``(*batch, weights)`` for tuple/list batches (so ``(x, y, w)``) and ``{**batch, "weights": w}``
    for dict batches; weights are float32 (n,), mean 1 over the region as the service sent them (all ones for
    a uniform batch). Call ``state_dict`` after the optimizer step of the last batch. ``difficulty`` lists, per
    region this loader switched to, how hard its coresets were against the round's random subsets
    (``RoundDifficulty``, from the embedding pass's losses; not kept in checkpoints).

    When the service fails (docs/concepts/failures.md): a transient failure (UNAVAILABLE, DEADLINE_EXCEEDED, a
    broken stream, RESOURCE_EXHAUSTED, ABORTED, NOT_FOUND of a lost session) is logged, counted in
    ``stats.service_errors``, and trained through on uniform batches (``stats.fallback_batches``) until a round
    arrives again; ``strict=True`` raises ``SelectionUnavailable`` instead. A persistent one (INTERNAL, UNKNOWN,
    DATA_LOSS) is logged as an ERROR and counted in ``stats.persistent_failures`` too, and raised after
    ``max_persistent_failures`` in a row. A refused request (INVALID_ARGUMENT, UNAUTHENTICATED, ...) is raised
    at once. A partial round (fewer coresets than subsets) is trained on and counted in ``stats.partial_rounds``.

    Under DDP, initialise ``torch.distributed`` before building the loader (it looks at the default group
    then), build it on every rank with the same arguments, and take the same number of batches on every rank;
    each rank receives its own share (about ``batch_size / world_size`` examples) of every step's batch.

    Args:
        dataset: map-style dataset; ``dataset[i]`` is collated by ``collate_fn``.
        model: the model being trained (run in eval mode for embeddings, checks and the quadratic model).
        client: the selection service: a ``SelectionClient`` (gRPC to a running service) or a
            ``selector_service.InProcessSelection`` (the service's selection in this process, no server); the
            session is opened lazily, so the service may be down at start. None with
            ``LoaderConfig(selection="uniform")``, which asks no service for anything.
        labels: int (N,) label of every example, in dataset order.
        num_classes: C; 0 means max(labels) + 1.
        config: selection and scheduling settings.
        collate_fn: turns a list of samples into a batch (in the worker processes, when there are workers).
        num_workers, pin_memory, prefetch_factor: as a ``torch.utils.data.DataLoader`` takes them: the loader's
            batches (training batches and the examples of its model passes) are fetched by a ``DataLoader`` with
            these settings, ahead of need (``_fetch.py``); ``from_dataloader`` takes them from a user's
            ``DataLoader``. The ids and weights of every step do not depend on them.
        persistent_workers, worker_init_fn, multiprocessing_context, timeout: the ``DataLoader``'s, likewise.
        forward_fn: ``(model, batch) -> (logits (n, C), targets (n,))``; needed for dict or other batches.
        last_layer: the classifier's ``nn.Linear`` for the last-layer embedding; default: the model's last.
        probe: a small held-out dataset (a few hundred examples, not trained on) on which ``LoaderConfig.payoff``
            scores the arms; its items are collated by ``collate_fn`` and run by ``forward_fn``. Required when the
            payoff is on, unused otherwise.
    """

    def __init__(
        self,
        dataset: Dataset,
        model: torch.nn.Module,
        client: SelectionService | None,
        labels: ArrayLike,
        *,
        num_classes: int = 0,
        config: LoaderConfig | None = None,
        collate_fn: Callable[[list[Any]], Any] = default_collate,
        forward_fn: ForwardFn = default_forward,
        last_layer: torch.nn.Linear | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        prefetch_factor: int | None = None,
        persistent_workers: bool = False,
        worker_init_fn: Callable[[int], None] | None = None,
        multiprocessing_context: Any = None,
        timeout: float = 0,
        probe: Dataset | None = None,
    ) -> None:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            # Embedding, checks and the quadratic model run the replica directly: no gradient sync for them.
            model = model.module
        self.config = cfg = config or LoaderConfig()
        if client is None and cfg.selection == "crest":
            raise ValueError("CoresetLoader needs a client unless LoaderConfig(selection='uniform')")
        self.dataset, self.model, self.client = dataset, model, cast(SelectionService, client)
        self._dist = DistContext.detect()
        self.labels = label_array(labels)
        self.num_classes = num_classes or int(self.labels.max()) + 1
        self.collate_fn, self.forward_fn = collate_fn, forward_fn
        layer = None
        if cfg.embedding == "last_layer_gradient":
            layer = last_layer or last_linear(model)
        self.embedder = Embedder(cfg.embedding, layer, cfg.embedding_dim, cfg.seed)
        # The embedding pass's precision ("auto": what the model's device runs fastest, embed_dtype_for).
        self.embed_dtype = cfg.embed_dtype_on(model_device(model))
        log.info("loader settings: %s; embedding pass in %s", cfg.describe(), self.embed_dtype)
        self.controller = RegionController(
            replace(cfg.region, seed=cfg.seed), max_coresets=cfg.num_subsets, lead_steps=cfg.lookahead_steps
        )
        self._difficulty: list[RoundDifficulty] = []
        # round_difficulty's arguments of regions not scored yet: scored when ``difficulty`` is read, off the step.
        self._unscored: list[tuple[Any, ...]] = []
        self.last_ids = np.zeros(0, dtype=np.int64)  # ids of the batch yielded last (this rank's share)
        self.last_round: int | None = None  # loader round of the region it came from; None for a uniform batch
        self.last_arm: Arm = "selection"  # the payoff's arm of the batch yielded last (LoaderConfig.payoff)
        workers = Workers(
            num_workers=num_workers,
            pin_memory=pin_memory,
            prefetch_factor=prefetch_factor,
            persistent_workers=persistent_workers,
            worker_init_fn=worker_init_fn,
            multiprocessing_context=multiprocessing_context,
            timeout=timeout,
        )
        self._input = InputPipeline(dataset, collate_fn, workers, self._forecast, self._forecast_pass)
        self._forecaster = Forecaster(cfg, self.controller, *self._place)  # its payoff is set below
        self._between_steps = True  # the state is a step's end: the forecast may replay from it
        self._passes = ModelPasses(
            model,
            self._input.batches,
            forward_fn,
            self.embedder,
            self.num_classes,
            cfg.embed_batch_size,
            self._dist,
            embed_dtype=getattr(torch, self.embed_dtype),
        )
        embedding_dim = self.embedder.dim(self.num_classes)
        self._cache = EmbeddingCache.for_loader(len(self.labels), embedding_dim, cfg)
        is_main = self._dist is None or self._dist.is_main  # only the rank that talks to the service streams
        self._rows = TrainingRows(self._cache, self.labels, self._dist) if self._cache and cfg.training_logits else None
        # The fit's micro-batch: the largest batch a training step runs through the model at once.
        self._fit_batch_size = cfg.fit_batch_size or -(-cfg.batch_size // self._place[1])
        self._link = ServiceLink(
            self.client,
            cfg,
            self.labels,
            self.num_classes,
            embedding_dim,
            streams=is_main,
            step=self._step,
            report=self._trainer_report,
        )
        self._state = LoaderState.new(len(self.labels), cfg.seed, cfg.batch_size)
        self._payoff: PayoffRun | None = None
        if cfg.payoff != "off":
            if cfg.selection != "crest":
                raise ValueError("LoaderConfig.payoff compares selection with a control; selection='uniform' has none")
            if probe is None:
                raise ValueError(
                    f"LoaderConfig(payoff={cfg.payoff!r}) scores the arms on a held-out probe set: pass "
                    "CoresetLoader(..., probe=dataset), a few hundred examples the run does not train on"
                )
            self._payoff = PayoffRun(
                cfg, probe, collate_fn, forward_fn, model, self.labels, self.num_classes, self._dist
            )
            self._forecaster.payoff = self._payoff
        self._closed = False

    @classmethod
    def from_dataloader(
        cls,
        loader: DataLoader,
        model: torch.nn.Module,
        client: SelectionService | None,
        labels: ArrayLike,
        **kwargs: Any,
    ) -> CoresetLoader:
        """A loader on a user's ``DataLoader``'s dataset, ``collate_fn`` and worker settings (its sampler and batch
        size are not used: the schedule picks the examples and ``LoaderConfig.batch_size`` counts them)."""
        w = Workers.of(loader)
        settings = {f.name: getattr(w, f.name) for f in fields(w) if f.name != "pin_memory_device"}
        return cls(loader.dataset, model, client, labels, collate_fn=loader.collate_fn, **settings, **kwargs)

    def _step(self) -> int:
        return self._state.stats.steps

    def _trainer_report(self) -> TrainerReport:
        """What StartRound tells the service of this run: its fallbacks and errors, and its payoff (the service's
        per-session metrics and ``crest inspect`` show them)."""
        s = self.stats
        return TrainerReport(
            trainer_fallback_batches=s.fallback_batches,
            trainer_service_errors=s.service_errors,
            trainer_control_steps=s.control_steps,
            payoff_measurements=s.payoff_measurements,
            payoff_per_second=or_nan(s.payoff_per_second),
            payoff_per_second_lo=or_nan(s.payoff_per_second_lo),
            payoff_per_second_hi=or_nan(s.payoff_per_second_hi),
            payoff_arm="" if self._payoff is None else s.payoff_arm,
        )

    @property
    def _place(self) -> tuple[int, int]:
        """(rank, world size): (0, 1) in one process."""
        return (0, 1) if self._dist is None else (self._dist.rank, self._dist.world_size)

    @property
    def stats(self) -> LoaderStats:
        """A snapshot of this loader's counters and its service link's (they travel with ``state_dict``)."""
        payoff = {} if self._payoff is None else self._payoff.counters()
        return replace(self._state.stats, **asdict(self._link.counters), **asdict(self._input.counters), **payoff)

    @property
    def payoff_decisions(self) -> list[GovernorDecision]:
        """The governor's decisions so far (``LoaderConfig(payoff="govern")``), oldest first: one per measurement,
        with the arm training stays on after it; empty in the other modes."""
        return [] if self._payoff is None else list(self._payoff.governor.decisions)

    @property
    def payoff_state(self) -> dict[str, Any] | None:
        """The payoff's measurements, costs and decisions, as ``state_dict()["payoff"]`` holds them but without
        settling a round in flight; None with the payoff off."""
        return None if self._payoff is None else self._payoff.state_dict()

    def payoff_summary(self) -> str:
        """One line on whether selection paid (``LoaderConfig.payoff``), for a run's end; "" with the payoff off."""
        return "" if self._payoff is None else self._payoff.summary()

    @property
    def session(self) -> SessionInfo | None:
        """The service session (rank 0's under DDP); None until the first round is asked for."""
        return self._link.session

    # -- the iterator ----------------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[Any]:
        while not self._closed:
            yield self._next()

    def _next(self) -> Any:
        s, self._between_steps, payoff = self._state, False, self._payoff
        if payoff is not None:
            payoff.step_begins(self._overheads_s())
        if s.yielded:
            self._after_step()
        elif s.region is None and s.pending is None and s.want_at is None and self.config.selection == "crest":
            self._want_round()
        s.yielded = True
        probe_s = self._payoff_step() if payoff is not None else 0.0
        if self._dist is None:
            if not self._link.drain(s.pending):
                self._give_up_round()
            plan = self._request_plan()
            if plan is not None:
                self._begin_round(plan)
            p = self._switch_candidate()
            if p is not None:
                self._switch(p)
        else:
            if s.stats.steps % SHARE_EVERY == 0:
                self._share_observed()  # bounds what a rank holds while no round starts (the service down)
            self._follow_service()
        due = s.want_at is not None and s.stats.steps >= s.want_at
        arm: Arm = "selection" if payoff is None else payoff.arm_at(s.stats.steps)
        if arm == "control":  # the region pauses: no after_step for this batch
            ids = payoff.control_ids(*self._place)  # type: ignore[union-attr]
            weights = np.ones(len(ids), dtype=np.float32)
        elif s.region is not None and not due:
            ids, weights = s.region_batch(*self._place)
        else:
            ids, weights = self._uniform_batch()
            if payoff is not None:
                payoff.governor.spoil()  # a selection segment that trained on a uniform batch
        s.from_region = arm == "selection" and s.region is not None and not due
        self.last_round = s.region.round if s.region is not None and s.from_region else None
        self.last_ids, self.last_arm = ids, arm
        s.stats.steps += 1
        s.stats.examples_backpropagated += len(ids)
        self._between_steps = True
        batch = self._input.step_batch(s.stats.steps - 1, ids)
        if payoff is not None:
            payoff.step_ends(arm, self._overheads_s(), probe_s)
        return with_weights(batch, torch.from_numpy(weights.astype(np.float32)), self.config.weights_key)

    def _overheads_s(self) -> float:
        """Selection's overheads so far, seconds (embedding passes, fits, checks, waits for the service): the
        payoff charges them to selection wherever they fell."""
        s = self._state.stats
        return s.embed_s + s.fit_s + s.check_s + self._link.counters.wait_s

    def _payoff_step(self) -> float:
        """The payoff's part of a step's start: the probe loss when due (a decision may move training to the other
        arm), and a fresh round ahead of a selection segment while governed onto the control. Returns the probe's
        seconds."""
        payoff, s = self._payoff, self._state
        assert payoff is not None
        step, took = s.stats.steps, 0.0
        if payoff.probe_due(step):
            was = payoff.governor.arm
            decision, took = payoff.probe_step(step)
            if decision is not None:
                log.info("step %d: payoff %s; training on %s", step, decision.verdict, decision.arm)
                if was == "control" and decision.arm == "selection" and s.want_at is None and s.region is not None:
                    self._want_round()  # back from the control: the region held since is stale
        ahead = payoff.round_ahead(step, self.config.lookahead_steps)
        if ahead is not None and s.want_at is None and s.pending is None and not s.need_request:
            s.want_at, s.need_request = ahead, True
        return took

    def _forecast(self, step: int) -> np.ndarray | None:
        """This rank's ids at ``step`` as far as the schedule knows them (``_forecast.py``); None mid-step."""
        return self._forecaster(self._state, step) if self._between_steps and not self._closed else None

    def _forecast_pass(self, step: int) -> list[np.ndarray] | None:
        """This rank's chunks of the embedding pass due before ``step``'s batch, when known: the fixed rule's, once
        its round's plan is here (not with training_logits: the steps before the pass change which ids it embeds)."""
        if not self._between_steps or self._closed or self._rows is not None:
            return None
        plan = self._link.planned(min(self.controller.num_coresets, self.config.num_subsets))
        if plan is None or pass_step(self._state, self.controller, self._payoff, self.config.lookahead_steps) != step:
            return None
        ids = plan.ids if self._cache is None else plan.ids[self._cache.stale(plan.ids, step)]
        return self._passes.round_chunks(ids) if len(ids) else None

    def observe_logits(self, logits: torch.Tensor) -> None:
        """The training forward's logits of the batch yielded last (float (n, C), this rank's share): they refresh
        the embedding cache's rows of its examples, as if a round had embedded them at this step
        (``LoaderConfig.training_logits``). Call it after the forward pass and before the next batch; its cost is a
        softmax over the batch. Logits that are not of the batch's shape or not finite are refused and nothing is
        stored."""
        if self._rows is None:
            raise RuntimeError("observe_logits needs LoaderConfig(training_logits=True) and an embedding max age")
        s = self._state
        if not s.yielded:
            raise RuntimeError("observe_logits takes the logits of the batch yielded last; none was yielded yet")
        # Taken by the model before this batch's optimizer step.
        s.stats.training_rows += self._rows.observe(logits, self.last_ids, self.num_classes, s.stats.steps - 1)

    def _share_observed(self) -> None:
        """Under DDP, every rank's observed rows into every rank's cache (a collective with training_logits)."""
        if self._rows is not None:
            self._rows.share()

    def _uniform_batch(self) -> tuple[np.ndarray, np.ndarray]:
        """A uniformly sampled batch (weights 1); under DDP every rank draws the same one and keeps its share."""
        s = self._state
        if self.config.selection == "crest":
            s.stats.fallback_batches += 1
            if s.stats.regions == 0 and s.stats.fallback_batches in NO_CORESETS_AT:
                self._link.report_no_coresets(s.stats.fallback_batches)
        if s.want_at is not None and s.pending is not None:
            s.stats.late_steps += 1
        return s.uniform_batch(*self._place)

    # -- checkpointing ---------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The loader's and controller's state for the user's checkpoint (tensors and plain values only).

        A round in flight is first awaited (up to ``first_batch_timeout_s``) so that its coresets are saved
        with it: the service delivers a round once. So is the next round when it was started ahead (at the last
        switch): its plan is saved, as the service has started it. Exact resumption also needs the session to
        survive (close the interrupted loader with ``close(end_session=False)``, or not at all).

        Under DDP this is a collective (call it on every rank): rank 0's round in flight reaches every rank, and
        the state is then the same on every rank except ``stats`` (this rank's counters) and the round started
        ahead (rank 0's alone), so saving rank 0's is enough; each rank loads it and trains its own share. It
        loads under another world size too (the pool is dealt again), with other per-rank batches.
        """
        s = self._state
        if self._dist is not None and s.pending is not None:
            settled = self._on_main(self._main_settle)
            if settled is not None and s.pending is not None:
                s.pending.coresets, s.pending.ended = settled
        elif self._dist is None:
            self._main_settle()
        self._link.settle()  # a round started ahead (rank 0): its plan is saved, as the service has it
        self._share_observed()
        state = {**s.state_dict(), **self._link.state_dict(), "controller": self.controller.state_dict()}
        state["stats"] = asdict(self.stats)  # the link's counters with the loader's
        if self._payoff is not None:
            state["payoff"] = self._payoff.state_dict()
        if self._cache is not None:
            state["embedding_cache"] = self._cache.state_dict(s.stats.steps)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state_dict()``; call before iterating. Refuses another version or dataset."""
        if self._state.yielded or self._link.session is not None:
            raise RuntimeError("load_state_dict must be called on a fresh loader, before the first batch")
        state = on_cpu(state)
        loaded = LoaderState.from_state_dict(
            state,
            dataset_size=len(self.labels),
            seed=self.config.seed,
            batch_size=self.config.batch_size,
            world_size=1 if self._dist is None else self._dist.world_size,
        )
        if self._payoff is not None:
            # First: it validates its settings against this loader's before anything is loaded.
            self._payoff.resume(state.get("payoff"), loaded.stats.steps)
        self.controller.load_state_dict(state["controller"])
        if self._cache is not None and "embedding_cache" in state:  # absent: saved with the cache off
            self._cache.load_state_dict(state["embedding_cache"])
        self._state = loaded
        self._link.resume(state, loaded.stats.steps)
        self._input.resume(state["stats"], loaded.stats.steps)

    def close(self, end_session: bool = True) -> None:
        """Stop the stream thread and, unless ``end_session`` is False, close the session (idempotent)."""
        if self._closed:
            return
        self._closed = True
        try:
            self._input.close()
        finally:
            self._link.close(end_session)

    def __enter__(self) -> CoresetLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
