"""``CoresetLoader``: weighted mini-batch coresets from the selection service, as a PyTorch batch iterator.

The loop changes by a few lines::

    loader = CoresetLoader(dataset, model, SelectionClient("localhost:50051"), labels=labels)
    for step, (x, y, w) in zip(range(num_steps), loader):
        loss = weighted_loss(model(x), y, w)
        ...

Each *region* trains on the union of one round's coresets, reshuffled into batches every pass. A
``RegionController`` (``region.py``) ends the region: in CREST mode when the quadratic model of the coreset
loss stops predicting the loss on the round's random subsets, in fixed mode after a set number of steps. At
that step the loader asks the service for a round, embeds its candidate ids with the current model (one no-grad
forward pass), and a background thread streams them out and the weighted batches back. Training switches to
the new region exactly ``lookahead_steps`` later, waiting there (bounded by ``deadline_s``, counted in
``wait_s``) if the round is late, so for a seed the batches do not depend on timing and a resumed run continues
with the same batches.

Never blocking: when the round is not there by the deadline, or the service is unreachable or drops, the loader
yields uniformly sampled batches (weights 1, counted in ``fallback_batches``) and reconnects with exponential
backoff, opening a new session when the old one is gone. ``strict=True`` raises instead.

Under ``torch.distributed`` (detected when initialised with more than one rank; the single-process path is
unchanged otherwise) every rank builds the loader with the same arguments and iterates it in step. Rank 0 owns
the session and is the only one that talks to the service; the ranks embed disjoint shards of each round's
candidate ids and gather them to rank 0; rank 0's service events (a round started, a failure, coresets ready at
a switch, a late round) are broadcast, so every rank switches regions, falls back and reconnects at the same
steps. Each region's pool is dealt between ranks (``distributed.owners``), so no id reaches two ranks in one
round, and every step's global batch (about ``batch_size`` examples) is the union of the ranks' batches. The
Taylor check sums the loss over per-rank shards of the check ids (and averages the prediction), so every rank
takes the same decision. The quadratic model is fitted on the whole pool on every rank (identical weights
under DDP give identical fits; rank 0's interval is broadcast to make sure). See ``state_dict`` for
checkpoints and the README for what the world size changes.
"""

from __future__ import annotations

import logging
import queue
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import grpc
import numpy as np
import torch
from numpy.typing import ArrayLike
from torch.utils.data import Dataset, default_collate

from trainer_client import _loader_state
from trainer_client._loader_state import PendingRound, Region
from trainer_client._stream import RoundStreamer, StreamBatch, StreamEnd, StreamItem, StreamJob
from trainer_client.batches import Embedder, ForwardFn, default_forward, last_linear, with_weights
from trainer_client.client import RoundPlan, SelectionClient, SessionInfo
from trainer_client.difficulty import RoundDifficulty, round_difficulty
from trainer_client.distributed import DistContext, owners
from trainer_client.embeddings import per_example_loss
from trainer_client.loader_config import LoaderConfig, LoaderStats, SelectionUnavailable
from trainer_client.region import Decision, RegionController

log = logging.getLogger(__name__)

__all__ = ["CoresetLoader", "LoaderConfig", "LoaderStats", "SelectionUnavailable"]

# Service errors the loader rides out on uniform batches; anything else (a bad argument, auth) is a bug to raise.
RECOVERABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}


