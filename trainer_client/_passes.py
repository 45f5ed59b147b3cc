"""The loader's passes over the model besides the training steps: embedding a round's candidate ids, the loss of
the Taylor check, and the quadratic model's fit. Each runs in eval mode (no batch-norm side effects) and gives
the model back in the mode it found it.

Under DDP (``dist`` set) a rank embeds and checks its contiguous shard of the ids, and the collectives of
``distributed.py`` combine the shards: every rank must call the same pass at the same step.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from trainer_client.batches import Embedder, ForwardFn
from trainer_client.distributed import DistContext
from trainer_client.embeddings import per_example_loss
from trainer_client.region import RegionController

log = logging.getLogger("trainer_client.loader")

# id chunks (int64 arrays) -> their collated batches, in order (fetched ahead by the input pipeline's workers)
Fetch = Callable[[Sequence[np.ndarray]], Iterator[Any]]


@dataclass(frozen=True)
class RoundEmbeddings:
    """A round's candidate ids run through the model, in the order of the ids (every rank holds all rows)."""

    embeddings: np.ndarray  # float32 (n, d)
    labels: np.ndarray  # int64 (n,) the targets as forward_fn returns them
    losses: np.ndarray  # float32 (n,) per-example cross-entropy, in nats
    embedded: int  # ids this rank ran through the model (its shard under DDP)
    reused: int = 0  # rows taken from earlier rounds (LoaderConfig.embedding_max_age), not run through the model
    reused_age: int = 0  # their ages summed: steps since each was embedded


@dataclass(frozen=True)
class CheckLoss:
    """What the Taylor check compares."""

    true_loss: float  # mean unweighted cross-entropy on the check ids, over every rank
    predicted: float | None  # the quadratic model's prediction, averaged over the ranks; None in one process


