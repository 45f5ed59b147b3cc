"""One session: its configuration, the limits it is held to, and its state (labels, active pool, rounds,
counters), with the versioned ``state_dict`` a checkpoint stores.

Data and validation only; ``manager.SessionManager`` holds the sessions and runs their rounds (``rounds.Round``).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from crest.selector.v1 import codec
from crest.selector.v1.api import TrainerReport
from crest.selector.v1.settings import SelectionSettings
from selector_service import trainer_report
from selector_service.errors import InvalidArgument
from selector_service.exclusion import ExclusionConfig, ExclusionState
from selector_service.exclusion import validate_config as validate_exclusion
from selector_service.rounds import Round, RoundState
from selector_service.similarity import KERNELS
from selector_service.subsets import per_class_quota
from selector_service.tasks import Batch

EMBEDDING_KINDS = tuple(codec.EMBEDDING_KINDS)
# 2: adds token_digest. The trainer's report ("trainer_report") came later as an optional key, with no new version:
# a state without it loads with an empty report, and an older build restores a state with it (ignoring the key).
SESSION_STATE_VERSION = 2
# Completed rounds per session whose batches stay available to a retried stream (a dropped connection).
RECENT_ROUNDS = 4


@dataclass(frozen=True, kw_only=True)
class SessionConfig:
    """Selection settings of one session. The defaults are the wire contract's (``codec.DEFAULT_*``: what an
    unset ``CrestConfig`` field means), which follow the released CREST code."""

    # Random-subset size r as a fraction of N; 1% as in CREST (r = 500 on CIFAR-10).
    subset_fraction: float = codec.DEFAULT_SUBSET_FRACTION
    # P, random subsets (and coresets) per round; CREST starts at 5.
    num_subsets: int = codec.DEFAULT_NUM_SUBSETS
    # m, coreset size per subset: the training mini-batch size.
    batch_size: int = codec.DEFAULT_BATCH_SIZE
    # Facility-location kernel, a key of similarity.KERNELS (and of codec.SIMILARITIES).
    similarity: str = codec.DEFAULT_SIMILARITY
    # Seed of every random step; round t uses the generator seeded by (seed, t).
    seed: int = 0
    # Embedding row dimension d; None means the number of classes (logit-gradient embedding).
    embedding_dim: int | None = None
    # What the rows are, one of EMBEDDING_KINDS.
    embedding_kind: str = codec.DEFAULT_EMBEDDING_KIND
    # Learned-example exclusion (off by default, as in CREST).
    exclusion: ExclusionConfig = field(default_factory=ExclusionConfig)
    # With exclusion and re-admission, excluded ids re-tested per round, as a fraction of the round's ids.
    retest_fraction: float = 0.05
    # Facility location over the whole random subset instead of per class (CrestConfig.joint_selection).
    joint_selection: bool = False

    @classmethod
    def from_settings(cls, s: SelectionSettings) -> SessionConfig:
        """The session configuration of the wire's settings."""
        return cls(
            subset_fraction=s.subset_fraction,
            num_subsets=s.num_subsets,
            batch_size=s.batch_size,
            similarity=s.similarity,
            seed=s.seed,
            embedding_dim=s.embedding_dim or None,
            embedding_kind=s.embedding_kind,
            exclusion=ExclusionConfig(
                enabled=s.drop_learned,
                threshold=s.drop_threshold,
                window=s.drop_window,
                min_pool_fraction=s.min_pool_fraction,
                readmit=not s.keep_excluded,
            ),
            joint_selection=s.joint_selection,
        )

    def settings(self) -> SelectionSettings:
        """The wire's settings of this configuration (what ``CreateSession`` answers is in force)."""
        return SelectionSettings(
            subset_fraction=self.subset_fraction,
            num_subsets=self.num_subsets,
            batch_size=self.batch_size,
            similarity=self.similarity,
            seed=self.seed,
            embedding_dim=self.embedding_dim or 0,
            embedding_kind=self.embedding_kind,
            drop_learned=self.exclusion.enabled,
            drop_threshold=self.exclusion.threshold,
            drop_window=self.exclusion.window,
            min_pool_fraction=self.exclusion.min_pool_fraction,
            keep_excluded=not self.exclusion.readmit,
            joint_selection=self.joint_selection,
        )


