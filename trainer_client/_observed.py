"""The training steps' logits as embedding-cache rows (``LoaderConfig.training_logits``).

A training forward already computes the logits of its batch; their logit gradient is the embedding a round would
compute for those examples at that step, so the cache's rows of the batch's examples are refreshed from them at
the cost of a softmax over the batch. Under DDP each rank observes its own share; the ranks' rows are exchanged at
every round's start, at a checkpoint and every ``SHARE_EVERY`` steps, so that every rank's cache stays the same.
"""

from __future__ import annotations

import numpy as np
import torch

from trainer_client._embedding_cache import EmbeddingCache
from trainer_client._passes import RoundEmbeddings
from trainer_client.distributed import DistContext
from trainer_client.embeddings import logit_gradient, per_example_loss

# Under DDP, the steps between two exchanges of the ranks' observed rows at the latest (they are exchanged at every
# round's start too): bounds what a rank holds while no round starts (the service down).
SHARE_EVERY = 64


class TrainingRows:
    """Cache rows from the training forward's logits.

    Args:
        cache: the loader's embedding cache.
        labels: int64 (N,) every example's label.
        dist: the DDP context, None in a single process.
    """

    def __init__(self, cache: EmbeddingCache, labels: np.ndarray, dist: DistContext | None) -> None:
        self.cache, self.labels, self.dist = cache, labels, dist
        self._held: list[tuple[np.ndarray, RoundEmbeddings, int]] = []  # (ids, rows, step) not yet exchanged

    def observe(self, logits: torch.Tensor, ids: np.ndarray, num_classes: int, step: int) -> int:
        """Store the rows of ``ids`` (int64 (n,)) from their logits (float (n, C)) taken by the model of ``step``;
        returns the rows stored. Logits of another shape, or not finite, are refused and nothing is stored."""
        if tuple(logits.shape) != (len(ids), num_classes):
            raise ValueError(
                f"observe_logits takes the logits of the batch yielded last, shape ({len(ids)}, {num_classes}); "
                f"received {tuple(logits.shape)}"
            )
        z = logits.detach().float()
        targets = torch.from_numpy(self.labels[ids]).to(z.device)
        # One copy to the host (one sync between the forward and the backward pass): the rows, their losses, and
        # whether each row's logits were finite.
        finite = torch.isfinite(z).all(dim=1, keepdim=True).float()
        host = torch.cat([logit_gradient(z, targets), per_example_loss(z, targets)[:, None], finite], dim=1).cpu()
        bad = int((host[:, -1] == 0).sum())
        if bad:
            raise ValueError(f"observe_logits received non-finite logits in {bad} of {len(ids)} rows; nothing stored")
        rows = RoundEmbeddings(host[:, :-2].numpy().copy(), self.labels[ids], host[:, -2].numpy().copy(), embedded=0)
        if self.dist is None:
            self.cache.refresh(ids, rows, step)
        else:
            self._held.append((ids, rows, step))
        return len(ids)

    def share(self) -> None:
        """Under DDP, every rank's held rows into every rank's cache, in rank order (a collective)."""
        if self.dist is None:
            return
        everyone = self.dist.all_gather_object(self._held)
        self._held = []
        for part in everyone:
            for ids, rows, step in part:
                self.cache.refresh(ids, rows, step)
