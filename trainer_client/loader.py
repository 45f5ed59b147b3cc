"""``CoresetLoader``: weighted mini-batch coresets from the selection service, as a PyTorch batch iterator.

The loop changes by a few lines::

    loader = CoresetLoader(dataset, model, SelectionClient("localhost:50051"), labels=labels)
    for step, (x, y, w) in zip(range(num_steps), loader):
        loss = weighted_loss(model(x), y, w)
        ...

Each *region* trains on the union of one round's P coresets, reshuffled into batches every pass. The next
round is requested ``lookahead_steps`` before the region ends: the trainer embeds its ids (one no-grad
forward pass) and a background thread streams them to the service and the weighted batches back into a
bounded queue. Training switches to the new region when its first coreset has arrived and keeps cycling the
current one until then, so it only ever waits for the very first round.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from numpy.typing import ArrayLike
from torch.utils.data import Dataset, default_collate

from trainer_client.client import RoundPlan, SelectionClient, WeightedBatch
from trainer_client.embeddings import logit_gradient, per_example_loss

log = logging.getLogger(__name__)

ForwardFn = Callable[[torch.nn.Module, Any], tuple[torch.Tensor, torch.Tensor]]


def default_forward(model: torch.nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and targets of an ``(inputs, targets)`` batch, on the model's device."""
    device = next(model.parameters()).device
    inputs, targets = batch[0], batch[1]
    return model(inputs.to(device)), targets.to(device)


@dataclass(frozen=True, kw_only=True)
class LoaderConfig:
    """Selection settings sent to the service and how the loader schedules rounds."""

    # Coreset size m per random subset, and the training batch size.
    batch_size: int = 128
    # Random-subset size r as a fraction of the dataset (CREST: 1%).
    subset_fraction: float = 0.01
    # P, random subsets (so coresets) per round (CREST starts at 5).
    num_subsets: int = 5
    # Facility-location kernel: "exp" (CREST) or "maxdist" (CRAIG).
    similarity: str = "exp"
    # Seeds the service's subset sampling and the loader's reshuffling.
    seed: int = 0
    # Simple reselection rule: a region lasts this many optimizer steps (more if the next is late).
    steps_per_round: int = 50
    # Request and embed the next round this many steps before the region ends, to hide its latency.
    lookahead_steps: int = 10
    # Examples per no-grad forward pass when embedding a round.
    embed_batch_size: int = 1024
    # Capacity of the prefetch queue, in batches; the stream thread blocks when it is full.
    queue_size: int = 32
    # Longest wait for the first round's first batch before giving up, in seconds.
    first_batch_timeout_s: float = 300.0
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
    late_steps: int = 0  # steps beyond steps_per_round because the next round had not arrived
    wait_s: float = 0.0
    embed_s: float = 0.0


@dataclass
class _Region:
    round_id: int
    coresets: list[WeightedBatch] = field(default_factory=list)
    steps: int = 0
    done: bool = False  # every batch of the round has arrived
    retired: bool = False  # training moved on; dropped once its last batch has arrived


@dataclass(frozen=True)
class _Job:
    plan: RoundPlan
    embeddings: np.ndarray
    labels: np.ndarray
    losses: np.ndarray


@dataclass(frozen=True)
class _RoundEnd:
    round_id: int


