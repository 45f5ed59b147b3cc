"""The selection settings that cross the wire (``CrestConfig``), as one type with one source of defaults.

Both sides hold it: the trainer's ``SelectionClient.create_session`` sends one (``LoaderConfig.wire_settings``
builds it from the loader's settings), the service's servicer reads one from a ``CreateSessionRequest`` and builds
its ``SessionConfig`` from it, and sends the one in force back. The defaults are the wire contract's
(``codec.DEFAULT_*``): what a zero or unset ``CrestConfig`` field means, as the .proto states on each field.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from crest.selector.v1 import codec
from crest.selector.v1 import selector_pb2 as pb


@dataclass(frozen=True, kw_only=True)
class SelectionSettings:
    """One session's selection settings, as ``CrestConfig`` carries them (units and ranges: selector.proto)."""

    # Random-subset size r as a fraction of the dataset size.
    subset_fraction: float = codec.DEFAULT_SUBSET_FRACTION
    # P, random subsets (and so coresets) per round.
    num_subsets: int = codec.DEFAULT_NUM_SUBSETS
    # m, coreset size per random subset: the training mini-batch size.
    batch_size: int = codec.DEFAULT_BATCH_SIZE
    # Facility-location kernel, a key of codec.SIMILARITIES.
    similarity: str = codec.DEFAULT_SIMILARITY
    # Seed of every random step of the session.
    seed: int = 0
    # What the embedding rows are, a key of codec.EMBEDDING_KINDS.
    embedding_kind: str = codec.DEFAULT_EMBEDDING_KIND
    # Dimension d of every embedding row; 0 means the number of classes (logit-gradient embedding).
    embedding_dim: int = 0
    # Learned-example exclusion, and its rule: threshold (nats), window (recorded losses) and pool floor (of N).
    drop_learned: bool = False
    drop_threshold: float = codec.DEFAULT_DROP_THRESHOLD
    drop_window: int = codec.DEFAULT_DROP_WINDOW
    min_pool_fraction: float = codec.DEFAULT_MIN_POOL_FRACTION
    # An excluded example never returns (the released code); else excluded examples are re-tested.
    keep_excluded: bool = False
    # Facility location over each whole random subset instead of per class.
    joint_selection: bool = False

    def to_proto(self) -> pb.CrestConfig:
        """The ``CrestConfig`` of these settings; an unknown similarity or embedding kind raises
        ``codec.WireError`` naming the field."""
        return pb.CrestConfig(
            subset_fraction=self.subset_fraction,
            num_subsets=self.num_subsets,
            batch_size=self.batch_size,
            similarity=codec.enum_value("similarity", codec.SIMILARITIES, self.similarity),
            seed=self.seed,
            embedding_kind=codec.enum_value("embedding_kind", codec.EMBEDDING_KINDS, self.embedding_kind),
            embedding_dim=self.embedding_dim,
            drop_learned=self.drop_learned,
            drop_threshold=self.drop_threshold,
            drop_window=self.drop_window,
            min_pool_fraction=self.min_pool_fraction,
            keep_excluded=self.keep_excluded,
            joint_selection=self.joint_selection,
        )

    @classmethod
    def of_call(cls, settings: SelectionSettings | None, fields: dict[str, Any]) -> SelectionSettings:
        """The settings a ``create_session`` call gives: ``settings``, or its fields as keyword arguments (what is
        left out is the wire's default). Both raise ``TypeError``, an unknown field too."""
        if settings is not None and fields:
            raise TypeError(f"create_session takes settings= or its fields, received both ({sorted(fields)})")
        return settings or cls(**fields)

    @classmethod
    def from_proto(cls, c: pb.CrestConfig) -> SelectionSettings:
        """The settings a ``CrestConfig`` asks for, a zero field meaning its default; an unknown enum value raises
        ``codec.WireError`` naming the field."""
        d = cls()
        return cls(
            subset_fraction=c.subset_fraction or d.subset_fraction,
            num_subsets=c.num_subsets or d.num_subsets,
            batch_size=c.batch_size or d.batch_size,
            similarity=codec.enum_name("config.similarity", codec.SIMILARITIES, c.similarity, d.similarity),
            seed=c.seed,
            embedding_kind=codec.enum_name(
                "config.embedding_kind", codec.EMBEDDING_KINDS, c.embedding_kind, d.embedding_kind
            ),
            embedding_dim=c.embedding_dim,
            drop_learned=c.drop_learned,
            drop_threshold=c.drop_threshold or d.drop_threshold,
            drop_window=c.drop_window or d.drop_window,
            min_pool_fraction=c.min_pool_fraction or d.min_pool_fraction,
            keep_excluded=c.keep_excluded,
            joint_selection=c.joint_selection,
        )
