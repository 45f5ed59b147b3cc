"""Checkpoints of a ``CoresetLoader``: the records of its region and round in flight, and their (de)serialisation.

Kept apart from the loader's scheduling logic; ``CoresetLoader.state_dict`` / ``load_state_dict`` call in here.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np
import torch

from trainer_client.client import SessionInfo
from trainer_client.distributed import owners
from trainer_client.loader_config import LoaderStats

if TYPE_CHECKING:
    from trainer_client.loader import CoresetLoader

log = logging.getLogger("trainer_client.loader")

STATE_VERSION = 2  # 2: the pass is a permutation of pool positions (DDP); 1 stored batches


@dataclass
class Region:
    """The region being trained: a round's coresets, reshuffled every pass."""

    round: int
    ids: np.ndarray  # int64 (n,) the pool: union of the used coresets
    weights: np.ndarray  # float32 (n,), mean 1
    check_ids: np.ndarray  # int64 (u,) union of the round's random subsets
    owner: np.ndarray  # int64 (n,) the rank that trains each pool entry (all 0 in a single process)


@dataclass
class PendingRound:
    """A round requested from the service and not yet switched to; its coresets arrive by subset."""

    round: int
    session_round: int
    check_ids: np.ndarray
    num_coresets: int
    requested_step: int
    coresets: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # subset -> (ids, weights)
    ended: bool = False
    losses: np.ndarray | None = None  # float32 (n,) embedding-pass losses of check_ids; None after a resume

    @property
    def ready(self) -> bool:
        return all(i in self.coresets for i in range(self.num_coresets)) or (self.ended and bool(self.coresets))


def save(loader: CoresetLoader) -> dict[str, Any]:
    """``CoresetLoader.state_dict``."""
    if loader._dist is not None and loader._pending is not None:
        settled = loader._on_main(loader._main_settle)
        if settled is not None and loader._pending is not None:
            loader._pending.coresets, loader._pending.ended = settled
    elif loader._dist is None:
        loader._main_settle()
    p = loader._pending

    def t(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.array(a))  # a copy: arrays decoded from the wire are read-only

    return {
        "version": STATE_VERSION,
        "dataset_size": len(loader.labels),
        "seed": loader.config.seed,
        "batch_size": loader.config.batch_size,
        "session": asdict(loader.session) if loader.session else None,
        "session_round": loader._session_round,
        "round": loader._round,
        "region": None
        if loader._region is None
        else {
            "round": loader._region.round,
            "ids": t(loader._region.ids),
            "weights": t(loader._region.weights),
            "check_ids": t(loader._region.check_ids),
        },
        "pass_perm": None if loader._pass_perm is None else t(loader._pass_perm),
        "pass_next": loader._pass_next,
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
        "want_at": loader._want_at,
        "need_request": loader._need_request,
        "from_region": loader._from_region,
        "yielded": loader._yielded,
        "rng": loader._rng.bit_generator.state,
        "fallback_rng": loader._fallback_rng.bit_generator.state,
        "stats": asdict(loader.stats),
        "controller": loader.controller.state_dict(),
    }


def load(loader: CoresetLoader, state: dict[str, Any]) -> None:
    """``CoresetLoader.load_state_dict``."""
    if loader._yielded or loader.session is not None:
        raise RuntimeError("load_state_dict must be called on a fresh loader, before the first batch")
    if state.get("version") != STATE_VERSION:
        raise ValueError(f"loader state has version {state.get('version')!r}; this code reads {STATE_VERSION}")
    for key, mine in (
        ("dataset_size", len(loader.labels)),
        ("seed", loader.config.seed),
        ("batch_size", loader.config.batch_size),
    ):
        if state[key] != mine:
            raise ValueError(f"loader state was saved with {key} {state[key]}; this loader has {mine}")
    loader.controller.load_state_dict(state["controller"])
    r = state["region"]
    loader._region = (
        None
        if r is None
        else Region(
            r["round"],
            r["ids"].numpy(),
            r["weights"].numpy(),
            r["check_ids"].numpy(),
            owners(
                r["ids"].numpy(),
                1 if loader._dist is None else loader._dist.world_size,
                loader.config.seed,
                r["round"],
            ),
        )
    )
    perm = state["pass_perm"]
    loader._pass_perm, loader._pass_next = (None if perm is None else perm.numpy()), int(state["pass_next"])
    loader._round, loader._session_round = int(state["round"]), int(state["session_round"])
    loader._want_at, loader._need_request = state["want_at"], bool(state["need_request"])
    loader._from_region, loader._yielded = bool(state["from_region"]), bool(state["yielded"])
    loader._rng.bit_generator.state = state["rng"]
    loader._fallback_rng.bit_generator.state = state["fallback_rng"]
    loader.stats = LoaderStats(**state["stats"])
    p = state["pending"]
    loader._pending = None
    if p is not None and p["ready"]:
        coresets = {int(k): (i.numpy(), w.numpy()) for k, (i, w) in p["coresets"].items()}
        loader._pending = PendingRound(
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
        loader._need_request = True
    # Only rank 0 asks the service; the other ranks take rank 0's session at the next service step.
    saved = state["session"]
    if loader._is_main:
        loader.session = _adopt_session(loader, saved)
    else:
        loader.session = None if saved is None else SessionInfo(**saved)


def _adopt_session(loader: CoresetLoader, saved: dict[str, Any] | None) -> SessionInfo | None:
    """Keep the saved session when the service still has it at the saved round; else open a new one later."""
    if saved is None:
        return None
    session = SessionInfo(**saved)
    loader.client.attach_session(session)
    try:
        next_round = int(
            loader.client.session_state(session.session_id, timeout_s=loader.config.deadline_s).next_round_id
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
            loader.client.target,
            session.session_id,
            exc.code(),
        )
        return session
    if next_round != loader._session_round:
        log.warning(
            "session %s is at round %d, the checkpoint at %d; resuming with a new session",
            session.session_id,
            next_round,
            loader._session_round,
        )
        return None
    log.info("resumed session %s at round %d, step %d", session.session_id, next_round, loader.stats.steps)
    return session
