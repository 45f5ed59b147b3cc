"""Settings, counters and errors of ``CoresetLoader`` (``trainer_client.loader``)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from crest.selector.v1 import codec
from trainer_client.region import RegionConfig


class SelectionUnavailable(RuntimeError):
    """The service failed and ``strict`` forbids training on uniform batches, or it failed the same way on its
    side ``max_persistent_failures`` times in a row; the message carries the service's."""


# LoaderConfig.coreset_weights: the loss weight of a coreset example.
CORESET_WEIGHTS = ("cluster", "uniform")
# LoaderConfig.embed_dtype: the precision of the embedding pass.
EMBED_DTYPES = ("float32", "bfloat16")


@dataclass(frozen=True, kw_only=True)
class LoaderConfig:
    """Selection settings sent to the service and how the loader schedules rounds."""

    # Coreset size m per random subset, and the training batch size (CREST's 128: the service's default).
    batch_size: int = codec.DEFAULT_BATCH_SIZE
    # Random-subset size r as a fraction of the dataset (CREST: 1%).
    subset_fraction: float = codec.DEFAULT_SUBSET_FRACTION
    # Random subsets per round in the service session: the cap on CREST's adaptive P (fixed per session; a
    # region uses the first min(P, this) coresets).
    num_subsets: int = codec.DEFAULT_NUM_SUBSETS
    # Facility-location kernel: "exp" (CREST) or "maxdist" (CRAIG).
    similarity: str = codec.DEFAULT_SIMILARITY
    # Seeds the service's subset sampling, the loader's reshuffling and the Hutchinson probes.
    seed: int = 0
    # When a region ends: the CREST Taylor check by default (see region.py).
    region: RegionConfig = field(default_factory=RegionConfig)
    # Set to use the fixed rule instead: every region lasts this many steps (overrides region.mode).
    steps_per_round: int | None = None
    # Steps between asking for a round and switching to it: hides embedding and selection latency, at the cost
    # of selecting with a model that many steps older. 0 switches at once, as the released code does.
    lookahead_steps: int = 4
    # Selection feature: "logit_gradient" (C floats) or "last_layer_gradient" ((p - y) ⊗ [h, 1]).
    embedding: str = codec.DEFAULT_EMBEDDING_KIND
    # Random-projection dimension of the last-layer gradient; 0 sends all C·(H+1) values.
    embedding_dim: int = 0
    # Check on a fixed seeded sample of this many of the round's random-subset ids; 0 uses them all (CREST).
    # The check costs one forward pass over them every interval steps: on a CPU this bounds its cost.
    check_examples: int = 0
    # Fit the quadratic model (CREST's adaptive rule; a gradient and a Hutchinson double backward per batch) on a
    # seeded sample of this many of the region's pool, with their weights; 0 fits on the whole pool (CREST). The
    # weighted mean loss of a uniform sample estimates the pool's, and the fit's cost falls with the sample.
    fit_examples: int = 0
    # The loss weight of each coreset example: "cluster", the size of its facility-location cluster scaled to mean
    # 1 (CRAIG's gamma, as CREST trains), or "uniform", 1 for every example. On Fashion-MNIST with the SmallCNN,
    # uniform weights trained better per step (README, "Second round of tuning": +0.4 to +1.0 points over cluster
    # weights at equal steps on a validation split); with 30% flipped labels, cluster weights were safer (the
    # coresets are 55-60% flipped examples, which the cluster sizes weigh down). The service sends the cluster
    # sizes either way.
    coreset_weights: str = "cluster"
    # Learned-example exclusion in the service (CREST section 4; CrestConfig.drop_learned, with the service's
    # threshold, window and pool floor): off by default, as in the released code.
    drop_learned: bool = False
    # The exclusion rule (CrestConfig's; 0 takes the service's default): the cross-entropy in nats at or below which
    # a recorded loss counts as learned (0.1), the recorded losses in a row that must all be (5: an example is
    # recorded only when a round draws it, so in a short run few reach 5), and the pool's floor as a fraction of N
    # (0.8).
    drop_threshold: float = 0.0
    drop_window: int = 0
    min_pool_fraction: float = 0.0
    # Facility location over each whole random subset instead of per class (CrestConfig.joint_selection): a class
    # whose logit gradients spread wider (a harder class) gets more of a coreset's picks. Off by default, as in
    # the released code.
    joint_selection: bool = False
    # Examples per no-grad forward pass when embedding a round or checking the region. Larger batches were
    # slower per example on CPU (SmallCNN, one thread: 1,024 cost twice 128-256, from cache misses); between 64
    # and 256 the embedding pass costs about the same per example in float32 (2 threads: 59, 56, 59 us).
    embed_batch_size: int = 256
    # Precision of the embedding pass: "float32", or "bfloat16" (autocast on the model's device; the embeddings
    # and losses are computed in float32 from its logits). Selection ranks examples by these embeddings, so it
    # needs no more precision than training does; the Taylor check and the quadratic model stay in float32. On a
    # CPU with bfloat16 instructions (AVX512-BF16, AMX) or a GPU it is the cheaper pass (SmallCNN on two AVX512-BF16
    # cores, the whole pass at 256 a batch: 35 against 59 us per example); on a CPU without them, slower.
    embed_dtype: str = "float32"
    # Reuse a candidate's embedding (and loss) in a later round while it is at most this many optimizer steps old,
    # instead of running it through the model again; 0 embeds every round's ids afresh (CREST). The class-balanced
    # random subsets draw a small class's examples again within a few regions, so on a long-tailed dataset this
    # skips a large share of the embedding pass; selection then sees those candidates through a model up to this
    # many steps older. Holds N·(d+3) float32s in the trainer, and the usable rows in its checkpoints. A reused
    # row's loss is sent again, so with drop_learned the exclusion window counts that one observation twice.
    embedding_max_age: int = 0
    # A longer age for the rows of examples the model had learned when they were embedded (their loss at most
    # learned_embedding_loss nats; 0.05: the model gave the label p >= 0.95, the logit gradient's norm under ~0.07):
    # such a row stays near 0 while the example stays learned, and late in a run most candidates are such examples.
    # 0 gives them embedding_max_age like every other row; else at least embedding_max_age.
    learned_embedding_max_age: int = 0
    learned_embedding_loss: float = 0.05
    # Refresh those stored rows from the training steps' own logits too (``CoresetLoader.observe_logits``, called by
    # the training loop with the logits of the batch it trains on): the trained examples' rows and losses then date
    # from their last training step, not from the round that drew them, at the cost of a softmax per step. Needs
    # the logit-gradient embedding and a max age above; the training forward runs in the model's training mode and
    # precision, so a model whose train and eval outputs differ (dropout, batch norm) stores the train-mode ones.
    training_logits: bool = False
    # Capacity of the prefetch queue, in batches; the stream thread blocks when it is full.
    queue_size: int = 32
    # Longest wait, in seconds, at a switch step for a late round before yielding a uniform batch instead.
    deadline_s: float = 2.0
    # The same for the first round of a run (nothing to train on before it), and for creating a session.
    first_batch_timeout_s: float = 60.0
    # Raise SelectionUnavailable / TimeoutError instead of falling back to uniform batches.
    strict: bool = False
    # A failure the service will repeat (INTERNAL, UNKNOWN, DATA_LOSS: a selector that cannot import faiss, a
    # bug) is logged as an error and falls back like an outage; after this many identical ones in a row (the
    # same code and message up to the round numbers and session ids in it; a round delivered in between resets
    # the count) the loader raises SelectionUnavailable with the service's message even when strict is False.
    # A few, not 1: a one-off fault of one round should not stop a long run.
    max_persistent_failures: int = 3
    # Reconnection backoff after a service failure: first delay and cap, in seconds (doubling in between).
    reconnect_initial_s: float = 0.5
    reconnect_max_s: float = 30.0
    # Key of the weights in dict batches (tuple batches get them appended).
    weights_key: str = "weights"
    # Job name shown in the service's logs.
    client_name: str = "trainer"
    # Start the next round on the service (StartRound, about 1.6 ms over loopback) on the stream thread as soon as
    # its size is known (at the switch, after the fit), so that the step that asks for it finds the plan there
    # instead of waiting for the call. The plan's ids are those the call at that step would draw; False makes the
    # call at that step, as before.
    prefetch_rounds: bool = True

    def __post_init__(self) -> None:
        if self.coreset_weights not in CORESET_WEIGHTS:
            raise ValueError(
                f"coreset_weights must be one of {', '.join(CORESET_WEIGHTS)}, received {self.coreset_weights!r}"
            )
        if self.embed_dtype not in EMBED_DTYPES:
            raise ValueError(f"embed_dtype must be one of {', '.join(EMBED_DTYPES)}, received {self.embed_dtype!r}")
        if self.fit_examples < 0 or self.check_examples < 0:
            raise ValueError(
                f"fit_examples and check_examples must be >= 0 (0: all), received {self.fit_examples} and "
                f"{self.check_examples}"
            )
        if not (math.isfinite(self.drop_threshold) and self.drop_threshold >= 0) or not (
            self.drop_window >= 0 and 0 <= self.min_pool_fraction <= 1
        ):
            raise ValueError(
                f"drop_threshold must be a finite loss >= 0, drop_window >= 0 and min_pool_fraction in [0, 1] (0: the "
                f"service's default); received {self.drop_threshold}, {self.drop_window}, {self.min_pool_fraction}"
            )
        if self.embedding_max_age < 0:
            raise ValueError(f"embedding_max_age must be >= 0 steps (0: off), received {self.embedding_max_age}")
        if self.learned_embedding_max_age and not (
            self.learned_embedding_max_age >= self.embedding_max_age
            and math.isfinite(self.learned_embedding_loss)
            and self.learned_embedding_loss >= 0
        ):
            raise ValueError(
                f"learned_embedding_max_age must be 0 (off) or >= embedding_max_age ({self.embedding_max_age}) steps, "
                f"and learned_embedding_loss a finite loss >= 0; received {self.learned_embedding_max_age} and "
                f"{self.learned_embedding_loss}"
            )
        if self.training_logits and (
            self.embedding != "logit_gradient" or not (self.embedding_max_age or self.learned_embedding_max_age)
        ):
            raise ValueError(
                "training_logits needs embedding='logit_gradient' and embedding_max_age or learned_embedding_max_age "
                f"above 0 (the rows it refreshes); received embedding={self.embedding!r}, embedding_max_age="
                f"{self.embedding_max_age}, learned_embedding_max_age={self.learned_embedding_max_age}"
            )
        if self.embed_batch_size < 1:
            raise ValueError(f"embed_batch_size must be >= 1, received {self.embed_batch_size}")
        if self.max_persistent_failures < 1:
            raise ValueError(f"max_persistent_failures must be >= 1, received {self.max_persistent_failures}")


