"""The training benchmark's methods and one run of one of them (see ``benchmarks/train.py`` for the protocol).

Every method yields batch ids and weights (CREST's ``CoresetLoader`` yields the batch itself); ``run_one``
trains on them with the same model, optimizer and schedule, the same batch assembly (``train_data.fetch``),
and records, besides the accuracy curve, the mean per-example loss of the trained batches, CREST's selection
difficulty per round (``trainer_client.difficulty``) and the fraction of the data left out of sampling (CREST's
learned-example exclusion, InfoBatch's pruning).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Subset

from crest.selector.v1 import codec
from crest_bench._progress import Progress
from crest_bench.train_data import DEFAULT_HOOK, BenchData, fetch
from trainer_client import CoresetLoader, LoaderConfig, SelectionClient, WeightedBatch
from trainer_client.train import evaluate

METHODS = ("full", "random", "crest", "infobatch", "balanced", "crest-measure", "crest-govern")
# CREST with its payoff measured ("crest-measure") or governing ("crest-govern", LoaderConfig.payoff) on a probe set
# of PROBE_EXAMPLES training examples held out of its training set.
SELECTING = ("crest", "crest-measure", "crest-govern")
PROBE_EXAMPLES = 500
# What runs when --methods is not given: the frontier's four; "balanced" (the control of CREST's class-balanced
# subsets, which matters on skewed tasks) is asked for by name.
DEFAULT_METHODS = METHODS[:4]

Batches = Iterator[tuple[np.ndarray, np.ndarray]]  # (ids int64 (b,), weights float32 (b,)) forever


@dataclass(frozen=True, kw_only=True)
class BenchConfig:
    """One benchmark: every method and seed on the same data."""

    # Dataset hook MODULE:FUNCTION or FILE.py:FUNCTION (benchmarks/train_data.py) and its --data-dir.
    dataset: str = DEFAULT_HOOK
    data_dir: str | None = None
    # Optimizer steps per run (the same for every method).
    steps: int = 1000
    batch_size: int = codec.DEFAULT_BATCH_SIZE
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    # First N training / test examples; None uses all (Fashion-MNIST: 60,000 / 10,000).
    train_limit: int | None = None
    test_limit: int | None = None
    # Curve: evaluate every this many steps on the first eval_examples test examples (clock paused). The batch
    # loss series is averaged over the same windows.
    eval_every: int = 50
    eval_examples: int = 2000
    # Target = the full-data run's final curve accuracy minus this (1%).
    target_drop: float = 0.01
    # CREST's selection settings (a recipe with overrides: LoaderConfig.from_recipe); each run sets its batch size
    # to batch_size and its seed to the run's.
    crest: LoaderConfig = field(default_factory=LoaderConfig)
    # InfoBatch: fraction of the below-mean-loss examples pruned each epoch, and the final fraction of
    # training on all data (the paper's delta = 0.875).
    prune: float = 0.5
    anneal: float = 0.125
    # torch intra-op threads of the trainer (the other core is the selectors').
    threads: int = 1

    def __post_init__(self) -> None:
        if self.lr <= 0 or not 0 <= self.momentum < 1:
            raise ValueError(f"lr must be > 0 and momentum in [0, 1); received {self.lr}, {self.momentum}")


@dataclass
class RunResult:
    """One method and seed. Times in seconds on the benchmark clock (evaluation excluded)."""

    method: str
    seed: int
    test_accuracy: float  # final, on the whole test split (test_limit)
    wall_s: float
    steps: int
    examples_backpropagated: int
    examples_forward_only: int  # no-grad forward passes besides training (CREST: embeddings)
    examples_forwarded: int  # training forwards plus forward-only passes
    wait_s: float  # trainer blocked on the service (CREST)
    embed_s: float = 0.0
    rounds: int = 0
    fallback_batches: int = 0
    # CREST: the service's selection wall time (its selector actors, off the trainer's critical path), each
    # selector call counted once (batches selected together share their call's time), and the number of calls.
    selection_s: float = 0.0
    selection_calls: int = 0
    # CREST: every LoaderStats counter (trainer_client.LoaderStats: embed_s, fit_s, check_s, wait_s, checks, ...).
    loader: dict[str, float] = field(default_factory=dict)
    curve: list[dict[str, float]] = field(default_factory=list)  # {"step", "time_s", "examples", "accuracy"}
    # Mean unweighted cross-entropy (nats) of the trained batches, at training time, per curve window:
    # {"step" (window end), "loss"}.
    batch_loss: list[dict[str, float]] = field(default_factory=list)
    # CREST: one trainer_client.RoundDifficulty per region (selected vs the round's ids, embedding-pass losses).
    difficulty: list[dict[str, float]] = field(default_factory=list)
    # Data left out of sampling: CREST's excluded examples at each region start ({"step", "round", "count",
    # "fraction"}), InfoBatch's pruned examples of each epoch ({"step", "epoch", "count", "fraction"}).
    excluded: list[dict[str, float]] = field(default_factory=list)
    # Tasks with corrupted labels (BenchData.flipped): the share of the trained examples, and of their loss
    # weight, whose label was flipped (uniform sampling: the corruption rate).
    flipped_share: float | None = None
    flipped_weight_share: float | None = None
    # The share of the trained examples in each class (index = class; uniform sampling: the data's shares).
    class_share: list[float] = field(default_factory=list)
    # Whether selection paid, as the run printed it (LoaderConfig.payoff; "" with it off).
    payoff: str = ""
    # Its measurements, costs and decisions at the end (CoresetLoader.payoff_state; None with it off).
    payoff_state: dict[str, Any] | None = None
    target_accuracy: float | None = None
    time_to_target_s: float | None = None
    speedup: float | None = None
    # CREST: does the selected examples' relative difficulty rise? (train_report.difficulty_trend)
    difficulty_trend: dict[str, Any] | None = None


@dataclass(frozen=True)
class EvalSets:
    """Evaluation tensors, built once per benchmark: (inputs, int64 labels)."""

    curve: tuple[torch.Tensor, torch.Tensor]  # the first eval_examples test examples, every eval_every steps
    test: tuple[torch.Tensor, torch.Tensor]  # the whole test split (test_limit), at the end
    # Score the mean of the per-class accuracies rather than the accuracy (BenchData.balanced_score).
    balanced: bool = False

    def score(self, model: torch.nn.Module, split: tuple[torch.Tensor, torch.Tensor]) -> float:
        """The score of ``model`` on ``split`` (``curve`` or ``test``): accuracy, or its per-class mean."""
        return balanced_accuracy(model, *split) if self.balanced else evaluate(model, *split)


def balanced_accuracy(model: torch.nn.Module, images: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean over the classes present in ``targets`` of the accuracy on that class's examples: on a
    class-balanced split it equals the accuracy; on a skewed one it estimates the accuracy on a balanced one."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        predicted = torch.cat([model(images[lo : lo + 2000]).argmax(1) for lo in range(0, len(targets), 2000)])
    model.train(was_training)
    classes = torch.unique(targets)
    return float(torch.stack([(predicted[targets == c] == c).float().mean() for c in classes]).mean())


class Clock:
    """A stopwatch that evaluations pause."""

    def __init__(self) -> None:
        self.elapsed = 0.0
        self._start: float | None = time.perf_counter()

    def pause(self) -> None:
        if self._start is not None:
            self.elapsed += time.perf_counter() - self._start
            self._start = None

    def resume(self) -> None:
        self._start = time.perf_counter()

    def read(self) -> float:
        return self.elapsed + (time.perf_counter() - self._start if self._start is not None else 0.0)


class _TimedClient(SelectionClient):
    """A ``SelectionClient`` that notes the service's selection time of every batch it streams.

    Batches selected by one selector call carry that call's time (``WeightedBatch.selection_ms``), so a call is
    keyed by (round, worker, selection_ms) and counted once; a resumed stream re-sends only the batches it lacked.
    """

    def __init__(self, target: str) -> None:
        super().__init__(target)
        self.calls: dict[tuple[int, str, float], None] = {}  # written by the loader's stream thread only

    def stream_batches(self, session_id: str, round_id: int, received: Iterable[int] = ()) -> Iterator[WeightedBatch]:
        for b in super().stream_batches(session_id, round_id, received):
            self.calls[(b.round_id, b.worker, b.selection_ms)] = None
            yield b

    def selection_s(self) -> float:
        return sum(ms for _, _, ms in list(self.calls)) / 1e3


# -- batch sources --------------------------------------------------------------------------------------------


def full_batches(n: int, batch_size: int, seed: int) -> Batches:
    rng = np.random.default_rng([seed, 10])
    ones = np.ones(batch_size, dtype=np.float32)
    while True:
        perm = rng.permutation(n)
        for lo in range(0, n - batch_size + 1, batch_size):  # drop the ragged last batch
            yield perm[lo : lo + batch_size], ones


def random_batches(n: int, batch_size: int, seed: int) -> Batches:
    rng = np.random.default_rng([seed, 11])
    ones = np.ones(batch_size, dtype=np.float32)
    while True:
        yield rng.choice(n, batch_size, replace=False), ones


def balanced_batches(labels: np.ndarray, batch_size: int, seed: int) -> Batches:
    """Uniform batches with an equal quota per class (the extra ones of ``batch_size % C`` to classes drawn at
    random each batch), each class's drawn without replacement: the class balance of CREST's random subsets
    without its selection, the control that separates the two on a skewed training set. int64 labels (N,)."""
    rng = np.random.default_rng([seed, 13])
    members = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    base, extra = divmod(batch_size, len(members))
    ones = np.ones(batch_size, dtype=np.float32)
    while True:
        quota = np.full(len(members), base)
        quota[rng.choice(len(members), extra, replace=False)] += 1
        yield np.concatenate([rng.choice(ids, q, replace=False) for ids, q in zip(members, quota, strict=True)]), ones


class InfoBatch:
    """InfoBatch-style pruning: losses of the last visit drive which examples the next epoch leaves out."""

    def __init__(self, n: int, config: BenchConfig, seed: int) -> None:
        self.n, self.config = n, config
        self.losses = np.full(n, np.inf, dtype=np.float64)  # unseen examples are never pruned
        self.rng = np.random.default_rng([seed, 12])
        self.pruned_total = 0
        self.epochs = 0
        self.excluded: list[dict[str, float]] = []  # per epoch: {"step", "epoch", "count", "fraction"}

    def batches(self, step: Iterator[int]) -> Batches:
        cfg = self.config
        while True:
            weights = np.ones(self.n, dtype=np.float32)
            keep = np.arange(self.n)
            now = next(step)
            pruned = np.zeros(0, dtype=np.int64)
            if now < (1 - cfg.anneal) * cfg.steps and np.isfinite(self.losses).any():
                seen = np.isfinite(self.losses)
                low = np.flatnonzero(seen & (self.losses < self.losses[seen].mean()))
                pruned = low[self.rng.random(len(low)) < cfg.prune]
                mask = np.ones(self.n, dtype=bool)
                mask[pruned] = False
                weights[low] = 1.0 / (1.0 - cfg.prune)  # kept low-loss examples stand for the pruned ones
                keep = np.flatnonzero(mask)
                self.pruned_total += len(pruned)
            self.excluded.append(
                {"step": now, "epoch": self.epochs, "count": len(pruned), "fraction": len(pruned) / self.n}
            )
            self.epochs += 1
            perm = self.rng.permutation(keep)
            for lo in range(0, len(perm) - cfg.batch_size + 1, cfg.batch_size):
                ids = perm[lo : lo + cfg.batch_size]
                yield ids, weights[ids]


# -- one run ----------------------------------------------------------------------------------------------------


def run_one(
    method: str,
    seed: int,
    config: BenchConfig,
    data: BenchData,
    evals: EvalSets,
    endpoint: str | None,
    progress: bool,
) -> RunResult:
    """Train one method from scratch for ``config.steps`` steps and measure it."""
    torch.manual_seed(seed)
    labels = data.train_labels
    assert labels is not None, "load_data fills the labels in"
    n = len(labels)
    clock = Clock()
    model = data.model()
    opt = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=config.steps)
    curve: list[dict[str, float]] = []
    batch_loss: list[dict[str, float]] = []
    window: list[float] = []
    excluded: list[dict[str, float]] = []
    backprop = 0
    loader: CoresetLoader | None = None
    client: _TimedClient | None = None
    info: InfoBatch | None = None
    current = [0]
    kept: np.ndarray | None = None  # the training ids of a run with a held-out probe set, by its loader's ids

    def step_counter() -> Iterator[int]:
        while True:
            yield current[0]

    source: Any
    if method == "full":
        source = full_batches(n, config.batch_size, seed)
    elif method == "random":
        source = random_batches(n, config.batch_size, seed)
    elif method == "balanced":
        source = balanced_batches(labels, config.batch_size, seed)
    elif method == "infobatch":
        info = InfoBatch(n, config, seed)
        source = info.batches(step_counter())
    elif method in SELECTING:
        assert endpoint is not None
        client = _TimedClient(endpoint)
        client.wait_ready(timeout_s=60)
        payoff = method.removeprefix("crest-") if method != "crest" else config.crest.payoff
        loader_config = replace(
            config.crest, batch_size=config.batch_size, seed=seed, client_name=f"bench-train-{seed}", payoff=payoff
        )
        train, train_labels, probe = data.train, labels, None
        if payoff != "off":  # the probe set is held out: ids are mapped back to the dataset's below
            keep, probe_ids = held_out(n, PROBE_EXAMPLES, seed)
            train, train_labels, probe = Subset(data.train, keep), labels[keep], Subset(data.train, probe_ids)
            kept = keep
        loader = CoresetLoader(
            train, model, client, train_labels, num_classes=data.num_classes, config=loader_config, probe=probe
        )
        source = iter(loader)
    else:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    flipped = data.flipped
    flipped_examples, flipped_weight, weight_total = 0, 0.0, 0.0  # trained on flipped labels, and all weight
    per_class = np.zeros(data.num_classes, dtype=np.int64)  # examples trained, by class

    def checkpoint(step: int) -> None:
        clock.pause()
        accuracy = evals.score(model, evals.curve)
        curve.append({"step": step, "time_s": clock.read(), "examples": backprop, "accuracy": accuracy})
        batch_loss.append({"step": step, "loss": float(np.mean(window))})
        window.clear()
        clock.resume()

    def record_excluded(loader: CoresetLoader, client: _TimedClient, done: int) -> None:
        """The service's excluded count at each new region (clock paused: a measurement, not CREST's work)."""
        clock.pause()
        assert loader.session is not None
        state = client.session_state(loader.session.session_id)
        for d in loader.difficulty[done:]:
            count = int(state.excluded_size)
            excluded.append({"step": d.start_step, "round": d.round, "count": count, "fraction": count / n})
        clock.resume()

    bar = Progress(f"seed {seed} {method:<9}", config.steps, enabled=None if progress else False)
    try:
        for step in range(config.steps):
            current[0] = step
            if loader is not None:
                x, y, w = next(source)
                ids = loader.last_ids if kept is None else kept[loader.last_ids]
                if len(loader.difficulty) > len(excluded):
                    assert client is not None
                    record_excluded(loader, client, len(excluded))
            else:
                ids, weights = next(source)
                x, y = fetch(data.train, ids)
                w = torch.from_numpy(weights)
            if flipped is not None:
                hit = flipped[ids]
                flipped_examples += int(hit.sum())
                flipped_weight += float(w[torch.from_numpy(hit)].sum())
                weight_total += float(w.sum())
            per_class += np.bincount(y.numpy(), minlength=data.num_classes)
            logits = model(x)
            if loader is not None and config.crest.training_logits:
                loader.observe_logits(logits)
            ce = F.cross_entropy(logits, y, reduction="none")
            loss = (ce * w.to(ce.dtype)).mean()  # trainer_client.weighted_loss, sharing the per-example losses
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
            seen = ce.detach()
            if info is not None:
                info.losses[ids] = seen.numpy()
            window.append(float(seen.mean()))
            backprop += len(y)
            if (step + 1) % config.eval_every == 0 or step + 1 == config.steps:
                checkpoint(step + 1)
            bar.update(step + 1, f"acc {curve[-1]['accuracy']:.3f}" if curve else "")
        wall = clock.read()
        stats = loader.stats if loader is not None else None
        payoff_line = loader.payoff_summary() if loader is not None else ""
        payoff_state = loader.payoff_state if loader is not None else None
    finally:
        bar.close()
        if loader is not None:
            loader.close()
        if client is not None:
            client.close()
    accuracy = evals.score(model, evals.test)
    forward_only = stats.examples_embedded if stats else 0
    return RunResult(
        method=method,
        seed=seed,
        test_accuracy=accuracy,
        wall_s=wall,
        steps=config.steps,
        examples_backpropagated=backprop,
        examples_forward_only=forward_only,
        examples_forwarded=backprop + forward_only,
        wait_s=stats.wait_s if stats else 0.0,
        embed_s=stats.embed_s if stats else 0.0,
        rounds=stats.rounds_started if stats else 0,
        fallback_batches=stats.fallback_batches if stats else 0,
        selection_s=client.selection_s() if client is not None else 0.0,
        selection_calls=len(client.calls) if client is not None else 0,
        loader=asdict(stats) if stats else {},
        curve=curve,
        batch_loss=batch_loss,
        difficulty=[asdict(d) for d in loader.difficulty] if loader is not None else [],
        excluded=info.excluded if info is not None else excluded,
        flipped_share=flipped_examples / backprop if flipped is not None else None,
        flipped_weight_share=flipped_weight / weight_total if flipped is not None else None,
        class_share=(per_class / max(1, backprop)).tolist(),
        payoff=payoff_line,
        payoff_state=payoff_state,
    )


def held_out(n: int, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(the rest, ``k`` ids drawn by ``seed``) of ``n`` examples, each int64 ascending: a payoff run's probe set."""
    probe = np.sort(np.random.default_rng([seed, 6]).choice(n, k, replace=False))
    return np.setdiff1d(np.arange(n), probe), probe


def warm_up(data: BenchData, config: BenchConfig) -> None:
    """A few untimed steps on a throwaway model, so the first method timed does not pay torch's start-up."""
    model = data.model()
    opt = torch.optim.SGD(model.parameters(), lr=config.lr)
    n = len(data.train)  # type: ignore[arg-type]
    x, y = fetch(data.train, np.arange(min(config.batch_size, n)))
    for _ in range(10):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
    evaluate(model, x, y)
