"""The loader's schedule as data: the region being trained, the round in flight, the pass over the pool, the
RNGs and the counters, and how they go to and from a checkpoint.

``CoresetLoader`` owns one ``LoaderState`` and changes its fields as it schedules; its ``state_dict`` is this
state's ``state_dict`` with the service link's (the session, and a round started ahead: ``plan_state``) and
the region controller's added.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from crest.selector.v1.api import RoundPlan, WeightedBatch
from trainer_client._stream import PlanJob
from trainer_client.distributed import owners, split_bounds
from trainer_client.loader_config import LoaderStats

log = logging.getLogger("trainer_client.loader")


def on_cpu(state: Any) -> Any:
    """``state`` (nested dicts, lists and tuples) with every tensor moved to the CPU: a checkpoint loaded with
    ``torch.load(..., map_location="cuda")``, the usual call when the loader's state shares a file with the model's,
    holds CUDA tensors, which ``.numpy()`` and ``Generator.set_state`` refuse."""
    if isinstance(state, torch.Tensor):
        return state.cpu()
    if isinstance(state, dict):
        return {k: on_cpu(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(on_cpu(v) for v in state)
    return state


@dataclass
class Region:
    """The region being trained: a round's coresets, reshuffled every pass."""

    round: int
    ids: np.ndarray  # int64 (n,) the pool: the used coresets, concatenated
    weights: np.ndarray  # float32 (n,), mean 1 (each coreset's are, as the service sends them)
    check_ids: np.ndarray  # int64 (u,) the round's random-subset ids the Taylor check runs on
    owner: np.ndarray  # int64 (n,) the rank that trains each pool entry (all 0 in a single process)

    @classmethod
    def of_round(
        cls, p: PendingRound, check_examples: int, seed: int, world_size: int, weighting: str = "cluster"
    ) -> Region:
        """The region of a ready round: its first ``p.num_coresets`` coresets (by subset index) concatenated,
        dealt over ``world_size`` ranks, and checked on a seeded sample of ``check_examples`` of the round's
        random-subset ids (0: all of them). ``weighting`` is ``LoaderConfig.coreset_weights``: "uniform" trains
        every coreset example with weight 1 (the quadratic model is then fitted to that loss too).

        The weights are not normalised again: each coreset's have mean 1 (the service's engine is the one
        place that normalises them), so the concatenation's have too.
        """
        used = [p.coresets[i] for i in sorted(p.coresets)[: p.num_coresets]]
        ids = np.concatenate([c.ids for c in used])
        weights = np.concatenate([c.weights for c in used]).astype(np.float32)
        if weighting == "uniform":
            weights = np.ones_like(weights)
        check_ids = p.check_ids[seeded_sample(len(p.check_ids), check_examples, [seed, 3, p.round])]
        return cls(p.round, ids, weights, check_ids, owners(ids, world_size, seed, p.round))

    def fit_sample(self, fit_examples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids, weights) of the pool the quadratic model is fitted on: a seeded sample of ``fit_examples`` of
        the region's pool (0: all of it), the same on every rank."""
        take = seeded_sample(len(self.ids), fit_examples, [seed, 4, self.round])
        return self.ids[take], self.weights[take]


def seeded_sample(n: int, k: int, key: list[int]) -> slice | np.ndarray:
    """Positions of a seeded sample of ``k`` of ``n`` items, ascending (``key`` seeds it); all of them when ``k`` is
    0 or not below ``n``."""
    if not 0 < k < n:
        return slice(None)
    return np.sort(np.random.default_rng(key).choice(n, k, replace=False))


@dataclass
class PendingRound:
    """A round requested from the service and not yet switched to; its coresets arrive by subset."""

    round: int
    session_round: int
    check_ids: np.ndarray
    num_coresets: int
    requested_step: int
    coresets: dict[int, WeightedBatch] = field(default_factory=dict)  # subset index -> coreset, as received
    ended: bool = False  # the stream ended (with every coreset, or fewer: a partial round)
    losses: np.ndarray | None = None  # float32 (n,) embedding-pass losses of check_ids; None after a resume

    @property
    def ready(self) -> bool:
        return all(i in self.coresets for i in range(self.num_coresets)) or (self.ended and bool(self.coresets))


