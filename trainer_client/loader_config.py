"""Settings, recipes, counters and errors of ``CoresetLoader`` (``trainer_client.loader``)."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field, fields, is_dataclass, replace
from typing import Any, Literal, get_args, get_origin, get_type_hints

import torch

from crest.selector.v1 import codec
from crest.selector.v1.settings import SelectionSettings
from trainer_client.governor import MAX_SCALE, schedule_valid
from trainer_client.region import RegionConfig


class SelectionUnavailable(RuntimeError):
    """The service failed and ``strict`` forbids training on uniform batches, or it failed the same way on its
    side ``max_persistent_failures`` times in a row; the message carries the service's."""


# LoaderConfig.selection: where the training batches come from.
Selection = Literal["crest", "uniform"]
# LoaderConfig.coreset_weights: the loss weight of a coreset example.
CoresetWeights = Literal["cluster", "uniform"]
CORESET_WEIGHTS: tuple[str, ...] = get_args(CoresetWeights)
# LoaderConfig.embed_dtype: the precision of the embedding pass ("auto": by the device, ``embed_dtype_for``).
EmbedDtype = Literal["auto", "float32", "bfloat16", "float16"]
EMBED_DTYPES: tuple[str, ...] = get_args(EmbedDtype)
Similarity = Literal["exp", "maxdist"]
EmbeddingKind = Literal["logit_gradient", "last_layer_gradient"]
# LoaderConfig.payoff: whether the run measures selection's payoff, and governs by it.
PayoffMode = Literal["off", "measure", "govern"]

# The committed result each tuned recipe reproduces (benchmarks/results/; the released one reproduces the released
# code). tests/test_recipes.py reads their command lines and recorded settings against RECIPES.
EVIDENCE: dict[str, str] = {
    "recommended": "benchmarks/results/frontier_clean_reuse_loss02.json",
    "long-tail": "benchmarks/results/frontier_longtail_reuse_loss02.json",
}


def _recommended_region() -> RegionConfig:
    return RegionConfig(mode="fixed", steps_per_round=20)


