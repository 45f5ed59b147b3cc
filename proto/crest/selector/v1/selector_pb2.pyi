from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Similarity(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SIMILARITY_UNSPECIFIED: _ClassVar[Similarity]
    SIMILARITY_EXP: _ClassVar[Similarity]
    SIMILARITY_MAXDIST: _ClassVar[Similarity]

class EmbeddingKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EMBEDDING_KIND_UNSPECIFIED: _ClassVar[EmbeddingKind]
    EMBEDDING_LOGIT_GRADIENT: _ClassVar[EmbeddingKind]
    EMBEDDING_LAST_LAYER_GRADIENT: _ClassVar[EmbeddingKind]
SIMILARITY_UNSPECIFIED: Similarity
SIMILARITY_EXP: Similarity
SIMILARITY_MAXDIST: Similarity
EMBEDDING_KIND_UNSPECIFIED: EmbeddingKind
EMBEDDING_LOGIT_GRADIENT: EmbeddingKind
EMBEDDING_LAST_LAYER_GRADIENT: EmbeddingKind

class CrestConfig(_message.Message):
    __slots__ = ("subset_fraction", "num_subsets", "batch_size", "similarity", "seed", "embedding_dim", "embedding_kind", "drop_learned", "drop_threshold", "drop_window", "min_pool_fraction", "keep_excluded", "joint_selection")
    SUBSET_FRACTION_FIELD_NUMBER: _ClassVar[int]
    NUM_SUBSETS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    SIMILARITY_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_DIM_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_KIND_FIELD_NUMBER: _ClassVar[int]
    DROP_LEARNED_FIELD_NUMBER: _ClassVar[int]
    DROP_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    DROP_WINDOW_FIELD_NUMBER: _ClassVar[int]
    MIN_POOL_FRACTION_FIELD_NUMBER: _ClassVar[int]
    KEEP_EXCLUDED_FIELD_NUMBER: _ClassVar[int]
    JOINT_SELECTION_FIELD_NUMBER: _ClassVar[int]
    subset_fraction: float
    num_subsets: int
    batch_size: int
    similarity: Similarity
    seed: int
    embedding_dim: int
    embedding_kind: EmbeddingKind
    drop_learned: bool
    drop_threshold: float
    drop_window: int
    min_pool_fraction: float
    keep_excluded: bool
    joint_selection: bool
    def __init__(self, subset_fraction: _Optional[float] = ..., num_subsets: _Optional[int] = ..., batch_size: _Optional[int] = ..., similarity: _Optional[_Union[Similarity, str]] = ..., seed: _Optional[int] = ..., embedding_dim: _Optional[int] = ..., embedding_kind: _Optional[_Union[EmbeddingKind, str]] = ..., drop_learned: _Optional[bool] = ..., drop_threshold: _Optional[float] = ..., drop_window: _Optional[int] = ..., min_pool_fraction: _Optional[float] = ..., keep_excluded: _Optional[bool] = ..., joint_selection: _Optional[bool] = ...) -> None: ...

class CreateSessionRequest(_message.Message):
    __slots__ = ("dataset_size", "labels", "num_classes", "config", "client_name")
    DATASET_SIZE_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    NUM_CLASSES_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    CLIENT_NAME_FIELD_NUMBER: _ClassVar[int]
    dataset_size: int
    labels: bytes
    num_classes: int
    config: CrestConfig
    client_name: str
    def __init__(self, dataset_size: _Optional[int] = ..., labels: _Optional[bytes] = ..., num_classes: _Optional[int] = ..., config: _Optional[_Union[CrestConfig, _Mapping]] = ..., client_name: _Optional[str] = ...) -> None: ...

class CreateSessionResponse(_message.Message):
    __slots__ = ("session_id", "config", "num_classes", "subset_size", "session_token")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    NUM_CLASSES_FIELD_NUMBER: _ClassVar[int]
    SUBSET_SIZE_FIELD_NUMBER: _ClassVar[int]
    SESSION_TOKEN_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    config: CrestConfig
    num_classes: int
    subset_size: int
    session_token: str
    def __init__(self, session_id: _Optional[str] = ..., config: _Optional[_Union[CrestConfig, _Mapping]] = ..., num_classes: _Optional[int] = ..., subset_size: _Optional[int] = ..., session_token: _Optional[str] = ...) -> None: ...

class CloseSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class CloseSessionResponse(_message.Message):
    __slots__ = ("rounds_completed",)
    ROUNDS_COMPLETED_FIELD_NUMBER: _ClassVar[int]
    rounds_completed: int
    def __init__(self, rounds_completed: _Optional[int] = ...) -> None: ...

class StartRoundRequest(_message.Message):
    __slots__ = ("session_id", "round_id", "trainer_step", "num_subsets", "trainer_wait_s", "trainer_fallback_batches", "trainer_service_errors", "trainer_control_steps", "payoff_measurements", "payoff_per_second", "payoff_per_second_lo", "payoff_per_second_hi", "payoff_arm")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    TRAINER_STEP_FIELD_NUMBER: _ClassVar[int]
    NUM_SUBSETS_FIELD_NUMBER: _ClassVar[int]
    TRAINER_WAIT_S_FIELD_NUMBER: _ClassVar[int]
    TRAINER_FALLBACK_BATCHES_FIELD_NUMBER: _ClassVar[int]
    TRAINER_SERVICE_ERRORS_FIELD_NUMBER: _ClassVar[int]
    TRAINER_CONTROL_STEPS_FIELD_NUMBER: _ClassVar[int]
    PAYOFF_MEASUREMENTS_FIELD_NUMBER: _ClassVar[int]
    PAYOFF_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    PAYOFF_PER_SECOND_LO_FIELD_NUMBER: _ClassVar[int]
    PAYOFF_PER_SECOND_HI_FIELD_NUMBER: _ClassVar[int]
    PAYOFF_ARM_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    round_id: int
    trainer_step: int
    num_subsets: int
    trainer_wait_s: float
    trainer_fallback_batches: int
    trainer_service_errors: int
    trainer_control_steps: int
    payoff_measurements: int
    payoff_per_second: float
    payoff_per_second_lo: float
    payoff_per_second_hi: float
    payoff_arm: str
    def __init__(self, session_id: _Optional[str] = ..., round_id: _Optional[int] = ..., trainer_step: _Optional[int] = ..., num_subsets: _Optional[int] = ..., trainer_wait_s: _Optional[float] = ..., trainer_fallback_batches: _Optional[int] = ..., trainer_service_errors: _Optional[int] = ..., trainer_control_steps: _Optional[int] = ..., payoff_measurements: _Optional[int] = ..., payoff_per_second: _Optional[float] = ..., payoff_per_second_lo: _Optional[float] = ..., payoff_per_second_hi: _Optional[float] = ..., payoff_arm: _Optional[str] = ...) -> None: ...

class RoundPlan(_message.Message):
    __slots__ = ("session_id", "round_id", "ids", "num_ids", "num_subsets")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    NUM_IDS_FIELD_NUMBER: _ClassVar[int]
    NUM_SUBSETS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    round_id: int
    ids: bytes
    num_ids: int
    num_subsets: int
    def __init__(self, session_id: _Optional[str] = ..., round_id: _Optional[int] = ..., ids: _Optional[bytes] = ..., num_ids: _Optional[int] = ..., num_subsets: _Optional[int] = ...) -> None: ...

class EmbeddingChunk(_message.Message):
    __slots__ = ("session_id", "round_id", "ids", "embeddings", "dim", "labels", "losses")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    LOSSES_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    round_id: int
    ids: bytes
    embeddings: bytes
    dim: int
    labels: bytes
    losses: bytes
    def __init__(self, session_id: _Optional[str] = ..., round_id: _Optional[int] = ..., ids: _Optional[bytes] = ..., embeddings: _Optional[bytes] = ..., dim: _Optional[int] = ..., labels: _Optional[bytes] = ..., losses: _Optional[bytes] = ...) -> None: ...

class SubmitEmbeddingsResponse(_message.Message):
    __slots__ = ("session_id", "round_id", "num_received")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    round_id: int
    num_received: int
    def __init__(self, session_id: _Optional[str] = ..., round_id: _Optional[int] = ..., num_received: _Optional[int] = ...) -> None: ...

class StreamBatchesRequest(_message.Message):
    __slots__ = ("session_id", "round_id", "received_subsets")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_SUBSETS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    round_id: int
    received_subsets: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, session_id: _Optional[str] = ..., round_id: _Optional[int] = ..., received_subsets: _Optional[_Iterable[int]] = ...) -> None: ...