def _tensor(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(a))  # a copy: arrays decoded from the wire are read-only


@dataclass
class LoaderState:
    """Everything the loader's schedule needs to continue exactly; the controller and the link keep theirs.

    ``dataset_size``, ``seed`` and ``batch_size`` name the run: a checkpoint loads only into a loader built
    with the same ones. ``state_dict`` holds tensors and plain values only (``torch.load(weights_only=True)``).
    """

    # 3: a pending round's coresets keep every WeightedBatch field; 2: the pass is a permutation of pool
    # positions (DDP); 1 stored batches.
    VERSION: ClassVar[int] = 3
    READS: ClassVar[tuple[int, ...]] = (2, 3)  # 2 differs only in the pending coresets (ids and weights)

    dataset_size: int
    seed: int
    batch_size: int
    rng: np.random.Generator  # reshuffles the region's pool every pass
    fallback_rng: np.random.Generator  # draws the uniform batches
    stats: LoaderStats = field(default_factory=LoaderStats)
    round: int = 0  # the loader's round counter; the session's is the link's
    region: Region | None = None
    pass_perm: np.ndarray | None = None  # int64 (n,) this pass's order of the pool positions
    pass_next: int = 0  # next batch of the pass
    pending: PendingRound | None = None
    want_at: int | None = None  # step at which the next region is due
    need_request: bool = False
    from_region: bool = False  # the batch yielded last came from a region
    yielded: bool = False

    def region_batch(self, rank: int = 0, world_size: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Next (ids int64, weights float32) of the region: reshuffled passes over its pool, ``rank``'s share of
        each batch.

        A pass has about ``batch_size`` examples a step over all ranks, and never more batches than the smallest
        rank share (no rank gets an empty batch). Every rank draws the same permutation of the pool positions
        (so the RNG state stays the same on every rank), keeps the positions it owns in that order and cuts them
        into the same number of batches.
        """
        region = self.region
        assert region is not None, "a region batch is drawn inside a region only"
        parts = max(1, round(len(region.ids) / self.batch_size))
        if world_size > 1:
            parts = min(parts, max(1, int(np.bincount(region.owner, minlength=world_size).min())))
        if self.pass_perm is None or self.pass_next >= parts:
            self.pass_perm, self.pass_next = self.rng.permutation(len(region.ids)), 0
        perm = self.pass_perm
        if world_size > 1:
            perm = perm[region.owner[perm] == rank]
        lo, hi = split_bounds(len(perm), parts, self.pass_next)
        take = perm[lo:hi]
        self.pass_next += 1
        return region.ids[take], region.weights[take]

    def uniform_batch(self, rank: int = 0, world_size: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Next uniformly sampled (ids int64, weights float32 ones) batch, ``rank``'s share: every rank draws the
        same ``batch_size`` ids (so the RNG state stays the same on every rank) and keeps every ``world_size``-th."""
        n = self.dataset_size
        ids = np.sort(self.fallback_rng.choice(n, size=min(self.batch_size, n), replace=False))[rank::world_size]
        return ids.astype(np.int64), np.ones(len(ids), dtype=np.float32)

    @classmethod
    def new(cls, dataset_size: int, seed: int, batch_size: int) -> LoaderState:
        return cls(
            dataset_size,
            seed,
            batch_size,
            rng=np.random.default_rng([seed, 1]),
            fallback_rng=np.random.default_rng([seed, 2]),
        )

    def state_dict(self) -> dict[str, Any]:
        r, p = self.region, self.pending
        return {
            "version": self.VERSION,
            "dataset_size": self.dataset_size,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "round": self.round,
            "region": None
            if r is None
            else {
                "round": r.round,
                "ids": _tensor(r.ids),
                "weights": _tensor(r.weights),
                "check_ids": _tensor(r.check_ids),
            },
            "pass_perm": None if self.pass_perm is None else _tensor(self.pass_perm),
            "pass_next": self.pass_next,
            "pending": None
            if p is None
            else {
                "round": p.round,
                "session_round": p.session_round,
                "check_ids": _tensor(p.check_ids),
                "num_coresets": p.num_coresets,
                "requested_step": p.requested_step,
                "coresets": {
                    k: {**asdict(b), "ids": _tensor(b.ids), "weights": _tensor(b.weights)}
                    for k, b in p.coresets.items()
                },
                "ready": p.ready,
            },
            "want_at": self.want_at,
            "need_request": self.need_request,
            "from_region": self.from_region,
            "yielded": self.yielded,
            "rng": self.rng.bit_generator.state,
            "fallback_rng": self.fallback_rng.bit_generator.state,
            "stats": asdict(self.stats),
        }

    @classmethod
    def from_state_dict(
        cls, state: dict[str, Any], *, dataset_size: int, seed: int, batch_size: int, world_size: int
    ) -> LoaderState:
        """The state saved by ``state_dict``, for a loader of this run (the arguments) on ``world_size`` ranks.

        Raises ``ValueError`` naming the saved and the expected value when the version or the run differs. A
        round that was still in flight when saved is dropped (the service delivers a round once) and asked
        for again.
        """
        version = state.get("version")
        if version not in cls.READS:
            reads = " or ".join(map(str, cls.READS))
            raise ValueError(f"loader state has version {version!r}; this code reads {reads}")
        for key, mine in (("dataset_size", dataset_size), ("seed", seed), ("batch_size", batch_size)):
            if state[key] != mine:
                raise ValueError(f"loader state was saved with {key} {state[key]}; this loader has {mine}")
        out = cls.new(dataset_size, seed, batch_size)
        out.rng.bit_generator.state = state["rng"]
        out.fallback_rng.bit_generator.state = state["fallback_rng"]
        out.stats = LoaderStats(**state["stats"])
        out.round = int(state["round"])
        if (r := state["region"]) is not None:
            ids = r["ids"].numpy()
            owner = owners(ids, world_size, seed, r["round"])
            out.region = Region(r["round"], ids, r["weights"].numpy(), r["check_ids"].numpy(), owner)
        perm = state["pass_perm"]
        out.pass_perm, out.pass_next = (None if perm is None else perm.numpy()), int(state["pass_next"])
        out.want_at, out.need_request = state["want_at"], bool(state["need_request"])
        out.from_region, out.yielded = bool(state["from_region"]), bool(state["yielded"])
        if (p := state["pending"]) is not None and p["ready"]:
            out.pending = PendingRound(
                p["round"],
                p["session_round"],
                p["check_ids"].numpy(),
                p["num_coresets"],
                p["requested_step"],
                {int(k): _coreset(version, p, int(k), c) for k, c in p["coresets"].items()},
                ended=True,
            )
        elif p is not None:
            log.warning("round %d was still in flight when saved; requesting a new one", p["round"])
            out.need_request = True
        return out


def _coreset(version: int, pending: dict[str, Any], subset: int, saved: Any) -> WeightedBatch:
    """A pending round's coreset from a checkpoint of ``version``."""
    if version == 2:  # (ids, weights): the step is the round's request step; time and worker were not kept
        ids, weights = saved
        return WeightedBatch(
            pending["session_round"], subset, ids.numpy(), weights.numpy(), pending["requested_step"], float("nan"), ""
        )
    return WeightedBatch(**{**saved, "ids": saved["ids"].numpy(), "weights": saved["weights"].numpy()})


def plan_state(job: PlanJob) -> dict[str, Any]:
    """A round started ahead whose StartRound succeeded (``job.plan`` holds its plan), for a checkpoint: what
    ``ServiceLink`` matches it by, and the plan (the step, wait and report it sent went to the service already)."""
    plan = job.plan.result(timeout=0)
    return {
        "session_round": job.session_round,
        "num_subsets": job.num_subsets,
        "plan": {"round_id": plan.round_id, "ids": _tensor(plan.ids), "num_subsets": plan.num_subsets},
    }


def plan_of_state(session_id: str, saved: dict[str, Any]) -> PlanJob:
    """The round started ahead that ``plan_state`` saved, for ``session_id``, with its plan already there."""
    p = saved["plan"]
    plan: Future[RoundPlan] = Future()
    plan.set_result(RoundPlan(int(p["round_id"]), p["ids"].numpy(), int(p["num_subsets"])))
    return PlanJob(session_id, int(saved["session_round"]), int(saved["num_subsets"]), 0, 0.0, None, plan)
