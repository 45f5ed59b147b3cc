"""Embeddings of earlier rounds' candidates, reused by a later round while they are at most ``max_age`` steps old
(``LoaderConfig.embedding_max_age``), or ``learned_max_age`` steps when the model had learned the example then
(its stored loss at most ``learned_loss``: ``LoaderConfig.learned_embedding_max_age``).

Every round's random subsets are drawn afresh by the service; an id that an earlier round embedded within the last
``max_age`` optimizer steps is not run through the model again: the round hands the service the stored embedding,
target and loss, computed with the model of that step. The selection then ranks some candidates by a slightly older
model, which is what CREST's lookahead does to every candidate already. How much it saves depends on how often the
draws repeat: class-balanced subsets draw a small class's examples far more often than a large class's, so on a
long-tailed dataset the small classes' candidates are mostly stored ones.

An example the model had learned when it was embedded (softmax(z) close to onehot(y): its logit gradient near 0)
mostly stays learned, and its row near 0, for far longer than a hard example's row stays put; later in a run most
candidates are such examples. A second, longer age for them skips most of the pass where it buys the least. An
example forgotten in between is seen as learned until its row ages out.

The stored rows are those every rank holds after a round (``RoundEmbeddings``), so under DDP every rank's cache is
the same, and so is the set of ids the ranks then shard and embed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np
import torch

from trainer_client._passes import RoundEmbeddings
from trainer_client.loader_config import LoaderConfig


class EmbeddingCache:
    """The last embedding of each example and the step it was taken at.

    Memory: ``dataset_size`` · (``dim`` + 3) · 4 bytes, allocated at the first round (60,000 examples with the
    10-float logit gradient: 3.1 MB).

    Args:
        dataset_size: N; ids are 0..N-1.
        dim: embedding width d.
        max_age: steps a stored embedding stays usable (>= 0; 0: only the learned rows are reused).
        learned_max_age: steps a stored embedding whose loss is at most ``learned_loss`` stays usable (0: max_age,
            like every other row); at least ``max_age`` when set.
        learned_loss: cross-entropy in nats at or below which a stored row counts as learned.
    """

    VERSION: ClassVar[int] = 1

    @classmethod
    def for_loader(cls, dataset_size: int, dim: int, config: LoaderConfig) -> EmbeddingCache | None:
        """The cache ``config``'s two max ages ask for; None when both are 0 (every round embeds every candidate)."""
        if not (config.embedding_max_age or config.learned_embedding_max_age):
            return None
        return cls(
            dataset_size,
            dim,
            config.embedding_max_age,
            learned_max_age=config.learned_embedding_max_age,
            learned_loss=config.learned_embedding_loss,
        )

    def __init__(
        self, dataset_size: int, dim: int, max_age: int, *, learned_max_age: int = 0, learned_loss: float = 0.0
    ) -> None:
        if max_age < 0 or max(max_age, learned_max_age) < 1:
            raise ValueError(
                f"max_age must be >= 0 steps and max_age or learned_max_age >= 1, received {max_age} and "
                f"{learned_max_age}"
            )
        if learned_max_age and (learned_max_age < max_age or not (math.isfinite(learned_loss) and learned_loss >= 0)):
            raise ValueError(
                f"learned_max_age must be >= max_age ({max_age}) and learned_loss a finite loss >= 0, received "
                f"{learned_max_age} and {learned_loss}"
            )
        self.dataset_size, self.dim, self.max_age = dataset_size, dim, max_age
        self.learned_max_age, self.learned_loss = learned_max_age or max_age, learned_loss
        self._step = np.full(dataset_size, -1, dtype=np.int64)  # step of the stored row; -1: none
        self._emb: np.ndarray | None = None  # float32 (N, d)
        self._target = np.zeros(dataset_size, dtype=np.int64)
        self._loss = np.zeros(dataset_size, dtype=np.float32)

    def stale(self, ids: np.ndarray, step: int) -> np.ndarray:
        """bool (n,): which of ``ids`` (int64 (n,)) have no row taken within ``max_age`` steps of ``step`` (within
        ``learned_max_age`` steps for a row whose loss is at most ``learned_loss``)."""
        taken = self._step[ids]
        age = step - taken
        usable = (age <= self.max_age) | ((age <= self.learned_max_age) & (self._loss[ids] <= self.learned_loss))
        return (taken < 0) | ~usable

    def store(self, ids: np.ndarray, rows: RoundEmbeddings, step: int) -> None:
        """Keep the rows of ``ids`` (int64 (n,), in the order of ``rows``), embedded at ``step``."""
        if self._emb is None:
            self._emb = np.zeros((self.dataset_size, self.dim), dtype=np.float32)
        self._emb[ids], self._target[ids], self._loss[ids] = rows.embeddings, rows.labels, rows.losses
        self._step[ids] = step

    def refresh(self, ids: np.ndarray, rows: RoundEmbeddings, step: int) -> None:
        """Keep the rows of ``ids`` taken at ``step`` where no later row is stored (the training steps' rows,
        ``LoaderConfig.training_logits``); an id present twice keeps its last row."""
        keep = np.flatnonzero(self._step[ids] <= step)
        self.store(ids[keep], RoundEmbeddings(rows.embeddings[keep], rows.labels[keep], rows.losses[keep], 0), step)

    def embed_round(
        self, ids: np.ndarray, step: int, embed: Callable[[np.ndarray], RoundEmbeddings]
    ) -> RoundEmbeddings:
        """A round's rows for ``ids`` (int64 (n,)) at ``step``: ``embed`` (``ModelPasses.embed_round``) runs on the
        stale ones only, whose new rows are stored; the others are taken from earlier rounds."""
        stale = self.stale(ids, step)
        embedded = 0
        if stale.any():  # the same on every rank: each calls the collective embed, or none does
            fresh = embed(ids[stale])
            self.store(ids[stale], fresh, step)
            embedded = fresh.embedded
        assert self._emb is not None
        return RoundEmbeddings(
            self._emb[ids],
            self._target[ids],
            self._loss[ids],
            embedded=embedded,
            reused=int((~stale).sum()),
            reused_age=int((step - self._step[ids]).sum()),
        )

    def state_dict(self, step: int) -> dict[str, Any]:
        """The rows still usable after ``step`` (the others never will be again), as tensors."""
        keep = np.flatnonzero(~self.stale(np.arange(self.dataset_size), step))
        emb = np.zeros((0, self.dim), np.float32) if self._emb is None else self._emb[keep]
        return {
            "version": self.VERSION,
            "dataset_size": self.dataset_size,
            "dim": self.dim,
            "ids": torch.from_numpy(keep.astype(np.int64)),
            "steps": torch.from_numpy(self._step[keep]),
            "embeddings": torch.from_numpy(np.ascontiguousarray(emb)),
            "targets": torch.from_numpy(self._target[keep]),
            "losses": torch.from_numpy(self._loss[keep]),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Replace the stored rows with ``state_dict()``'s; refuses another version, dataset size or width."""
        for key, mine in (("version", self.VERSION), ("dataset_size", self.dataset_size), ("dim", self.dim)):
            if state.get(key) != mine:
                raise ValueError(f"embedding cache state has {key} {state.get(key)!r}; this loader's is {mine}")
        ids = state["ids"].numpy()
        self._emb = np.zeros((self.dataset_size, self.dim), dtype=np.float32)
        self._step[:] = -1
        self._emb[ids], self._target[ids], self._loss[ids] = (
            state[k].numpy() for k in ("embeddings", "targets", "losses")
        )
        self._step[ids] = state["steps"].numpy()