def trainable(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


class ModelPasses:
    """The forward (and, for the fit, double backward) passes the loader runs on ``model``.

    Args:
        model: the replica being trained (not a DDP wrapper: these passes need no gradient sync).
        fetch: the batches of a pass's id chunks, in order.
        forward_fn: ``(model, batch) -> (logits (n, C), targets (n,))``.
        embedder: turns a batch into gradient embeddings.
        num_classes: C.
        embed_batch_size: examples per no-grad forward pass.
        dist: the DDP context, or None in a single process.
        embed_dtype: precision of the embedding pass; below float32 it runs under autocast on the model's
            device (the check and the fit stay in float32).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        fetch: Fetch,
        forward_fn: ForwardFn,
        embedder: Embedder,
        num_classes: int,
        embed_batch_size: int,
        dist: DistContext | None,
        *,
        embed_dtype: torch.dtype = torch.float32,
    ) -> None:
        self.model, self.fetch, self.forward_fn, self.embedder = model, fetch, forward_fn, embedder
        self.num_classes, self.embed_batch_size, self.dist = num_classes, embed_batch_size, dist
        self.embed_dtype = embed_dtype

    def _embed_forward(self) -> ForwardFn:
        """``forward_fn`` in ``embed_dtype``: below float32, the forward pass alone runs under autocast on the
        model's device and its logits come back as float32 (the embeddings are computed from them outside it)."""
        if self.embed_dtype == torch.float32:
            return self.forward_fn
        device_type = next(self.model.parameters()).device.type

        def forward(model: torch.nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
            with torch.autocast(device_type, dtype=self.embed_dtype):
                logits, targets = self.forward_fn(model, batch)
            return logits.float(), targets

        return forward

    def _chunks(self, ids: np.ndarray) -> list[np.ndarray]:
        return [ids[lo : lo + self.embed_batch_size] for lo in range(0, len(ids), self.embed_batch_size)]

    def _eval_batches(self, ids: np.ndarray) -> Iterator[Any]:
        return self.fetch(self._chunks(ids))

    def round_chunks(self, ids: np.ndarray) -> list[np.ndarray]:
        """The id chunks (int64) ``embed_round(ids)`` fetches on this rank, in order: its shard's, under DDP."""
        lo, hi = (0, len(ids)) if self.dist is None else self.dist.shard_bounds(len(ids))
        return self._chunks(ids[lo:hi])

    def embed_round(self, ids: np.ndarray) -> RoundEmbeddings:
        """Embed the round's ``ids`` (int64 (n,)) with the current model.

        Under DDP each rank embeds its contiguous shard and one all-gather of [embedding, target, loss] rows
        (float32; targets are exact below 2**24) gives every rank all of them.
        """
        if self.dist is None:
            return RoundEmbeddings(*self._embed(ids), embedded=len(ids))
        lo, hi = self.dist.shard_bounds(len(ids))
        emb, targets, losses = self._embed(ids[lo:hi])
        rows = np.concatenate([emb, targets[:, None], losses[:, None]], axis=1, dtype=np.float32)
        full = self.dist.gather_rows(rows, len(ids))
        return RoundEmbeddings(
            np.ascontiguousarray(full[:, :-2]),
            full[:, -2].astype(np.int64),
            np.ascontiguousarray(full[:, -1]),
            embedded=hi - lo,
        )

    @torch.no_grad()
    def _embed(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(embeddings float32 (n, d), targets int64 (n,), losses float32 (n,)) of ``ids`` on this process."""
        if len(ids) == 0:  # a DDP rank's shard of a round smaller than the world
            dim = self.embedder.dim(self.num_classes)
            return np.zeros((0, dim), np.float32), np.zeros(0, np.int64), np.zeros(0, np.float32)
        was_training = self.model.training
        self.model.eval()
        embs, targets, losses = [], [], []
        try:
            forward = self._embed_forward()
            for batch in self._eval_batches(ids):  # kept on the model's device: one copy to the host at the end
                emb, y, logits = self.embedder(self.model, batch, forward)
                embs.append(emb.float())
                losses.append(per_example_loss(logits, y))
                targets.append(y)
        finally:
            self.model.train(was_training)
        return (
            torch.cat(embs).cpu().numpy(),
            torch.cat(targets).cpu().numpy().astype(np.int64),
            torch.cat(losses).cpu().numpy(),
        )

    @torch.no_grad()
    def _loss_sum(self, ids: np.ndarray) -> float:
        """Summed unweighted cross-entropy on ``ids``, eval mode."""
        was_training = self.model.training
        self.model.eval()
        try:
            sums = []  # on the model's device, read once
            for batch in self._eval_batches(ids):
                logits, y = self.forward_fn(self.model, batch)
                sums.append(per_example_loss(logits, y).sum())
        finally:
            self.model.train(was_training)
        return float(torch.stack(sums).double().sum()) if sums else 0.0

    def check_loss(self, ids: np.ndarray, controller: RegionController) -> CheckLoss:
        """The true mean loss on ``ids`` (some of the round's random-subset ids) and, under DDP, the prediction.

        Under DDP each rank evaluates its shard of ``ids``; one all-reduce sums the losses, the counts and the
        ranks' predictions, so every rank ends with the same mean loss and the same (mean) prediction.
        """
        if self.dist is None:
            return CheckLoss(self._loss_sum(ids) / len(ids), None)
        lo, hi = self.dist.shard_bounds(len(ids))
        local = [self._loss_sum(ids[lo:hi]), float(hi - lo), controller.predict(trainable(self.model))]
        total, count, predicted = self.dist.all_reduce_sum(local)
        return CheckLoss(float(total / count), float(predicted / self.dist.world_size))

    def fit(
        self, controller: RegionController, ids: np.ndarray, weights: np.ndarray, batch_size: int, step: int
    ) -> None:
        """Fit the quadratic model on a region's weighted pool (``ids`` int64 (n,), ``weights`` float32 (n,)),
        in batches of ``batch_size``, eval mode."""

        def batches() -> Iterator[tuple[torch.Tensor, int]]:
            starts = range(0, len(ids), batch_size)
            for lo, batch in zip(starts, self.fetch([ids[lo : lo + batch_size] for lo in starts]), strict=True):
                logits, y = self.forward_fn(self.model, batch)
                w = torch.from_numpy(weights[lo : lo + batch_size]).to(logits.device)
                ce = torch.nn.functional.cross_entropy(logits.float(), y, reduction="none")
                yield (ce * w).mean(), len(y)

        was_training = self.model.training
        self.model.eval()
        # cuDNN's RNN kernels refuse a backward pass in eval mode: the fit of a model holding one runs without cuDNN.
        rnn = any(isinstance(m, torch.nn.RNNBase) for m in self.model.modules())
        cudnn = torch.backends.cudnn.enabled
        try:
            # The fit differentiates twice, which the fused attention kernels cannot (CPU flash attention has no
            # double backward): its attention runs on the math kernel; training and embedding keep the fast ones.
            torch.backends.cudnn.enabled = cudnn and not rnn
            with torch.enable_grad(), sdpa_kernel([SDPBackend.MATH]):
                controller.fit(trainable(self.model), batches(), step)
        except (NotImplementedError, RuntimeError) as exc:
            if isinstance(exc, RuntimeError) and "backward" not in str(exc):
                raise
            raise type(exc)(
                f"the CREST quadratic model needs a double backward through {type(self.model).__name__} in eval mode "
                f"({exc}); use the fixed rule (RegionConfig(mode='fixed'), as the recommended recipe does) for this "
                "model"
            ) from exc
        finally:
            torch.backends.cudnn.enabled = cudnn
            self.model.train(was_training)
        if self.dist is not None:
            # Identical replicas give identical fits; rank 0's schedule is broadcast anyway, because ranks that
            # disagreed on when to check would stop meeting in the check's all-reduce.
            mine = (controller.interval, controller.num_coresets)
            controller.interval, controller.num_coresets = theirs = self.dist.broadcast_object(mine)
            if theirs != mine:
                log.warning(
                    "rank %d: the quadratic model gave interval/coresets %s, rank 0 %s; following rank 0",
                    self.dist.rank,
                    mine,
                    theirs,
                )