class CoresetLoader:
    """Infinite iterator of ``(inputs, targets, weights)`` batches selected by the service.

    Args:
        dataset: map-style dataset; ``dataset[i]`` is collated by ``collate_fn``.
        model: the model being trained (used, under no_grad in eval mode, to embed candidates).
        client: a connected ``SelectionClient``.
        labels: int (N,) label of every example, in dataset order.
        num_classes: C; 0 means max(labels) + 1.
        config: selection and scheduling settings.
        collate_fn: turns a list of samples into a batch.
        forward_fn: ``(model, batch) -> (logits, targets)``; the default takes ``batch[0]``, ``batch[1]``.
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
    ) -> None:
        self.dataset, self.model, self.client = dataset, model, client
        self.config = config or LoaderConfig()
        self.labels = np.asarray(labels, dtype=np.int64)
        self.collate_fn, self.forward_fn = collate_fn, forward_fn
        self.stats = LoaderStats()
        self.session = client.create_session(
            self.labels,
            num_classes=num_classes,
            subset_fraction=self.config.subset_fraction,
            num_subsets=self.config.num_subsets,
            batch_size=self.config.batch_size,
            similarity=self.config.similarity,
            seed=self.config.seed,
            client_name=self.config.client_name,
        )
        self._rng = np.random.default_rng(self.config.seed)
        self._batches: queue.Queue[WeightedBatch | _RoundEnd | BaseException] = queue.Queue(self.config.queue_size)
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._stream_rounds, name="crest-stream", daemon=True)
        self._thread.start()
        self._regions: dict[int, _Region] = {}
        self._current: _Region | None = None
        self._next_round = 0
        self._pass: list[tuple[np.ndarray, np.ndarray]] = []
        self._closed = False

    # -- background thread ----------------------------------------------------------------------------------

    def _stream_rounds(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                sid, rid = self.session.session_id, job.plan.round_id
                self.client.submit_embeddings(sid, rid, job.plan.ids, job.embeddings, job.labels, job.losses)
                for batch in self.client.stream_batches(sid, rid):
                    self._batches.put(batch)
                self._batches.put(_RoundEnd(rid))
            except BaseException as exc:  # handed to the training loop, which re-raises it
                self._batches.put(exc)
                return

    # -- training-loop side ---------------------------------------------------------------------------------

    def _request_round(self) -> None:
        """Open the next round, embed its ids with the current model, and queue it for streaming."""
        plan = self.client.start_round(self.session.session_id, self._next_round, self.stats.steps)
        start = time.perf_counter()
        emb, labels, losses = self._embed(plan.ids)
        self.stats.embed_s += time.perf_counter() - start
        self.stats.examples_embedded += len(plan.ids)
        self.stats.rounds_started += 1
        self._regions[plan.round_id] = _Region(plan.round_id)
        self._next_round += 1
        self._jobs.put(_Job(plan, emb, labels, losses))

    @torch.no_grad()
    def _embed(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        was_training = self.model.training
        self.model.eval()
        embs, targets, losses = [], [], []
        try:
            for lo in range(0, len(ids), self.config.embed_batch_size):
                chunk = ids[lo : lo + self.config.embed_batch_size]
                logits, y = self.forward_fn(self.model, self._fetch(chunk))
                embs.append(logit_gradient(logits, y).cpu())
                losses.append(per_example_loss(logits, y).cpu())
                targets.append(y.cpu())
        finally:
            self.model.train(was_training)
        return (torch.cat(embs).numpy(), torch.cat(targets).numpy().astype(np.int64), torch.cat(losses).numpy())

    def _fetch(self, ids: np.ndarray) -> Any:
        return self.collate_fn([self.dataset[int(i)] for i in ids])

    def _take(self, block: bool) -> None:
        """Move arrived batches from the queue into their regions; with ``block``, wait for one item."""
        deadline = time.perf_counter() + self.config.first_batch_timeout_s
        while True:
            try:
                if block:
                    remaining = deadline - time.perf_counter()
                    item = self._batches.get(timeout=max(remaining, 0.0))
                else:
                    item = self._batches.get_nowait()
            except queue.Empty:
                if block:
                    raise TimeoutError(
                        f"no batch from the selection service at {self.client.target} within "
                        f"{self.config.first_batch_timeout_s:.0f} s"
                    ) from None
                return
            if isinstance(item, BaseException):
                raise item
            if isinstance(item, _RoundEnd):
                region = self._regions[item.round_id]
                region.done = True
                if region.retired:
                    del self._regions[item.round_id]
            else:
                self._regions[item.round_id].coresets.append(item)
                self.stats.batches_received += 1
            block = False

    def _advance_region(self) -> None:
        cur = self._current
        nxt = self._regions.get(cur.round_id + 1) if cur else self._regions.get(0)
        if cur is None:
            start = time.perf_counter()
            while not self._regions[0].coresets:
                self._take(block=True)
            self.stats.wait_s += time.perf_counter() - start
        elif cur.steps < self.config.steps_per_round or nxt is None or not nxt.coresets:
            if cur.steps >= self.config.steps_per_round:
                self.stats.late_steps += 1
            return
        assert nxt is not None
        if cur is not None:
            cur.retired = True
            if cur.done:
                del self._regions[cur.round_id]
        self._current = nxt
        self._pass = []
        self.stats.regions += 1
        log.debug("region %d: %d coresets so far, step %d", nxt.round_id, len(nxt.coresets), self.stats.steps)

    def _next_batch(self) -> tuple[np.ndarray, np.ndarray]:
        """Next (ids, weights) of the current region: a reshuffled pass over every coreset arrived so far."""
        assert self._current is not None
        if not self._pass:
            ids = np.concatenate([c.ids for c in self._current.coresets])
            weights = np.concatenate([c.weights for c in self._current.coresets])
            perm = self._rng.permutation(len(ids))
            parts = np.array_split(perm, max(1, round(len(ids) / self.config.batch_size)))
            self._pass = [(ids[p], weights[p]) for p in reversed(parts)]
        return self._pass.pop()

    def __iter__(self) -> Iterator[tuple[Any, Any, torch.Tensor]]:
        if self._next_round == 0:
            self._request_round()
        while not self._closed:
            self._take(block=False)
            self._advance_region()
            cur = self._current
            assert cur is not None
            if (
                self._next_round == cur.round_id + 1
                and cur.steps >= self.config.steps_per_round - self.config.lookahead_steps
            ):
                self._request_round()
            ids, weights = self._next_batch()
            batch = self._fetch(ids)
            cur.steps += 1
            self.stats.steps += 1
            self.stats.examples_backpropagated += len(ids)
            yield batch[0], batch[1], torch.from_numpy(weights.copy())

    def close(self) -> None:
        """Stop the stream thread and close the session (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._jobs.put(None)
        try:
            self.client.close_session(self.session.session_id)
        finally:
            # Unblock a stream thread waiting on a full queue; its round was cancelled with the session.
            deadline = time.perf_counter() + 10.0
            while self._thread.is_alive() and time.perf_counter() < deadline:
                with contextlib.suppress(queue.Empty):
                    self._batches.get(timeout=0.1)

    def __enter__(self) -> CoresetLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