class WeightedBatch(_message.Message):
    __slots__ = ("session_id", "round_id", "subset_index", "ids", "weights", "size", "trainer_step", "selection_ms", "worker")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    SUBSET_INDEX_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    TRAINER_STEP_FIELD_NUMBER: _ClassVar[int]
    SELECTION_MS_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    round_id: int
    subset_index: int
    ids: bytes
    weights: bytes
    size: int
    trainer_step: int
    selection_ms: float
    worker: str
    def __init__(self, session_id: _Optional[str] = ..., round_id: _Optional[int] = ..., subset_index: _Optional[int] = ..., ids: _Optional[bytes] = ..., weights: _Optional[bytes] = ..., size: _Optional[int] = ..., trainer_step: _Optional[int] = ..., selection_ms: _Optional[float] = ..., worker: _Optional[str] = ...) -> None: ...

class GetSessionStateRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class SessionState(_message.Message):
    __slots__ = ("session_id", "dataset_size", "active_size", "rounds_started", "rounds_completed", "batches_delivered", "examples_delivered", "config", "num_classes", "next_round_id", "excluded_size", "readmitted_total", "trainer_wait_s", "trainer_fallback_batches", "trainer_service_errors", "trainer_control_steps", "payoff_measurements", "payoff_per_second", "payoff_per_second_lo", "payoff_per_second_hi", "payoff_arm")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    DATASET_SIZE_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_SIZE_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_STARTED_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_COMPLETED_FIELD_NUMBER: _ClassVar[int]
    BATCHES_DELIVERED_FIELD_NUMBER: _ClassVar[int]
    EXAMPLES_DELIVERED_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    NUM_CLASSES_FIELD_NUMBER: _ClassVar[int]
    NEXT_ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    EXCLUDED_SIZE_FIELD_NUMBER: _ClassVar[int]
    READMITTED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    TRAINER_WAIT_S_FIELD_NUMBER: _ClassVar[int]
    TRAINER_FALLBACK_BATCHES_FIELD_NUMBER: _ClassVar[int]
    TRAINER_SERVICE_ERRORS_FIELD_NUMBER: _ClassVar[int]
    TRAINER_CONTROL_STEPS_FIELD_NUMBER: _ClassVar[int]
    PAYOFF_MEASUREMENTS_FIELD_NUMBER: _ClassVar[int]
    PAYOFF_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    PAYOFF_PER_SECOND_LO_FIELD_NUMBER: _ClassVar[int]
    PAYOFF_PER_SECOND_HI_FIELD_NUMBER: _ClassVar[int]
    PAYOFF_ARM_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    dataset_size: int
    active_size: int
    rounds_started: int
    rounds_completed: int
    batches_delivered: int
    examples_delivered: int
    config: CrestConfig
    num_classes: int
    next_round_id: int
    excluded_size: int
    readmitted_total: int
    trainer_wait_s: float
    trainer_fallback_batches: int
    trainer_service_errors: int
    trainer_control_steps: int
    payoff_measurements: int
    payoff_per_second: float
    payoff_per_second_lo: float
    payoff_per_second_hi: float
    payoff_arm: str
    def __init__(self, session_id: _Optional[str] = ..., dataset_size: _Optional[int] = ..., active_size: _Optional[int] = ..., rounds_started: _Optional[int] = ..., rounds_completed: _Optional[int] = ..., batches_delivered: _Optional[int] = ..., examples_delivered: _Optional[int] = ..., config: _Optional[_Union[CrestConfig, _Mapping]] = ..., num_classes: _Optional[int] = ..., next_round_id: _Optional[int] = ..., excluded_size: _Optional[int] = ..., readmitted_total: _Optional[int] = ..., trainer_wait_s: _Optional[float] = ..., trainer_fallback_batches: _Optional[int] = ..., trainer_service_errors: _Optional[int] = ..., trainer_control_steps: _Optional[int] = ..., payoff_measurements: _Optional[int] = ..., payoff_per_second: _Optional[float] = ..., payoff_per_second_lo: _Optional[float] = ..., payoff_per_second_hi: _Optional[float] = ..., payoff_arm: _Optional[str] = ...) -> None: ...