@dataclass(frozen=True, kw_only=True)
class LoaderConfig:
    """Selection settings sent to the service and how the loader schedules rounds.

    The defaults are the ``recommended`` recipe (``RECIPES``, below the class): the settings of the committed
    clean-task frontier (``EVIDENCE``), where CREST trained the better model per second than full data
    and random batches at every budget. ``LoaderConfig.from_recipe(name, **overrides)`` starts from another recipe
    (``long-tail``, ``released``); ``recipe`` records which one a config started from, and ``overrides()`` what it
    changed. Every field is also a flag of ``crest train`` and ``crest demo`` (``trainer_client.flags``): the
    comment above a field is its help text.
    """

    # The recipe these settings started from (RECIPES); runs print and record it.
    recipe: str = "recommended"
    # Where training batches come from: "crest", the service's coresets; "uniform", uniformly sampled batches with
    # weight 1 through the same schedule and input pipeline, and no service: a control run to compare against.
    selection: Selection = "crest"
    # Coreset size m per random subset, and the training batch size (CREST's 128).
    batch_size: int = codec.DEFAULT_BATCH_SIZE
    # Random-subset size r as a fraction of the dataset (recommended 0.5%: 1.2 candidates embedded per trained
    # example at 20-step regions of 10 coresets; CREST 1%).
    subset_fraction: float = 0.005
    # Random subsets (coresets) per round: a fixed region trains on all of them; CREST's adaptive P is capped by it.
    num_subsets: int = 10
    # Facility-location kernel: "exp" (CREST) or "maxdist" (CRAIG).
    similarity: Similarity = "exp"
    # Seeds the service's subset sampling, the loader's reshuffling and the Hutchinson probes.
    seed: int = 0
    # When a region ends (region.py): a fixed number of steps (recommended: 20), or CREST's Taylor check.
    region: RegionConfig = field(default_factory=_recommended_region)
    # Steps between asking for a round and switching to it: hides embedding and selection latency, at the cost
    # of selecting with a model that many steps older. 0 switches at once, as the released code does.
    lookahead_steps: int = 4
    # Selection feature: "logit_gradient" (C floats) or "last_layer_gradient" ((p - y) ⊗ [h, 1]).
    embedding: EmbeddingKind = "logit_gradient"
    # Random-projection dimension of the last-layer gradient; 0 sends all C·(H+1) values.
    embedding_dim: int = 0
    # CREST's Taylor check on a fixed seeded sample of this many of the round's random-subset ids; 0 uses them all
    # (CREST). The check costs one forward pass over them every interval steps: on a CPU this bounds its cost.
    check_examples: int = 0
    # Fit CREST's quadratic model (a gradient and a Hutchinson double backward per batch) on a seeded sample of
    # this many of the region's pool, with their weights; 0 fits on the whole pool (CREST). The weighted mean loss
    # of a uniform sample estimates the pool's, and the fit's cost falls with the sample.
    fit_examples: int = 0
    # Examples per forward and double backward of the quadratic model's fit; 0: this rank's share of a step,
    # batch_size / world size. The fit holds a double backward's graph of that many examples, so it must fit where a
    # training micro-batch does: the HF and Lightning integrations set it to theirs (batch_size there counts every
    # rank's accumulated micro-batches of an optimizer step).
    fit_batch_size: int = 0
    # The loss weight of each coreset example: "uniform", 1 for every example (recommended), or "cluster", the
    # size of its facility-location cluster scaled to mean 1 (CRAIG's gamma, as CREST trains). On Fashion-MNIST
    # uniform weights trained better per step (+0.4 to +1.0 points on a validation split); with 30% flipped
    # labels cluster weights were safer. The service sends the cluster sizes either way.
    coreset_weights: CoresetWeights = "uniform"
    # Learned-example exclusion in the service (CREST section 4, with re-admission): on in the recommended recipe,
    # off in the released code.
    drop_learned: bool = True
    # The exclusion rule: the cross-entropy in nats at or below which a recorded loss counts as learned.
    drop_threshold: float = codec.DEFAULT_DROP_THRESHOLD
    # The exclusion rule: recorded losses in a row that must all be under the threshold (an example is recorded
    # only when a round draws it, so in a short run few reach 5).
    drop_window: int = codec.DEFAULT_DROP_WINDOW
    # The exclusion rule: the sampling pool's floor, as a fraction of N.
    min_pool_fraction: float = codec.DEFAULT_MIN_POOL_FRACTION
    # Facility location over each whole random subset instead of per class (the subsets stay class-balanced): a
    # class whose logit gradients spread wider (a harder class) gets more of a coreset's picks. On in the
    # recommended recipe, off in the released code.
    joint_selection: bool = True
    # Examples per no-grad forward pass when embedding a round or checking the region. Larger batches were
    # slower per example on CPU (SmallCNN, one thread: 1,024 cost twice 128-256, from cache misses).
    embed_batch_size: int = 256
    # Precision of the no-grad embedding pass: "auto" (by the model's device, ``embed_dtype_for``: bfloat16 on a
    # GPU that has it and on a CPU with AVX512-BF16 or AMX, float16 on older GPUs, float32 elsewhere), or a dtype.
    # Selection ranks examples by these embeddings, so it needs no more precision than training; the Taylor check
    # and the quadratic model stay in float32. SmallCNN on two AVX512-BF16 cores: 35 against 59 us per example.
    embed_dtype: EmbedDtype = "auto"
    # Reuse a candidate's embedding (and loss) in a later round while it is at most this many optimizer steps old,
    # instead of running it through the model again; 0 embeds every round's ids afresh (CREST). Selection then sees
    # those candidates through a model up to this many steps older. Holds N·(d+3) float32s in the trainer.
    embedding_max_age: int = 60
    # A longer reuse age for the rows of examples the model had learned when they were embedded (their loss at
    # most learned_embedding_loss): such a row stays near 0 while the example stays learned. 0: no longer age.
    learned_embedding_max_age: int = 1000
    # The loss in nats at or below which an embedded example counts as learned for learned_embedding_max_age.
    learned_embedding_loss: float = 0.2
    # Refresh the stored rows from the training steps' own logits (the loop calls ``CoresetLoader.observe_logits``
    # with the logits of the batch it trains on). Needs the logit-gradient embedding and a max age above.
    training_logits: bool = False
    # Capacity of the prefetch queue, in batches; the stream thread blocks when it is full.
    queue_size: int = 32
    # Longest wait, in seconds, at a switch step for a late round before yielding a uniform batch instead.
    deadline_s: float = 2.0
    # The same for the first round of a run (nothing to train on before it), and for creating a session.
    first_batch_timeout_s: float = 60.0
    # Raise SelectionUnavailable / TimeoutError instead of falling back to uniform batches.
    strict: bool = False
    # Identical failures on the service's side (INTERNAL, UNKNOWN, DATA_LOSS) in a row after which the loader
    # raises SelectionUnavailable even when strict is False (a round delivered in between resets the count).
    max_persistent_failures: int = 3
    # Reconnection backoff after a service failure: first delay, in seconds (doubling up to reconnect_max_s).
    reconnect_initial_s: float = 0.5
    # Reconnection backoff after a service failure: the longest delay, in seconds.
    reconnect_max_s: float = 30.0
    # Key of the weights in dict batches (tuple batches get them appended).
    weights_key: str = "weights"
    # Job name shown in the service's logs.
    client_name: str = "trainer"
    # Start the next round on the service on the stream thread as soon as its size is known (at the switch), so
    # that the step that asks for it finds the plan there instead of waiting for the call.
    prefetch_rounds: bool = True
    # Whether selection pays on this run (docs/concepts/payoff.md): "measure" interleaves short segments of a
    # control arm (uniform batches, class-balanced when the labels are skewed) with selection and scores both on
    # the held-out probe set given to the loader (``CoresetLoader(probe=...)``), reporting selection's speedup per
    # step and per second with a 90% interval (``LoaderStats.payoff_*``); "govern" also trains on the control while
    # the test behind that interval says selection's progress per second is below the control's, probing at half
    # the rate, and selects again when it pays; "off".
    payoff: PayoffMode = "off"
    # Steps of one payoff segment of selection; a measurement takes three (selection, control, selection).
    payoff_segment_steps: int = 20
    # Steps of a control segment per step of a selection segment (1 to 25), or 0 for the arms' cost ratio per step,
    # rounded down, at each measurement's start: both arms' segments then take about the same time, so the
    # control's progress stands above SGD's noise even where a selection step costs many control steps (the
    # released recipe's, 11-17). Below a ratio of 2 (the tuned recipes' 1.0-1.4) 0 is 1.
    payoff_control_scale: int = 0
    # Segments from one measurement's start to the next (>= 4), doubled while governed onto the control.
    payoff_every: int = 10
    # The most measurements in a run that start 4 segments after the one before, taken while training is on
    # selection and the measurements since the last move look (before their noise is weighed) to say it loses:
    # where selection looks to lose the test then decides sooner, where it looks to pay the run spends no more
    # time on the control than payoff_every asks (docs/concepts/payoff.md, the tuning).
    payoff_burst: int = 4
    # Measurements a governing decision reads, of those since the governor last moved training: the last this
    # many (>= 2), or 0 for all of them (tuned: a window of 3-4 late in a clean run moved training off selection
    # on noise; all of them never did, and still moved the noisy-label run by its third measurement).
    payoff_window: int = 0

    def __post_init__(self) -> None:
        _check_choices(self)
        schedule = (self.payoff_segment_steps, self.payoff_every, self.payoff_window, self.payoff_burst)
        if not schedule_valid(*schedule, self.payoff_control_scale):
            raise ValueError(
                "payoff_segment_steps must be >= 1, payoff_every >= 4 segments, payoff_burst >= 0, payoff_window "
                f"0 (all measurements) or >= 2 and payoff_control_scale 0 (the cost ratio) to {MAX_SCALE}; received "
                f"{self.payoff_segment_steps}, {self.payoff_every}, {self.payoff_burst}, {self.payoff_window}, "
                f"{self.payoff_control_scale}"
            )
        if self.fit_batch_size < 0:
            raise ValueError(
                f"fit_batch_size must be >= 0 (0: this rank's share of batch_size), received {self.fit_batch_size}"
            )
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
        for name in ("batch_size", "num_subsets", "embed_batch_size", "max_persistent_failures", "queue_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, received {getattr(self, name)}")
        if not 0 < self.subset_fraction <= 1:
            raise ValueError(f"subset_fraction must be in (0, 1], received {self.subset_fraction}")
        if self.lookahead_steps < 0 or self.embedding_dim < 0:
            raise ValueError(
                f"lookahead_steps and embedding_dim must be >= 0, received {self.lookahead_steps} and "
                f"{self.embedding_dim}"
            )

    @classmethod
    def from_recipe(cls, name: str, **overrides: Any) -> LoaderConfig:
        """The recipe ``name`` (``RECIPES``) with ``overrides`` (field=value) on top.

        ``region`` takes a ``RegionConfig``. Raises ``ValueError`` naming an unknown recipe or field.
        """
        base = recipe(name)
        settings = {f.name for f in fields(cls)} - {"recipe"}
        unknown = sorted(set(overrides) - settings)
        if unknown:
            raise ValueError(f"LoaderConfig has no settings {unknown} (the recipe is the first argument)")
        return replace(base, **overrides)

    def embed_dtype_on(self, device: torch.device) -> str:
        """The embedding pass's precision on ``device``: ``embed_dtype``, with "auto" resolved by
        ``embed_dtype_for``."""
        return self.embed_dtype if self.embed_dtype != "auto" else embed_dtype_for(device)

    def wire_settings(self, embedding_dim: int = 0) -> SelectionSettings:
        """The settings a session on the service takes from these (``embedding_dim``: the rows' dimension, 0 for
        the number of classes)."""
        return SelectionSettings(
            subset_fraction=self.subset_fraction,
            num_subsets=self.num_subsets,
            batch_size=self.batch_size,
            similarity=self.similarity,
            seed=self.seed,
            embedding_kind=self.embedding,
            embedding_dim=embedding_dim,
            drop_learned=self.drop_learned,
            drop_threshold=self.drop_threshold,
            drop_window=self.drop_window,
            min_pool_fraction=self.min_pool_fraction,
            joint_selection=self.joint_selection,
        )

    def overrides(self) -> dict[str, Any]:
        """The settings where this config differs from its recipe, as {name: value}; a region setting is named
        ``region.<field>``."""
        return config_diff(recipe(self.recipe), self)

    def describe(self) -> str:
        """One line for logs and summaries: the recipe and what this config overrode."""
        changed = self.overrides()
        return f"recipe {self.recipe}" + (
            " (overrides: " + ", ".join(f"{k}={v!r}" for k, v in changed.items()) + ")" if changed else ""
        )


