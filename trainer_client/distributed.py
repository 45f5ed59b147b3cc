"""The few collectives the loader needs under ``torch.distributed`` (DDP): rank 0 owns the selection session and
every other rank follows its decisions.

No server change is needed: rank 0 creates the session, starts rounds, submits embeddings and streams coresets;
the ranks embed disjoint shards of each round's candidate ids (``shard_bounds``) and gather the rows to rank 0
(``gather_rows``); rank 0's service state (a started round, a failure, a switch to new coresets) reaches the
other ranks by ``broadcast_object``; the Taylor check sums per-shard losses with ``all_reduce_sum``; and
``owners`` splits a region's pool between ranks so that no id is trained on two ranks in one round.

Every function here is a collective unless it says otherwise: all ranks must call it, in the same order.

The messages are small (a round's embedding rows, a few floats, pickled service events), so they travel as CPU
tensors over gloo whatever the training backend is: over the default group when it has a CPU backend
(``init_process_group()`` with no backend, or "gloo"), else over a gloo group of all ranks created beside it
(an NCCL-only group: ``backend="nccl"``). So the loader's collectives never touch a GPU: they do not depend on
``torch.cuda.set_device`` and do not queue control messages behind the model's NCCL all-reduces.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistContext:
    """This process's place in the default process group.

    Attributes:
        rank: this process, 0..world_size-1; rank 0 talks to the selection service.
        world_size: number of ranks (>= 2; a single process runs without a context).
        group: the process group the loader's collectives run on (CPU tensors): None for the default group, else
            a gloo group of all ranks (``needs_cpu_group``).
    """

    rank: int
    world_size: int
    group: Any = None

    @classmethod
    def detect(cls) -> DistContext | None:
        """The context when ``torch.distributed`` is initialised with more than one rank; None otherwise.

        A collective when the default group has no CPU backend (every rank creates the gloo group then), so every
        rank builds its loader at the same point of the program, as the loader asks.
        """
        if not (dist.is_available() and dist.is_initialized()):
            return None
        world = dist.get_world_size()
        if world < 2:
            return None
        config = dist.get_backend_config()
        group = None
        if needs_cpu_group(config):
            log.info("the default process group runs %s: the loader's collectives go over a gloo group", config)
            group = dist.new_group(backend="gloo")
        return cls(dist.get_rank(), world, group)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard_bounds(self, n: int) -> tuple[int, int]:
        """[lo, hi) of this rank's contiguous shard of n items, as ``np.array_split`` cuts them: the first
        ``n % world_size`` ranks hold one item more (not a collective)."""
        return split_bounds(n, self.world_size, self.rank)

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` (picklable) on every rank; the other ranks' ``obj`` is ignored."""
        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (picklable), in rank order."""
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def all_reduce_sum(self, values: list[float]) -> np.ndarray:
        """float64 (k,): the element-wise sum of every rank's ``values`` (the same k on every rank)."""
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
        return t.numpy()

    def gather_rows(self, rows: np.ndarray, total: int) -> np.ndarray:
        """float32 (total, k): every rank's ``rows`` (float32 (n_r, k), n_r from ``shard_bounds(total)``),
        concatenated in rank order. Shards are padded to the largest for ``all_gather`` and trimmed."""
        width = rows.shape[1]
        sizes = [split_bounds(total, self.world_size, r) for r in range(self.world_size)]
        longest = max(hi - lo for lo, hi in sizes)
        if len(rows) != sizes[self.rank][1] - sizes[self.rank][0]:
            raise ValueError(f"rank {self.rank} holds {len(rows)} rows; its shard of {total} is {sizes[self.rank]}")
        padded = torch.zeros(longest, width, dtype=torch.float32)
        padded[: len(rows)] = torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float32))
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded, group=self.group)
        return torch.cat([p[: hi - lo] for p, (lo, hi) in zip(parts, sizes, strict=True)]).numpy()


def needs_cpu_group(backend_config: str) -> bool:
    """Whether a default group of this ``get_backend_config()`` (e.g. "cpu:gloo,cuda:nccl", "cuda:nccl", "gloo")
    lacks a backend for CPU tensors, so the loader must create a gloo group for its collectives (not a
    collective). A bare backend name serves every device it supports: only "nccl" is CUDA-only."""
    parts = [p.strip() for p in backend_config.split(",") if p.strip()]
    if any(":" not in p for p in parts):  # "gloo", "nccl", "mpi": one backend for all devices
        return all(p.lower() == "nccl" for p in parts)
    return not any(p.split(":", 1)[0].strip().lower() == "cpu" for p in parts)


def split_bounds(n: int, parts: int, index: int) -> tuple[int, int]:
    """[lo, hi) of part ``index`` of n items cut into ``parts`` contiguous parts as ``np.array_split`` cuts them
    (the first ``n % parts`` parts hold one item more), without building the parts."""
    base, extra = divmod(n, parts)
    lo = index * base + min(index, extra)
    return lo, lo + base + (1 if index < extra else 0)


def owners(ids: np.ndarray, world_size: int, seed: int, round_: int) -> np.ndarray:
    """int64 (n,): the rank that trains each entry of a region's pool ``ids`` (int64 (n,)). Pure, the same on
    every rank (not a collective).

    The pool's distinct ids are dealt round-robin in a seeded random order, so each rank owns an equal share
    (within one id) of a random, not class-sorted, part of the pool, and an id present twice in the pool (in
    two coresets) has one owner.
    """
    if world_size == 1:
        return np.zeros(len(ids), dtype=np.int64)
    distinct, inverse = np.unique(ids, return_inverse=True)
    order = np.random.default_rng([seed, 4, round_]).permutation(len(distinct))
    rank_of = np.empty(len(distinct), dtype=np.int64)
    rank_of[order] = np.arange(len(distinct)) % world_size
    return rank_of[inverse.reshape(-1)]
