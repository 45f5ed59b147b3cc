"""Learned-example exclusion: stop sampling examples the model has learned (CREST section 4). Pure numpy.

Every example keeps its last ``window`` recorded losses. An active example is *learned* when its window is
full and every loss in it is <= ``threshold``; ``update`` excludes learned examples from the active pool,
most confidently learned (lowest maximum loss) first, but never below the floor of
``min_pool_fraction`` x N examples nor below ``min_per_class`` examples of any class (so class-balanced
subsets stay possible). Unlike the released CREST code, exclusion is not final: with ``readmit`` an excluded
example whose re-tested loss exceeds the threshold returns to the pool with a fresh history.

State machine of one example: ACTIVE -(window full, all losses <= threshold, floor allows)-> EXCLUDED
-(readmit and a recorded loss > threshold)-> ACTIVE (history cleared).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from crest.selector.v1 import codec
from selector_service.errors import InvalidArgument

STATE_VERSION = 1


@dataclass(frozen=True, kw_only=True)
class ExclusionConfig:
    """When examples leave and re-enter the sampling pool."""

    # Off by default, as in the released CREST code (--drop_learned False).
    enabled: bool = False
    # Cross-entropy (nats) at or below which a recorded loss counts as learned (the wire's default, CREST's 0.1).
    threshold: float = codec.DEFAULT_DROP_THRESHOLD
    # Recorded losses that must all be <= threshold (the wire's default, CREST's 5 history slots).
    window: int = codec.DEFAULT_DROP_WINDOW
    # The active pool never shrinks below this fraction of N (the wire's default, 0.8).
    min_pool_fraction: float = codec.DEFAULT_MIN_POOL_FRACTION
    # Re-test excluded examples and re-admit those whose loss rose above the threshold.
    readmit: bool = True


@dataclass(frozen=True)
class ExclusionUpdate:
    """What one ``update`` changed: int64 id arrays, sorted."""

    excluded: np.ndarray
    readmitted: np.ndarray


def validate_config(config: ExclusionConfig) -> None:
    if not (math.isfinite(config.threshold) and config.threshold >= 0):
        raise InvalidArgument(f"exclusion threshold must be a finite loss >= 0, received {config.threshold}")
    if not 1 <= config.window <= 64:
        raise InvalidArgument(f"exclusion window must be in [1, 64], received {config.window}")
    if not 0.0 < config.min_pool_fraction <= 1.0:
        raise InvalidArgument(f"min_pool_fraction must be in (0, 1], received {config.min_pool_fraction}")


class ExclusionState:
    """Loss history and exclusion mask of one dataset.

    Args:
        labels: int64 (N,) class of every example.
        config: the rule.
        min_per_class: active examples each class keeps at least (e.g. the per-class subset quota).
    """

    def __init__(self, labels: np.ndarray, config: ExclusionConfig, min_per_class: int = 1) -> None:
        validate_config(config)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.config = config
        self.min_per_class = min_per_class
        n = len(self.labels)
        self.history = np.full((config.window, n), np.nan, dtype=np.float32)  # ring per example
        self.counts = np.zeros(n, dtype=np.int64)  # losses recorded since (re)admission
        self.excluded = np.zeros(n, dtype=bool)
        self.readmitted_total = 0

    @property
    def dataset_size(self) -> int:
        return len(self.labels)

    @property
    def active(self) -> np.ndarray:
        """bool (N,): True for examples in the sampling pool."""
        return ~self.excluded

    def record(self, ids: np.ndarray, losses: np.ndarray) -> None:
        """Append one loss per id (int64 (n,) unique ids, float32 (n,) finite losses >= 0)."""
        ids = np.asarray(ids, dtype=np.int64)
        losses = np.asarray(losses, dtype=np.float32)
        if ids.shape != losses.shape or ids.ndim != 1:
            raise InvalidArgument(
                f"ids and losses must be matching 1-d arrays, received {ids.shape} and {losses.shape}"
            )
        if len(ids) and (ids.min() < 0 or ids.max() >= self.dataset_size):
            raise InvalidArgument(f"ids must be in [0, {self.dataset_size}), received [{ids.min()}, {ids.max()}]")
        if len(np.unique(ids)) != len(ids):
            raise InvalidArgument("ids must be unique within one record call")
        if not (np.isfinite(losses).all() and (losses >= 0).all()):
            raise InvalidArgument("losses must be finite and >= 0")
        self.history[self.counts[ids] % self.config.window, ids] = losses
        self.counts[ids] += 1

    def update(self) -> ExclusionUpdate:
        """Apply the rule once: re-admit, then exclude within the floors."""
        w = self.config.window
        latest = self.history[(self.counts - 1) % w, np.arange(self.dataset_size)]
        readmit = (
            self.excluded & (self.counts > 0) & (latest > self.config.threshold)
            if self.config.readmit
            else np.zeros_like(self.excluded)
        )
        readmitted = np.flatnonzero(readmit)
        self.excluded[readmitted] = False
        self.history[:, readmitted] = np.nan
        self.counts[readmitted] = 0
        self.readmitted_total += len(readmitted)

        full = self.counts >= w
        worst = np.where(full, np.nanmax(np.where(full, self.history, 0.0), axis=0), np.inf)
        learned = np.flatnonzero(~self.excluded & (worst <= self.config.threshold))
        room = int(self.active.sum()) - math.ceil(self.config.min_pool_fraction * self.dataset_size)
        chosen: list[int] = []
        if room > 0 and len(learned):
            class_room = np.bincount(self.labels[self.active], minlength=int(self.labels.max()) + 1)
            class_room -= self.min_per_class
            for i in learned[np.lexsort((learned, worst[learned]))]:  # lowest worst-case loss first, then id
                if len(chosen) == room:
                    break
                c = self.labels[i]
                if class_room[c] > 0:
                    class_room[c] -= 1
                    chosen.append(int(i))
        excluded = np.sort(np.asarray(chosen, dtype=np.int64))
        self.excluded[excluded] = True
        # An excluded example keeps only the losses of its re-tests from now on.
        self.history[:, excluded] = np.nan
        self.counts[excluded] = 0
        return ExclusionUpdate(excluded=excluded, readmitted=readmitted)

    def retest_ids(self, count: int, rng: np.random.Generator) -> np.ndarray:
        """Up to ``count`` excluded ids, drawn uniformly without replacement, sorted (empty without readmit)."""
        pool = np.flatnonzero(self.excluded)
        if not self.config.readmit or count <= 0 or len(pool) == 0:
            return np.zeros(0, dtype=np.int64)
        return np.sort(rng.choice(pool, size=min(count, len(pool)), replace=False)).astype(np.int64)

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "dataset_size": self.dataset_size,
            "config": asdict(self.config),
            "min_per_class": self.min_per_class,
            "history": self.history.copy(),
            "counts": self.counts.copy(),
            "excluded": self.excluded.copy(),
            "readmitted_total": self.readmitted_total,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a ``state_dict``; refuses another version, dataset size or window, changing nothing then."""
        version = state.get("version")
        if version != STATE_VERSION:
            raise InvalidArgument(
                f"exclusion state version {version!r} is not supported; this build reads version {STATE_VERSION}"
            )
        if state.get("dataset_size") != self.dataset_size:
            raise InvalidArgument(
                f"exclusion state is for a dataset of {state.get('dataset_size')} examples, this "
                f"one has {self.dataset_size}"
            )
        history = np.asarray(state["history"], dtype=np.float32)
        if history.shape != self.history.shape:
            raise InvalidArgument(
                f"exclusion history has shape {history.shape}, expected {self.history.shape} "
                f"(window {self.config.window})"
            )
        counts = np.asarray(state["counts"], dtype=np.int64)
        excluded = np.asarray(state["excluded"], dtype=bool)
        if counts.shape != (self.dataset_size,) or excluded.shape != (self.dataset_size,):
            raise InvalidArgument(
                f"exclusion counts/excluded have shapes {counts.shape}/{excluded.shape}, "
                f"expected ({self.dataset_size},)"
            )
        self.history, self.counts, self.excluded = history.copy(), counts.copy(), excluded.copy()
        self.readmitted_total = int(state.get("readmitted_total", 0))
