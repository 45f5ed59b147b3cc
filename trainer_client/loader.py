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
"""

from __future__ import annotations

import logging
import queue
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import grpc
import numpy as np
import torch
from numpy.typing import ArrayLike
from torch.utils.data import Dataset, default_collate

from trainer_client._stream import RoundStreamer, StreamBatch, StreamEnd, StreamItem, StreamJob
from trainer_client.batches import Embedder, ForwardFn, default_forward, last_linear, with_weights
from trainer_client.client import SelectionClient, SessionInfo
from trainer_client.embeddings import per_example_loss
from trainer_client.region import Decision, RegionConfig, RegionController

log = logging.getLogger(__name__)

STATE_VERSION = 1
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


class SelectionUnavailable(RuntimeError):
    """The service failed and ``strict`` forbids training on uniform batches."""


@dataclass(frozen=True, kw_only=True)
class LoaderConfig:
    """Selection settings sent to the service and how the loader schedules rounds."""

    # Coreset size m per random subset, and the training batch size.
    batch_size: int = 128
    # Random-subset size r as a fraction of the dataset (CREST: 1%).
    subset_fraction: float = 0.01
    # Random subsets per round in the service session: the cap on CREST's adaptive P (fixed per session; a
    # region uses the first min(P, this) coresets).
    num_subsets: int = 5
    # Facility-location kernel: "exp" (CREST) or "maxdist" (CRAIG).
    similarity: str = "exp"
    # Seeds the service's subset sampling, the loader's reshuffling and the Hutchinson probes.
    seed: int = 0
    # When a region ends: the CREST Taylor check by default (see region.py).
    region: RegionConfig = field(default_factory=RegionConfig)
    # Set to use the fixed rule instead: every region lasts this many steps (overrides region.mode).
    steps_per_round: int | None = None
    # Steps between asking for a round and switching to it: hides embedding and selection latency, at the cost
    # of selecting with a model that many steps older. 0 switches at once, as the released code does.
    lookahead_steps: int = 4
    # Selection feature: "logit_gradient" (C floats) or "last_layer_gradient" ((p - y) ⊗ [h, 1]).
    embedding: str = "logit_gradient"
    # Random-projection dimension of the last-layer gradient; 0 sends all C·(H+1) values.
    embedding_dim: int = 0
    # Check on a fixed seeded sample of this many of the round's random-subset ids; 0 uses them all (CREST).
    # The check costs one forward pass over them every interval steps: on a CPU this bounds its cost.
    check_examples: int = 0
    # Examples per no-grad forward pass when embedding a round or checking the region.
    embed_batch_size: int = 1024
    # Capacity of the prefetch queue, in batches; the stream thread blocks when it is full.
    queue_size: int = 32
    # Longest wait, in seconds, at a switch step for a late round before yielding a uniform batch instead.
    deadline_s: float = 2.0
    # The same for the first round of a run (nothing to train on before it), and for creating a session.
    first_batch_timeout_s: float = 60.0
    # Raise SelectionUnavailable / TimeoutError instead of falling back to uniform batches.
    strict: bool = False
    # Reconnection backoff after a service failure: first delay and cap, in seconds (doubling in between).
    reconnect_initial_s: float = 0.5
    reconnect_max_s: float = 30.0
    # Key of the weights in dict batches (tuple batches get them appended).
    weights_key: str = "weights"
    # Job name shown in the service's logs.
    client_name: str = "trainer"


@dataclass
class LoaderStats:
    """Counters of one loader; ``wait_s`` is time the training loop spent blocked on the service."""

    steps: int = 0
    examples_backpropagated: int = 0
    examples_embedded: int = 0
    rounds_started: int = 0
    regions: int = 0
    batches_received: int = 0
    checks: int = 0  # Taylor checks (forward passes on the round's random subsets)
    reselections: int = 0  # regions ended by a failed check (or by the fixed rule)
    late_steps: int = 0  # steps at which a due round had not arrived (each yields a fallback batch)
    fallback_batches: int = 0  # uniformly sampled batches (weights 1) yielded instead of coresets
    service_errors: int = 0
    sessions_opened: int = 0
    wait_s: float = 0.0
    embed_s: float = 0.0
    check_s: float = 0.0
    fit_s: float = 0.0


@dataclass
class _Region:
    round: int
    ids: np.ndarray  # int64 (n,) the pool: union of the used coresets
    weights: np.ndarray  # float32 (n,), mean 1
    check_ids: np.ndarray  # int64 (u,) union of the round's random subsets


@dataclass
class _Pending:
    round: int
    session_round: int
    check_ids: np.ndarray
    num_coresets: int
    requested_step: int
    coresets: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # subset -> (ids, weights)
    ended: bool = False

    @property
    def ready(self) -> bool:
        return all(i in self.coresets for i in range(self.num_coresets)) or (self.ended and bool(self.coresets))


class CoresetLoader:
    """Infinite iterator of weighted batches selected by the service.

    Yields ``(*batch, weights)`` for tuple/list batches (so ``(x, y, w)``) and ``{**batch, "weights": w}``
    for dict batches; weights are float32 (n,). Call ``state_dict`` after the optimizer step of the last
    batch.

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
        self.dataset, self.model, self.client = dataset, model, client
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
        self.session: SessionInfo | None = None
        self.last_ids = np.zeros(0, dtype=np.int64)  # ids of the batch yielded last
        self._rng = np.random.default_rng([cfg.seed, 1])
        self._fallback_rng = np.random.default_rng([cfg.seed, 2])
        self._streamer = RoundStreamer(client, cfg.queue_size)
        self._region: _Region | None = None
        self._pending: _Pending | None = None
        self._pass: list[tuple[np.ndarray, np.ndarray]] = []
        self._round = 0  # the loader's round counter; the session's is _session_round
        self._session_round = 0
        self._want_at: int | None = None  # step at which the next region is due
        self._need_request = False
        self._from_region = False  # the batch yielded last came from a region
        self._yielded = False
        self._backoff = 0.0
        self._next_attempt = 0.0
        self._closed = False

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
        self._drain()
        self._maybe_request()
        self._maybe_switch()
        due = self._want_at is not None and self.stats.steps >= self._want_at
        if self._region is not None and not due:
            ids, weights = self._region_batch()
        else:
            ids, weights = self._uniform_batch()
        self._from_region = self._region is not None and not due
        batch = self._fetch(ids)
        self.last_ids = ids
        self.stats.steps += 1
        self.stats.examples_backpropagated += len(ids)
        return with_weights(batch, torch.from_numpy(weights.astype(np.float32)), self.config.weights_key)

    def _fetch(self, ids: np.ndarray) -> Any:
        return self.collate_fn([self.dataset[int(i)] for i in ids])

    def _region_batch(self) -> tuple[np.ndarray, np.ndarray]:
        """Next (ids, weights) of the region: reshuffled passes over its pool."""
        assert self._region is not None
        if not self._pass:
            ids, weights = self._region.ids, self._region.weights
            perm = self._rng.permutation(len(ids))
            parts = np.array_split(perm, max(1, round(len(ids) / self.config.batch_size)))
            self._pass = [(ids[p], weights[p]) for p in reversed(parts)]
        return self._pass.pop()

    def _uniform_batch(self) -> tuple[np.ndarray, np.ndarray]:
        n = len(self.labels)
        ids = np.sort(self._fallback_rng.choice(n, size=min(self.config.batch_size, n), replace=False))
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
            true_loss = self._subset_loss(self._region.check_ids)
            result = self.controller.check(self._params(), true_loss, self.stats.steps)
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
    def _subset_loss(self, ids: np.ndarray) -> float:
        """Unweighted mean cross-entropy on ``ids`` (the round's random subsets), eval mode."""
        was_training = self.model.training
        self.model.eval()
        try:
            total = 0.0
            for batch in self._eval_batches(ids):
                logits, y = self.forward_fn(self.model, batch)
                total += float(per_example_loss(logits, y).sum())
        finally:
            self.model.train(was_training)
        return total / len(ids)

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
                    session.session_id, self._session_round, self.stats.steps, num_subsets=count
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
        if not self._need_request or self._pending is not None or time.monotonic() < self._next_attempt:
            return
        try:
            plan = self._start_round()
        except grpc.RpcError as exc:
            self._service_failed(exc, "starting a round")
            return
        assert self.session is not None
        self._backoff = 0.0
        start = time.perf_counter()
        emb, labels, losses = self._embed(plan.ids)
        self.stats.embed_s += time.perf_counter() - start
        self.stats.examples_embedded += len(plan.ids)
        self.stats.rounds_started += 1
        num = min(self.controller.num_coresets, plan.num_subsets)
        self._pending = _Pending(self._round, plan.round_id, plan.ids, num, self.stats.steps)
        self._streamer.submit(
            StreamJob(self._round, self.session.session_id, plan.round_id, plan.ids, emb, labels, losses)
        )
        log.info("step %d: round %d requested: %d ids embedded", self.stats.steps, self._round, len(plan.ids))
        self._round += 1
        self._session_round += 1
        self._need_request = False

    @torch.no_grad()
    def _embed(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
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
        return torch.cat(embs).numpy(), torch.cat(targets).numpy().astype(np.int64), torch.cat(losses).numpy()

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
        while True:
            try:
                self._handle(self._streamer.items.get_nowait())
            except queue.Empty:
                return

    def _wait_for_pending(self, timeout_s: float) -> bool:
        """Block until the pending round is ready, it fails, or ``timeout_s`` passes; True when ready."""
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

    def _maybe_switch(self) -> None:
        if self._want_at is None or self.stats.steps < self._want_at or self._pending is None:
            return
        p = self._pending
        if not p.ready and p.requested_step <= self._want_at and self.stats.steps == self._want_at:
            first = self.stats.regions == 0
            timeout = self.config.first_batch_timeout_s if first else self.config.deadline_s
            if not self._wait_for_pending(timeout):
                if self._pending is None:
                    return  # failed while waiting; already handled
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
        if p.ready:
            self._switch(p)

    def _switch(self, p: _Pending) -> None:
        used = sorted(p.coresets)[: p.num_coresets]
        ids = np.concatenate([p.coresets[i][0] for i in used])
        weights = np.concatenate([p.coresets[i][1] for i in used]).astype(np.float32)
        check_ids = p.check_ids
        k = self.config.check_examples
        if 0 < k < len(check_ids):
            check_ids = np.sort(
                np.random.default_rng([self.config.seed, 3, p.round]).choice(check_ids, k, replace=False)
            )
        self._region = _Region(p.round, ids, weights / weights.mean(), check_ids)
        self._pending, self._want_at, self._pass = None, None, []
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
        self._fit()

    # -- checkpointing -----------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The loader's and controller's state for the user's checkpoint (tensors and plain values only).

        A round in flight is first awaited (up to ``first_batch_timeout_s``) so that its coresets are saved
        with it: the service delivers a round once. Exact resumption also needs the session to survive (close
        the interrupted loader with ``close(end_session=False)``, or not at all).
        """
        p = self._pending
        if p is not None and not p.ready:
            self._wait_for_pending(self.config.first_batch_timeout_s)
            p = self._pending

        def t(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.array(a))  # a copy: arrays decoded from the wire are read-only

        return {
            "version": STATE_VERSION,
            "dataset_size": len(self.labels),
            "seed": self.config.seed,
            "batch_size": self.config.batch_size,
            "session": asdict(self.session) if self.session else None,
            "session_round": self._session_round,
            "round": self._round,
            "region": None
            if self._region is None
            else {
                "round": self._region.round,
                "ids": t(self._region.ids),
                "weights": t(self._region.weights),
                "check_ids": t(self._region.check_ids),
            },
            "pass": [(t(i), t(w)) for i, w in self._pass],
            "pending": None
            if p is None
            else {
                "round": p.round,
                "session_round": p.session_round,
                "check_ids": t(p.check_ids),
                "num_coresets": p.num_coresets,
                "requested_step": p.requested_step,
                "coresets": {k: (t(i), t(w)) for k, (i, w) in p.coresets.items()},
                "ready": p.ready,
            },
            "want_at": self._want_at,
            "need_request": self._need_request,
            "from_region": self._from_region,
            "yielded": self._yielded,
            "rng": self._rng.bit_generator.state,
            "fallback_rng": self._fallback_rng.bit_generator.state,
            "stats": asdict(self.stats),
            "controller": self.controller.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state_dict()``; call before iterating. Refuses another version or dataset."""
        if self._yielded or self.session is not None:
            raise RuntimeError("load_state_dict must be called on a fresh loader, before the first batch")
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state has version {state.get('version')!r}; this code reads {STATE_VERSION}")
        for key, mine in (
            ("dataset_size", len(self.labels)),
            ("seed", self.config.seed),
            ("batch_size", self.config.batch_size),
        ):
            if state[key] != mine:
                raise ValueError(f"loader state was saved with {key} {state[key]}; this loader has {mine}")
        self.controller.load_state_dict(state["controller"])
        r = state["region"]
        self._region = (
            None if r is None else _Region(r["round"], r["ids"].numpy(), r["weights"].numpy(), r["check_ids"].numpy())
        )
        self._pass = [(i.numpy(), w.numpy()) for i, w in state["pass"]]
        self._round, self._session_round = int(state["round"]), int(state["session_round"])
        self._want_at, self._need_request = state["want_at"], bool(state["need_request"])
        self._from_region, self._yielded = bool(state["from_region"]), bool(state["yielded"])
        self._rng.bit_generator.state = state["rng"]
        self._fallback_rng.bit_generator.state = state["fallback_rng"]
        self.stats = LoaderStats(**state["stats"])
        p = state["pending"]
        self._pending = None
        if p is not None and p["ready"]:
            coresets = {int(k): (i.numpy(), w.numpy()) for k, (i, w) in p["coresets"].items()}
            self._pending = _Pending(
                p["round"],
                p["session_round"],
                p["check_ids"].numpy(),
                p["num_coresets"],
                p["requested_step"],
                coresets,
                ended=True,
            )
        elif p is not None:
            log.warning("round %d was still in flight when saved; requesting a new one", p["round"])
            self._need_request = True
        self.session = self._adopt_session(state["session"])

    def _adopt_session(self, saved: dict[str, Any] | None) -> SessionInfo | None:
        """Keep the saved session when the service still has it at the saved round; else open a new one later."""
        if saved is None:
            return None
        session = SessionInfo(**saved)
        try:
            next_round = int(
                self.client.session_state(session.session_id, timeout_s=self.config.deadline_s).next_round_id
            )
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                log.warning(
                    "session %s is gone; resuming with a new session (different random subsets from now on)",
                    session.session_id,
                )
                return None
            log.warning(
                "could not reach %s to check session %s (%s); will retry",
                self.client.target,
                session.session_id,
                exc.code(),
            )
            return session
        if next_round != self._session_round:
            log.warning(
                "session %s is at round %d, the checkpoint at %d; resuming with a new session",
                session.session_id,
                next_round,
                self._session_round,
            )
            return None
        log.info("resumed session %s at round %d, step %d", session.session_id, next_round, self.stats.steps)
        return session

    def close(self, end_session: bool = True) -> None:
        """Stop the stream thread and, unless ``end_session`` is False, close the session (idempotent)."""
        if self._closed:
            return
        self._closed = True
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