def config_diff(base: Any, other: Any, prefix: str = "") -> dict[str, Any]:
    """{dotted field name: value of ``other``} for each field of two dataclasses of one type that differs,
    descending into nested dataclasses (``region.tau``); ``recipe`` and ``client_name`` name the run, not its
    settings, and are skipped."""
    out: dict[str, Any] = {}
    for f in fields(base):
        a, b = getattr(base, f.name), getattr(other, f.name)
        if f.name in ("recipe", "client_name") or a == b:
            continue
        if is_dataclass(a) and is_dataclass(b):
            out.update(config_diff(a, b, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = b
    return out


def _choices(cls: type) -> dict[str, tuple[Any, ...]]:
    """{field: allowed values} of the ``Literal``-typed fields of a dataclass."""
    hints = get_type_hints(cls)
    return {f.name: get_args(hints[f.name]) for f in fields(cls) if get_origin(hints[f.name]) is Literal}


def _check_choices(config: object) -> None:
    for name, allowed in _choices(type(config)).items():
        value = getattr(config, name)
        if value not in allowed:
            raise ValueError(f"{name} must be one of {', '.join(map(str, allowed))}, received {value!r}")


def embed_dtype_for(device: torch.device) -> str:
    """The embedding pass's precision for ``embed_dtype="auto"`` on ``device``.

    - CUDA: "bfloat16" where the GPU has it (Ampere and newer), else "float16" (the pass takes no gradients, so
      float16's range needs no loss scaling); emulated bfloat16 on older GPUs is slower than float32.
    - CPU: "bfloat16" when the CPU has bfloat16 instructions (AVX512-BF16 or AMX: SmallCNN's pass 35 against 59 us
      per example on two such cores, docs/research/05-third-round.md); without them bfloat16 is emulated and slower, so
      "float32".
    - anything else: "float32".
    """
    if device.type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported(including_emulation=False) else "float16"
    if device.type == "cpu" and cpu_has_bfloat16():
        return "bfloat16"
    return "float32"


@functools.cache
def cpu_has_bfloat16() -> bool:
    """Whether this CPU has bfloat16 instructions (x86 AVX512-BF16 or AMX-BF16), from /proc/cpuinfo's flags;
    False where that file is absent (not Linux) or names neither."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


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
    input_wait_s: float = 0.0  # training-thread time spent getting training batches (collating them without workers)
    input_misses: int = 0  # training batches the workers had not fetched ahead (their step was not known in time)
    passes_ahead: int = 0  # embedding passes whose candidates the workers were given before the pass began
    # The payoff (LoaderConfig.payoff; rank 0's decisions, the same on every rank). None: not measured yet.
    control_steps: int = 0  # steps trained on the control arm (measurement segments, and governed ones)
    probe_s: float = 0.0  # time spent on the probe set's loss (charged to neither arm)
    payoff_measurements: int = 0  # A B A measurements recorded
    payoff_spoiled: int = 0  # measurements dropped: a selection segment trained on fallback batches
    payoff_arm: str = "selection"  # the arm training is governed onto ("control" only in govern mode)
    payoff_per_step: float | None = None  # selection's speedup per step over the control
    payoff_per_second: float | None = None  # ... per wall-second, each arm charged its costs
    payoff_per_second_lo: float | None = None  # its 90% interval (-inf/inf: not bounded by the data)
    payoff_per_second_hi: float | None = None


# -- recipes: complete LoaderConfig values, each from a committed result --------------------------------------------
#
# - ``recommended`` (``LoaderConfig()``): the clean Fashion-MNIST task's settings, from the committed clean
#   frontier (``benchmarks/results/frontier_clean_reuse_loss02.json``, test set, seeds 0-2): fixed 20-step regions
#   of 10 coresets from random subsets of r = 0.5%, each coreset selected over its whole subset and trained with
#   weight 1, a candidate's embedding reused for 60 steps (1,000 when its loss was at most 0.2 nats), the service's
#   learned-example exclusion on, the embedding pass's precision chosen by the device. There CREST trained the
#   better model per second than full data and random batches at every budget from 5% to 50%.
# - ``long-tail``: the long-tailed task's settings (``benchmarks/results/frontier_longtail_reuse_loss02.json``):
#   10-step regions, r = 1%, no reuse of fresh rows, learned rows reused for 200 steps.
# - ``released``: the released CREST code's settings (its argparse defaults, YuYang0901/CREST at 04ec1d7):
#   CREST's Taylor check ends regions (tau 0.1, a check every step until the curvature adapts it, the quadratic
#   model fitted on the whole pool with a Hutchinson double backward), P = 5 coresets of r = 1% subsets, per-class
#   selection, cluster-size weights, no exclusion, no reuse, float32, switching to a round as soon as it is asked
#   for. For fidelity studies and the paper's comparisons: the frontier measured it as the losing setting on the
#   clean task (CREST below full data at equal time).
#
# ``tests/test_recipes.py`` reads the command lines of the committed summaries and asserts that ``recommended`` and
# ``long-tail`` hold exactly their settings, so a default and its evidence cannot drift apart.

RECOMMENDED = LoaderConfig()

LONG_TAIL = replace(
    RECOMMENDED,
    recipe="long-tail",
    region=RegionConfig(mode="fixed", steps_per_round=10),
    subset_fraction=0.01,
    embedding_max_age=0,
    learned_embedding_max_age=200,
)

RELEASED = LoaderConfig(
    recipe="released",
    subset_fraction=0.01,
    num_subsets=5,
    region=RegionConfig(),
    lookahead_steps=0,
    coreset_weights="cluster",
    drop_learned=False,
    joint_selection=False,
    embed_dtype="float32",
    embedding_max_age=0,
    learned_embedding_max_age=0,
    learned_embedding_loss=0.05,
)

RECIPES: dict[str, LoaderConfig] = {c.recipe: c for c in (RECOMMENDED, LONG_TAIL, RELEASED)}


def recipe(name: str) -> LoaderConfig:
    """The recipe ``name``; ``ValueError`` naming the known ones otherwise."""
    try:
        return RECIPES[name]
    except KeyError:
        raise ValueError(f"unknown recipe {name!r}; the recipes are {', '.join(RECIPES)}") from None