@dataclass(frozen=True, kw_only=True)
class Limits:
    """Bounds that keep one client from exhausting the service."""

    # Concurrent open sessions, in all and per client address (one host cannot take every slot).
    max_sessions: int = 64
    max_sessions_per_client: int = 32
    # Rounds started but not yet delivered, per session.
    max_rounds_in_flight: int = 4
    # Largest dataset a session may declare.
    max_dataset_size: int = 1 << 31
    # Largest embedding dimension.
    max_embedding_dim: int = 65536
    # Most random subsets per round.
    max_subsets: int = 1024


@dataclass(frozen=True)
class SessionSnapshot:
    session_id: str
    dataset_size: int
    active_size: int
    rounds_started: int
    rounds_completed: int
    batches_delivered: int
    examples_delivered: int
    config: SessionConfig
    num_classes: int
    next_round_id: int
    excluded_size: int
    readmitted_total: int
    trainer_wait_s: float
    trainer_report: TrainerReport


class Session:
    """One training job's state. All mutation happens under ``lock``."""

    def __init__(
        self,
        session_id: str,
        labels: np.ndarray,
        num_classes: int,
        config: SessionConfig,
        client_name: str,
        token_digest: str,
        owner: str = "",
    ) -> None:
        self.id = session_id
        self.owner = owner  # the creating client's address (without port), for the per-client session limit
        self.token_digest = token_digest  # hex SHA-256 of the session token (selector_service.tokens)
        self.labels = labels
        self.num_classes = num_classes
        self.config = config
        self.client_name = client_name
        self.quota = per_class_quota(len(labels), num_classes, config.subset_fraction)
        self.exclusion = ExclusionState(self.labels, config.exclusion, min_per_class=self.quota)
        self.rounds: dict[int, Round] = {}  # rounds started and neither delivered nor failed
        self.finished: OrderedDict[int, Round] = OrderedDict()  # last RECENT_ROUNDS done, oldest first
        self.next_round_id = 0
        self.rounds_completed = 0
        self.batches_delivered = 0
        self.examples_delivered = 0
        self.trainer_wait_s = 0.0  # cumulative, as last reported by the trainer
        self.trainer_report = TrainerReport()  # as kept by trainer_report.merge: the largest counts, the last payoff
        self.lock = threading.Lock()
        self.save_lock = threading.Lock()  # orders checkpoint writes of this session

    def state_dict(self) -> dict[str, Any]:
        """Everything a restarted service needs to continue this session (call under ``lock``).

        Rounds in flight are not saved: their subsets are a function of (seed, round id, pool), and a trainer
        whose round was lost asks for the next one.
        """
        return {
            "version": SESSION_STATE_VERSION,
            "session_id": self.id,
            "client_name": self.client_name,
            "token_digest": self.token_digest,
            "owner": self.owner,
            "labels": self.labels.copy(),
            "num_classes": self.num_classes,
            "config": asdict(self.config),
            "next_round_id": self.next_round_id,
            "rounds_completed": self.rounds_completed,
            "batches_delivered": self.batches_delivered,
            "examples_delivered": self.examples_delivered,
            "trainer_wait_s": self.trainer_wait_s,
            "trainer_report": trainer_report.to_state(self.trainer_report),
            "exclusion": self.exclusion.state_dict(),
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> Session:
        version = state.get("version")
        if version != SESSION_STATE_VERSION:
            raise InvalidArgument(
                f"session state version {version!r} is not supported; this build reads {SESSION_STATE_VERSION}"
            )
        raw = dict(state["config"])
        raw["exclusion"] = ExclusionConfig(**raw["exclusion"])
        session = cls(
            state["session_id"],
            np.asarray(state["labels"], dtype=np.int64),
            int(state["num_classes"]),
            SessionConfig(**raw),
            state["client_name"],
            state["token_digest"],
            state["owner"],
        )
        session.exclusion.load_state_dict(state["exclusion"])
        session.next_round_id = int(state["next_round_id"])
        session.rounds_completed = int(state["rounds_completed"])
        session.batches_delivered = int(state["batches_delivered"])
        session.examples_delivered = int(state["examples_delivered"])
        session.trainer_wait_s = float(state["trainer_wait_s"])
        session.trainer_report = trainer_report.from_state(state.get("trainer_report"))
        return session

    @property
    def dim(self) -> int:
        return self.config.embedding_dim or self.num_classes

    @property
    def subset_size(self) -> int:
        """Nominal random-subset size r = C * quota."""
        return self.num_classes * self.quota

    # The methods below are called under ``lock``.

    def snapshot(self) -> SessionSnapshot:
        excluded = int(self.exclusion.excluded.sum())
        return SessionSnapshot(
            self.id,
            len(self.labels),
            len(self.labels) - excluded,
            self.next_round_id,
            self.rounds_completed,
            self.batches_delivered,
            self.examples_delivered,
            self.config,
            self.num_classes,
            self.next_round_id,
            excluded,
            self.exclusion.readmitted_total,
            self.trainer_wait_s,
            self.trainer_report,
        )

    def count_delivery(self, rnd: Round, batch: Batch) -> int | None:
        """Count a sent batch once: the rounds it is behind the newest when first sent, else None."""
        if not rnd.deliver(batch.subset_index):
            return None
        self.batches_delivered += 1
        self.examples_delivered += len(batch.ids)
        return self.next_round_id - 1 - rnd.round_id

    def retire(self, rnd: Round) -> None:
        """Move a delivered or failed round out of the rounds in flight (so it no longer counts against
        ``Limits.max_rounds_in_flight``) to the recent rounds (the last ``RECENT_ROUNDS`` of them stay, so a
        retried stream is served, or told the round failed). Only a delivered round counts as completed."""
        self.rounds.pop(rnd.round_id, None)
        self.finished[rnd.round_id] = rnd
        while len(self.finished) > RECENT_ROUNDS:
            self.finished.popitem(last=False)
        if rnd.state == RoundState.DELIVERED:
            self.rounds_completed += 1

    def cancel_rounds(self) -> None:
        """Cancel every round (the session is closing): their open streams end with CANCELLED."""
        for rnd in (*self.rounds.values(), *self.finished.values()):
            rnd.cancel()
        self.rounds.clear()
        self.finished.clear()


def validate_config(config: SessionConfig, num_classes: int, limits: Limits) -> SessionConfig:
    """``config`` checked against the dataset's ``num_classes`` and ``limits``, with ``embedding_dim`` filled in;
    ``InvalidArgument`` says which setting is wrong."""
    if not 0.0 < config.subset_fraction <= 1.0:
        raise InvalidArgument(f"subset_fraction must be in (0, 1], received {config.subset_fraction}")
    if not 1 <= config.num_subsets <= limits.max_subsets:
        raise InvalidArgument(f"num_subsets must be in [1, {limits.max_subsets}], received {config.num_subsets}")
    if config.batch_size < num_classes:
        raise InvalidArgument(
            f"batch_size {config.batch_size} is smaller than the number of classes {num_classes}: "
            "every class needs at least one slot in a coreset"
        )
    if config.similarity not in KERNELS:
        raise InvalidArgument(f"similarity must be one of {sorted(KERNELS)}, received {config.similarity!r}")
    if config.embedding_kind not in EMBEDDING_KINDS:
        raise InvalidArgument(f"embedding_kind must be one of {EMBEDDING_KINDS}, received {config.embedding_kind!r}")
    dim = config.embedding_dim or num_classes
    if not 1 <= dim <= limits.max_embedding_dim:
        raise InvalidArgument(f"embedding_dim must be in [1, {limits.max_embedding_dim}], received {dim}")
    if config.embedding_kind == "logit_gradient" and dim != num_classes:
        raise InvalidArgument(
            f"a logit-gradient embedding has one value per class: embedding_dim must be {num_classes}, received {dim}"
        )
    validate_exclusion(config.exclusion)
    return SessionConfig(**{**config.__dict__, "embedding_dim": dim})