@dataclass
class LoaderStats:
    """Counters of one loader; ``wait_s`` is time the training loop spent blocked on the service.

    Under DDP they count this rank's work (its share of the batches, embeddings and checks);
    ``service_errors``, ``persistent_failures`` and ``sessions_opened`` are rank 0's, mirrored;
    ``batches_received`` is 0 on the other ranks (rank 0 receives the coresets and broadcasts them).
    """

    steps: int = 0
    examples_backpropagated: int = 0
    examples_embedded: int = 0
    embeddings_reused: int = 0  # round candidates whose embedding an earlier round took (the two max ages)
    reused_age_steps: int = 0  # their ages summed, in steps (mean age: this / embeddings_reused)
    training_rows: int = 0  # cache rows refreshed from the training steps' logits (LoaderConfig.training_logits)
    rounds_started: int = 0
    regions: int = 0
    batches_received: int = 0
    checks: int = 0  # Taylor checks (forward passes on the round's random subsets)
    reselections: int = 0  # regions ended by a failed check (or by the fixed rule)
    late_steps: int = 0  # steps at which a due round had not arrived (each yields a fallback batch)
    fallback_batches: int = 0  # uniformly sampled batches (weights 1) yielded instead of coresets
    service_errors: int = 0  # failed calls to the service, of every kind the loader rides out
    persistent_failures: int = 0  # those of them the service would repeat (INTERNAL, UNKNOWN, DATA_LOSS)
    partial_rounds: int = 0  # regions switched to with fewer coresets than asked for (the stream ended early)
    duplicate_batches: int = 0  # batches of a subset already received in their round (dropped)
    sessions_opened: int = 0
    wait_s: float = 0.0
    embed_s: float = 0.0
    check_s: float = 0.0
    fit_s: float = 0.0
    rounds_prefetched: int = 0  # rounds whose StartRound ran ahead, on the stream thread (rank 0's, mirrored)