class CoresetLoader:
    """Infinite iterator of weighted batches selected by the service.

    Yields ``(*batch, weights)`` for tuple/list batches (so ``(x, y, w)``) and ``{**batch, "weights": w}``
    for dict batches; weights are float32 (n,). Call ``state_dict`` after the optimizer step of the last
    batch. ``difficulty`` lists, per region this loader switched to, how hard its coresets were against the
    round's random subsets (``RoundDifficulty``, from the embedding pass's losses; not kept in checkpoints).

    Under DDP, initialise ``torch.distributed`` before building the loader (it looks at the default group
    then), build it on every rank with the same arguments, and take the same number of batches on every rank;
    each rank receives its own share (about ``batch_size / world_size`` examples) of every step's batch.

    Args:
        dataset: map-style dataset; ``dataset[i]`` is collated by ``collate_fn``.
        model: the model being trained (run in eval mode for embeddings, checks and the quadratic model).
        client: a ``SelectionClient``; the session is opened lazily, so the service may be down at start.
        labels: int (N,) label of every example, in dataset order.
        num_classes: C; 0 means max(labels) + 1.
        config: selection and scheduling settings.
        collate_fn: turns a list of samples into a batch.
        forward_fn: ``(model, batch) -> (logits (n, C), targets (n,))``; needed for dict or other batches.
        last_layer: the classifier's ``nn.Linear`` for the last-layer embedding; default: the model's last.
    """

    def __init__(
        self,
        dataset: Dataset,
        model: torch.nn.Module,
        client: SelectionClient,
        labels: ArrayLike,
        *,
        num_classes: int = 0,
        config: LoaderConfig | None = None,
        collate_fn: Callable[[list[Any]], Any] = default_collate,
        forward_fn: ForwardFn = default_forward,
        last_layer: torch.nn.Linear | None = None,
    ) -> None:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            # Embedding, checks and the quadratic model run the replica directly: no gradient sync for them.
            model = model.module
        self.dataset, self.model, self.client = dataset, model, client
        self._dist = DistContext.detect()
        self.config = cfg = config or LoaderConfig()
        self.labels = np.asarray(labels, dtype=np.int64)
        self.num_classes = num_classes or int(self.labels.max()) + 1
        self.collate_fn, self.forward_fn = collate_fn, forward_fn
        layer = None
        if cfg.embedding == "last_layer_gradient":
            layer = last_layer or last_linear(model)
        self.embedder = Embedder(cfg.embedding, layer, cfg.embedding_dim, cfg.seed)
        region = cfg.region
        if cfg.steps_per_round is not None:
            region = replace(region, mode="fixed", fixed_steps=max(1, cfg.steps_per_round - cfg.lookahead_steps))
        self.controller = RegionController(replace(region, seed=cfg.seed), max_coresets=cfg.num_subsets)
        self.stats = LoaderStats()
        self.difficulty: list[RoundDifficulty] = []
        self.session: SessionInfo | None = None
        self.last_ids = np.zeros(0, dtype=np.int64)  # ids of the batch yielded last (this rank's share)
        self.last_round: int | None = None  # loader round of the region it came from; None for a uniform batch
        self._rng = np.random.default_rng([cfg.seed, 1])
        self._fallback_rng = np.random.default_rng([cfg.seed, 2])
        # Only the rank that talks to the service streams.
        self._streamer = RoundStreamer(client, cfg.queue_size) if self._is_main else None
        self._region: Region | None = None
        self._pending: PendingRound | None = None
        self._pass_perm: np.ndarray | None = None  # int64 (n,) this pass's order of the pool positions
        self._pass_next = 0  # next batch of the pass
        self._round = 0  # the loader's round counter; the session's is _session_round
        self._session_round = 0
        self._want_at: int | None = None  # step at which the next region is due
        self._need_request = False
        self._from_region = False  # the batch yielded last came from a region
        self._yielded = False
        self._backoff = 0.0
        self._next_attempt = 0.0
        self._closed = False

    @property
    def _is_main(self) -> bool:
        return self._dist is None or self._dist.is_main

    # -- the iterator ----------------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[Any]:
        while not self._closed:
            yield self._next()

    def _next(self) -> Any:
        if self._yielded:
            self._after_step()
        elif self._region is None and self._pending is None and self._want_at is None:
            self._want_round()
        self._yielded = True
        if self._dist is None:
            self._drain()
            self._maybe_request()
            p = self._switch_candidate()
            if p is not None:
                self._switch(p)
        else:
            self._follow_service()
        due = self._want_at is not None and self.stats.steps >= self._want_at
        if self._region is not None and not due:
            ids, weights = self._region_batch()
        else:
            ids, weights = self._uniform_batch()
        self._from_region = self._region is not None and not due
        self.last_round = self._region.round if self._region is not None and self._from_region else None
        batch = self._fetch(ids)
        self.last_ids = ids
        self.stats.steps += 1
        self.stats.examples_backpropagated += len(ids)
        return with_weights(batch, torch.from_numpy(weights.astype(np.float32)), self.config.weights_key)

    def _fetch(self, ids: np.ndarray) -> Any:
        return self.collate_fn([self.dataset[int(i)] for i in ids])

    def _batches_per_pass(self, region: Region) -> int:
        """Batches in one pass over the pool: about ``batch_size`` examples a step over all ranks, and never
        more than the smallest rank share (no rank gets an empty batch)."""
        n = max(1, round(len(region.ids) / self.config.batch_size))
        if self._dist is not None:
            shares = np.bincount(region.owner, minlength=self._dist.world_size)
            n = min(n, max(1, int(shares.min())))
        return n

    def _region_batch(self) -> tuple[np.ndarray, np.ndarray]:
        """Next (ids, weights) of the region: reshuffled passes over its pool, this rank's share of each batch.

        Every rank draws the same permutation of the pool positions (so the RNG state stays the same on every
        rank), keeps the positions it owns in that order and cuts them into the same number of batches.
        """
        region = self._region
        assert region is not None
        parts = self._batches_per_pass(region)
        if self._pass_perm is None or self._pass_next >= parts:
            self._pass_perm, self._pass_next = self._rng.permutation(len(region.ids)), 0
        perm = self._pass_perm
        if self._dist is not None:
            perm = perm[region.owner[perm] == self._dist.rank]
        take = np.array_split(perm, parts)[self._pass_next]
        self._pass_next += 1
        return region.ids[take], region.weights[take]

    def _uniform_batch(self) -> tuple[np.ndarray, np.ndarray]:
        """A uniformly sampled batch (weights 1); under DDP every rank draws the same one and keeps its share."""
        n = len(self.labels)
        ids = np.sort(self._fallback_rng.choice(n, size=min(self.config.batch_size, n), replace=False))
        if self._dist is not None:
            ids = ids[self._dist.rank :: self._dist.world_size]
        self.stats.fallback_batches += 1
        if self._want_at is not None and self._pending is not None:
            self.stats.late_steps += 1
        return ids.astype(np.int64), np.ones(len(ids), dtype=np.float32)

    # -- region control --------------------------------------------------------------------------------------

    def _params(self) -> list[torch.Tensor]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def _want_round(self) -> None:
        self._want_at = self.stats.steps + (self.config.lookahead_steps if self._region is not None else 0)
        self._need_request = True

    def _after_step(self) -> None:
        """The optimizer has taken the step of the batch yielded last: count it and run what is due."""
        if not self._from_region or self._region is None:
            return
        decision = self.controller.after_step()
        if self._want_at is not None:
            return  # already moving to the next region
        if decision == Decision.CHECK:
            start = time.perf_counter()
            true_loss, predicted = self._check_values(self._region.check_ids)
            result = self.controller.check(self._params(), true_loss, self.stats.steps, predicted)
            self.stats.check_s += time.perf_counter() - start
            self.stats.checks += 1
            if result.reselect:
                self.stats.reselections += 1
                self._want_round()
        elif decision == Decision.RESELECT:
            log.info("step %d: region %d reached its fixed length", self.stats.steps, self._region.round)
            self.stats.reselections += 1
            self._want_round()

    def _eval_batches(self, ids: np.ndarray) -> Iterator[Any]:
        for lo in range(0, len(ids), self.config.embed_batch_size):
            yield self._fetch(ids[lo : lo + self.config.embed_batch_size])

    @torch.no_grad()
    def _loss_sum(self, ids: np.ndarray) -> float:
        """Summed unweighted cross-entropy on ``ids`` (some of the round's random-subset ids), eval mode."""
        was_training = self.model.training
        self.model.eval()
        try:
            total = 0.0
            for batch in self._eval_batches(ids):
                logits, y = self.forward_fn(self.model, batch)
                total += float(per_example_loss(logits, y).sum())
        finally:
            self.model.train(was_training)
        return total

    def _check_values(self, ids: np.ndarray) -> tuple[float, float | None]:
        """(true mean loss on ``ids``, prediction or None to let the controller compute it).

        Under DDP each rank evaluates its shard of ``ids``; one all-reduce sums the losses, the counts and the
        ranks' predictions, so every rank ends with the same mean loss and the same (mean) prediction.
        """
        if self._dist is None:
            return self._loss_sum(ids) / len(ids), None
        lo, hi = self._dist.shard_bounds(len(ids))
        local = [self._loss_sum(ids[lo:hi]), float(hi - lo), self.controller.predict(self._params())]
        total, count, predicted = self._dist.all_reduce_sum(local)
        return float(total / count), float(predicted / self._dist.world_size)

    def _fit(self) -> None:
        """Fit the quadratic model on the new region's weighted pool (eval mode: no BN side effects)."""
        assert self._region is not None
        if self.controller.config.mode == "fixed":
            self.controller.start_region()  # the fixed rule needs no model: skip the Hessian estimate
            return
        region, bs = self._region, self.config.batch_size

        def batches() -> Iterator[tuple[torch.Tensor, int]]:
            for lo in range(0, len(region.ids), bs):
                logits, y = self.forward_fn(self.model, self._fetch(region.ids[lo : lo + bs]))
                w = torch.from_numpy(region.weights[lo : lo + bs]).to(logits.device)
                ce = torch.nn.functional.cross_entropy(logits.float(), y, reduction="none")
                yield (ce * w).mean(), len(y)

        start = time.perf_counter()
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.enable_grad():
                self.controller.fit(self._params(), batches(), self.stats.steps)
        except NotImplementedError as exc:
            raise NotImplementedError(
                f"the CREST quadratic model needs a double backward through {type(self.model).__name__} ({exc}); "
                "use the fixed rule (LoaderConfig(steps_per_round=...)) for this model"
            ) from exc
        finally:
            self.model.train(was_training)
        self.stats.fit_s += time.perf_counter() - start
        if self._dist is not None:
            # Identical replicas give identical fits; rank 0's schedule is broadcast anyway, because ranks that
            # disagreed on when to check would stop meeting in the check's all-reduce.
            ctl = self.controller
            mine = (ctl.interval, ctl.num_coresets)
            ctl.interval, ctl.num_coresets = theirs = self._dist.broadcast_object(mine)
            if theirs != mine:
                log.warning(
                    "rank %d: the quadratic model gave interval/coresets %s, rank 0 %s; following rank 0",
                    self._dist.rank,
                    mine,
                    theirs,
                )

    # -- talking to the service --------------------------------------------------------------------------------

    def _open_session(self) -> SessionInfo:
        cfg = self.config
        self.session = self.client.create_session(
            self.labels,
            num_classes=self.num_classes,
            subset_fraction=cfg.subset_fraction,
            num_subsets=cfg.num_subsets,
            batch_size=cfg.batch_size,
            similarity=cfg.similarity,
            seed=cfg.seed,
            client_name=cfg.client_name,
            embedding_kind=cfg.embedding,
            embedding_dim=self.embedder.dim(self.num_classes),
            drop_learned=cfg.drop_learned,
            timeout_s=cfg.first_batch_timeout_s,
        )
        self._session_round = 0
        self.stats.sessions_opened += 1
        log.info("session %s opened at %s (step %d)", self.session.session_id, self.client.target, self.stats.steps)
        return self.session

    def _start_round(self) -> Any:
        for _ in range(3):
            session = self.session or self._open_session()
            try:
                # Only the coresets this region will use are drawn, embedded and selected.
                count = min(self.controller.num_coresets, self.config.num_subsets)
                return self.client.start_round(
                    session.session_id,
                    self._session_round,
                    self.stats.steps,
                    num_subsets=count,
                    trainer_wait_s=self.stats.wait_s,  # reported for the service's metrics
                )
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.NOT_FOUND:
                    log.warning("session %s is gone (%s); opening a new one", session.session_id, exc.details())
                    self.session = None
                elif exc.code() in (grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.FAILED_PRECONDITION):
                    self._session_round = int(self.client.session_state(session.session_id).next_round_id)
                else:
                    raise
        raise SelectionUnavailable(f"could not start a round at {self.client.target} after reopening the session")

    def _service_failed(self, exc: BaseException, doing: str) -> None:
        code = exc.code() if isinstance(exc, grpc.RpcError) else None
        if code not in RECOVERABLE:
            raise exc
        self.stats.service_errors += 1
        if self.config.strict:
            raise SelectionUnavailable(
                f"selection service at {self.client.target} failed while {doing}: {code}: {exc}"
            ) from exc
        self._pending, self._need_request = None, True
        self._backoff = min(max(2 * self._backoff, self.config.reconnect_initial_s), self.config.reconnect_max_s)
        self._next_attempt = time.monotonic() + self._backoff
        log.warning(
            "step %d: selection service at %s failed while %s (%s); training on uniform batches, retrying in %.1f s",
            self.stats.steps,
            self.client.target,
            doing,
            code,
            self._backoff,
        )

    def _maybe_request(self) -> None:
        plan = self._request_plan()
        if plan is not None:
            self._begin_round(plan)

    def _request_plan(self) -> RoundPlan | None:
        """Start a round on the service when one is wanted and the backoff allows (rank 0 only)."""
        if not self._need_request or self._pending is not None or time.monotonic() < self._next_attempt:
            return None
        try:
            plan = self._start_round()
        except grpc.RpcError as exc:
            self._service_failed(exc, "starting a round")
            return None
        self._backoff = 0.0
        return plan

    def _begin_round(self, plan: RoundPlan) -> None:
        """Embed the round's ids (sharded over the ranks under DDP) and hand them to the stream thread."""
        start = time.perf_counter()
        emb, labels, losses = self._embed_round(plan.ids)
        self.stats.embed_s += time.perf_counter() - start
        self.stats.rounds_started += 1
        num = min(self.controller.num_coresets, plan.num_subsets)
        self._pending = PendingRound(self._round, plan.round_id, plan.ids, num, self.stats.steps, losses=losses)
        if self._streamer is not None:
            assert self.session is not None
            self._streamer.submit(
                StreamJob(self._round, self.session.session_id, plan.round_id, plan.ids, emb, labels, losses)
            )
        log.info("step %d: round %d requested: %d ids embedded", self.stats.steps, self._round, len(plan.ids))
        self._round += 1
        self._session_round += 1
        self._need_request = False

    def _embed_round(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(embeddings float32 (n, d), targets int64 (n,), losses float32 (n,)) of the round's ``ids`` (n,).

        Under DDP each rank embeds its contiguous shard with its replica and one all-gather of
        [embedding, target, loss] rows (float32; targets are exact below 2**24) gives rank 0 all of them.
        """
        if self._dist is None:
            self.stats.examples_embedded += len(ids)
            return self._embed(ids)
        lo, hi = self._dist.shard_bounds(len(ids))
        emb, targets, losses = self._embed(ids[lo:hi])
        self.stats.examples_embedded += hi - lo
        rows = np.concatenate([emb, targets[:, None], losses[:, None]], axis=1, dtype=np.float32)
        full = self._dist.gather_rows(rows, len(ids))
        return np.ascontiguousarray(full[:, :-2]), full[:, -2].astype(np.int64), np.ascontiguousarray(full[:, -1])

    @torch.no_grad()
    def _embed(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if len(ids) == 0:  # a DDP rank's shard of a round smaller than the world
            dim = self.embedder.dim(self.num_classes)
            return np.zeros((0, dim), np.float32), np.zeros(0, np.int64), np.zeros(0, np.float32)
        was_training = self.model.training
        self.model.eval()
        embs, targets, losses = [], [], []
        try:
            for batch in self._eval_batches(ids):
                emb, y, logits = self.embedder(self.model, batch, self.forward_fn)
                embs.append(emb.cpu())
                losses.append(per_example_loss(logits, y).cpu())
                targets.append(y.cpu())
        finally:
            self.model.train(was_training)
        return (
            torch.cat(embs).float().numpy(),
            torch.cat(targets).numpy().astype(np.int64),
            torch.cat(losses).float().numpy(),
        )

    def _handle(self, item: StreamItem) -> None:
        p = self._pending
        if p is None or item.round != p.round:
            return  # a round given up on
        if isinstance(item, StreamBatch):
            p.coresets[item.batch.subset_index] = (item.batch.ids, item.batch.weights)
            self.stats.batches_received += 1
        elif isinstance(item, StreamEnd):
            p.ended = True
        else:
            self._service_failed(item.error, f"streaming round {p.round}")

    def _drain(self) -> None:
        assert self._streamer is not None, "only rank 0 streams"
        while True:
            try:
                self._handle(self._streamer.items.get_nowait())
            except queue.Empty:
                return

    def _wait_for_pending(self, timeout_s: float) -> bool:
        """Block until the pending round is ready, it fails, or ``timeout_s`` passes; True when ready."""
        assert self._streamer is not None, "only rank 0 streams"
        start = time.perf_counter()
        deadline = start + timeout_s
        try:
            while (p := self._pending) is not None and not p.ready:
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    return False
                try:
                    self._handle(self._streamer.items.get(timeout=remaining))
                except queue.Empty:
                    return False
            return self._pending is not None
        finally:
            self.stats.wait_s += time.perf_counter() - start

    def _switch_due(self) -> bool:
        return self._want_at is not None and self.stats.steps >= self._want_at and self._pending is not None

    def _switch_candidate(self) -> PendingRound | None:
        """The pending round when training should switch to it now, waiting for it at the switch step."""
        if not self._switch_due():
            return None
        p = self._pending
        assert p is not None and self._want_at is not None
        if not p.ready and p.requested_step <= self._want_at and self.stats.steps == self._want_at:
            first = self.stats.regions == 0
            timeout = self.config.first_batch_timeout_s if first else self.config.deadline_s
            if not self._wait_for_pending(timeout):
                if self._pending is None:
                    return None  # failed while waiting; already handled
                if self.config.strict:
                    raise TimeoutError(
                        f"round {p.round} from {self.client.target} not ready within {timeout:.1f} s at step "
                        f"{self.stats.steps} ({len(p.coresets)}/{p.num_coresets} coresets arrived)"
                    )
                log.warning(
                    "step %d: round %d late after %.1f s; uniform batches until it arrives",
                    self.stats.steps,
                    p.round,
                    timeout,
                )
        return p if p.ready and self._pending is p else None

    def _switch(self, p: PendingRound) -> None:
        used = sorted(p.coresets)[: p.num_coresets]
        ids = np.concatenate([p.coresets[i][0] for i in used])
        weights = np.concatenate([p.coresets[i][1] for i in used]).astype(np.float32)
        check_ids = p.check_ids
        k = self.config.check_examples
        if 0 < k < len(check_ids):
            check_ids = np.sort(
                np.random.default_rng([self.config.seed, 3, p.round]).choice(check_ids, k, replace=False)
            )
        world = 1 if self._dist is None else self._dist.world_size
        owner = owners(ids, world, self.config.seed, p.round)
        self._region = Region(p.round, ids, weights / weights.mean(), check_ids, owner)
        self._pending, self._want_at, self._pass_perm, self._pass_next = None, None, None, 0
        self.stats.regions += 1
        log.info(
            "step %d: region %d: %d coresets, %d examples; checks on %d of %d random-subset ids",
            self.stats.steps,
            p.round,
            len(used),
            len(ids),
            len(check_ids),
            len(p.check_ids),
        )
        if p.losses is not None:
            d = round_difficulty(p.round, p.requested_step, self.stats.steps, p.check_ids, p.losses, ids, weights)
            self.difficulty.append(d)
            log.info(
                "region %d: selected loss %.3f (weighted %.3f) against %.3f for the round's ids; percentile %.2f",
                p.round,
                d.selected_loss,
                d.selected_loss_weighted,
                d.embedded_loss,
                d.selected_percentile,
            )
        self._fit()

    # -- DDP: rank 0 talks to the service, every rank follows ----------------------------------------------

    def _follow_service(self) -> None:
        """The DDP version of drain / request / switch. Collective, but only while a round is wanted or in flight
        (the same condition on every rank): inside a region with nothing pending, steps need no communication."""
        if self._pending is None and not self._need_request:
            return
        plan = self._on_main(self._main_request)
        if plan is not None:
            self._begin_round(plan)
        if self._switch_due():
            coresets = self._on_main(self._main_switch)
            if coresets is not None:
                p = self._pending
                assert p is not None
                p.coresets, p.ended = coresets, True
                self._switch(p)

    def _main_request(self) -> RoundPlan | None:
        self._drain()
        return self._request_plan()

    def _main_switch(self) -> dict[int, tuple[np.ndarray, np.ndarray]] | None:
        p = self._switch_candidate()
        return None if p is None else dict(p.coresets)

    def _main_settle(self) -> tuple[dict[int, tuple[np.ndarray, np.ndarray]], bool] | None:
        p = self._pending
        if p is not None and not p.ready:
            self._wait_for_pending(self.config.first_batch_timeout_s)
            p = self._pending
        return None if p is None else (dict(p.coresets), p.ended)

    def _control(self) -> dict[str, Any]:
        """Rank 0's service state that the other ranks mirror (small: no coresets, no embeddings)."""
        return {
            "pending": None if self._pending is None else self._pending.round,
            "need_request": self._need_request,
            "session": self.session,
            "session_round": self._session_round,
            "service_errors": self.stats.service_errors,
            "sessions_opened": self.stats.sessions_opened,
        }

    def _on_main(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on rank 0 and broadcast its result with rank 0's service state; every rank returns the
        result. An exception on rank 0 (strict mode, a bug) is raised there and, as SelectionUnavailable, on
        every other rank, so no rank is left waiting in a collective."""
        assert self._dist is not None
        start = time.perf_counter()
        result: Any = None
        error: BaseException | None = None
        if self._dist.is_main:
            try:
                result = fn()
            except BaseException as exc:  # re-raised below, after the other ranks have heard of it
                error = exc
        message = self._dist.broadcast_object(
            {
                "result": result,
                "control": self._control(),
                "error": None if error is None else f"{type(error).__name__}: {error}",
            }
        )
        if error is not None:
            raise error
        if message["error"] is not None:
            raise SelectionUnavailable(f"rank 0 stopped the selection loop: {message['error']}")
        if not self._dist.is_main:
            c = message["control"]
            if c["pending"] is None:
                self._pending = None
            elif self._pending is None or self._pending.round != c["pending"]:
                raise RuntimeError(
                    f"rank {self._dist.rank} lost step with rank 0: rank 0 is waiting for round {c['pending']}, "
                    f"this rank for {None if self._pending is None else self._pending.round}"
                )
            self._need_request, self.session, self._session_round = c["need_request"], c["session"], c["session_round"]
            self.stats.service_errors, self.stats.sessions_opened = c["service_errors"], c["sessions_opened"]
            self.stats.wait_s += time.perf_counter() - start  # time rank 0 spent on the service, waited for here
        return message["result"]

    # -- checkpointing (trainer_client/_loader_state.py) -------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The loader's and controller's state for the user's checkpoint (tensors and plain values only).

        A round in flight is first awaited (up to ``first_batch_timeout_s``) so that its coresets are saved
        with it: the service delivers a round once. Exact resumption also needs the session to survive (close
        the interrupted loader with ``close(end_session=False)``, or not at all).

        Under DDP this is a collective (call it on every rank): rank 0's round in flight reaches every rank, and
        the state is then the same on every rank except ``stats`` (this rank's counters), so saving rank 0's is
        enough; each rank loads it and trains its own share. It loads under another world size too (the pool
        is dealt again), with other per-rank batches.
        """
        return _loader_state.save(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state_dict()``; call before iterating. Refuses another version or dataset."""
        _loader_state.load(self, state)

    def close(self, end_session: bool = True) -> None:
        """Stop the stream thread and, unless ``end_session`` is False, close the session (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if self._streamer is None:  # a DDP rank other than 0: the session is rank 0's to close
            return
        self._streamer.stopping.set()
        try:
            if end_session and self.session is not None:
                self.client.close_session(self.session.session_id, timeout_s=self.config.deadline_s)
        except grpc.RpcError as exc:
            if self.config.strict and exc.code() != grpc.StatusCode.NOT_FOUND:
                raise
            log.warning("could not close session %s: %s", self.session.session_id if self.session else "", exc.code())
        finally:
            self._streamer.stop()

    def __enter__(self) -> CoresetLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
