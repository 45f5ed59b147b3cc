"""Per-step overhead of the trainer integrations against each framework's own loop on the same model.

    crest bench integrations            # Hugging Face Trainer and Lightning, 10 interleaved blocks of 100 steps
    crest bench integrations --quick    # 2 blocks of 40 steps on 1,000 examples (the test suite's mode)

Each framework trains the same seeded model on Fashion-MNIST three ways, side by side in one process, in
interleaved blocks (after one unmeasured warm-up block; the order rotates every block) so that a busy spell of the
machine touches all three:

- ``plain``: the framework's own loop on its own shuffled DataLoader, unweighted loss (``Trainer`` with a tiny
  ResNet built from its config; a ``LightningModule`` around the project's SmallCNN);
- ``uniform``: the integration (``CoresetTrainer`` / ``CoresetDataModule``) on uniform-random weighted batches
  (weights 1) drawn in the trainer, no service: what the integration's plumbing costs (batch assembly by id, the
  micro-batch split, the weighted loss, the weights on every batch);
- ``crest``: the integration on coresets from a local service (``crest serve --backend local``, one selector
  thread, in its own process as deployed), fixed regions of 20 steps.

A step's time is the wall clock between two consecutive optimizer-step callbacks, the first ``WARMUP`` steps of
every block left out (start-up, the first round). Reported per framework: mean ms per step of each way (the
wall-clock ratio) and its ratio to ``plain``; the **paired ratio**, the median over the rotations of each way's
mean step against ``plain``'s in the same rotation (this box's speed drifts by 10-30% over tens of seconds, so
only blocks run next to each other compare fairly); the median step's ratio (it leaves out the steps that embed a
round); and CREST's own passes (the no-grad embedding of each round's candidates, from ``LoaderStats`` deltas
over the measured steps) and its waits for the service, separately, with the ratios once they are taken out.
The round's other service calls (StartRound, handing over the embeddings, receiving the coresets) stay in the
steps. Writes JSON (default results/integrations.json).
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from crest_bench.report import machine, write_json

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

WAYS = ("plain", "uniform", "crest")
FRAMEWORKS = ("hf", "lightning")
WARMUP = 5  # steps of each block left out of the timing
LOOKAHEAD = 2  # CREST: steps between a round's start and the switch to its coresets


@dataclass(frozen=True, kw_only=True)
class IntegrationsConfig:
    """One benchmark run."""

    # Training examples (the first N of Fashion-MNIST's training split) and the batch per optimizer step.
    train_limit: int = 6000
    batch_size: int = 64
    # Optimizer steps per block, and blocks per way (interleaved).
    steps: int = 100
    blocks: int = 10
    # CREST: fixed regions of this many steps (one embedding pass of a round's candidates each), random subsets
    # per round and their size as a fraction of the data.
    steps_per_round: int = 20
    num_subsets: int = 2
    subset_fraction: float = 0.05
    # torch intra-op threads of the trainer (the selector thread gets the other core).
    threads: int = 1


@dataclass
class Timing:
    """The measured steps of one way, over every block."""

    step_s: list[float] = field(default_factory=list)  # each measured step's wall time
    # CREST: each measured step's wall time less the passes run in it, by its position in the region (0: the step
    # that starts a round and embeds its candidates; the step after a round's switch is ``lookahead_steps`` on)
    by_position_s: dict[int, list[float]] = field(default_factory=dict)
    block_s: list[float] = field(default_factory=list)  # each block's mean measured step
    block_passes_s: list[float] = field(default_factory=list)  # CREST: each block's passes per measured step
    embed_s: float = 0.0  # CREST: no-grad passes over the measured steps (embedding, checks, fits)
    wait_s: float = 0.0  # CREST: time blocked on the service over the measured steps
    fallback_batches: int = 0

    def ms(self) -> float:
        return 1e3 * float(np.mean(self.step_s))

    def median_ms(self) -> float:
        return 1e3 * float(np.median(self.step_s))


class StepClock:
    """Time stamps of optimizer steps and, at each, the loader's counters (``counters``): a step's passes and waits,
    and its position in its region."""

    def __init__(self, loader: Callable[[], Any]) -> None:
        self.stamps: list[float] = []
        self.loader = loader  # () -> the CoresetLoader of the run, or None
        self.counts: list[tuple[int, float, float]] = []  # ``counters()`` at each stamp

    def tick(self) -> None:
        self.stamps.append(time.perf_counter())
        self.counts.append(self.counters())

    def counters(self) -> tuple[int, float, float]:
        """The loader's rounds started, passes (s) and waits (s) so far; zeros without a ``CoresetLoader``."""
        loader = self.loader()
        if loader is None or not hasattr(loader, "stats"):
            return 0, 0.0, 0.0
        s = loader.stats
        return s.rounds_started, s.embed_s + s.check_s + s.fit_s, s.wait_s

    def add_to(self, timing: Timing) -> None:
        steps = np.diff(self.stamps[WARMUP - 1 :])
        timing.step_s.extend(steps.tolist())
        timing.block_s.append(float(steps.mean()))
        if len(self.counts) >= WARMUP:
            (_, passes0, wait0), (_, passes, wait) = self.counts[WARMUP - 1], self.counters()
            timing.embed_s += passes - passes0
            timing.wait_s += wait - wait0
            timing.block_passes_s.append((passes - passes0) / len(steps))
        loader = self.loader()
        if loader is not None and hasattr(loader, "stats"):
            timing.fallback_batches += loader.stats.fallback_batches
        self._by_position(timing)

    def _by_position(self, timing: Timing) -> None:
        """Each measured step (from stamp i - 1 to i) under its position after the last round start, less its
        passes; steps before the block's first measured round start are left out (all of them without a loader)."""
        last_start: int | None = None
        for i in range(1, len(self.stamps)):
            (r0, p0, _), (r1, p1, _) = self.counts[i - 1], self.counts[i]
            if r1 > r0:
                last_start = i
            if last_start is None or i < WARMUP:
                continue
            step = self.stamps[i] - self.stamps[i - 1] - (p1 - p0)
            timing.by_position_s.setdefault(i - last_start, []).append(step)


class UniformBatches:
    """Uniform-random weighted batches (weights 1) in the shape ``CoresetLoader`` yields them, with no service:
    what ``StepBatches`` needs of a loader (``labels``, ``config``, iteration, ``close``)."""

    def __init__(self, dataset: Any, labels: np.ndarray, batch_size: int, collate: Callable[[list[Any]], Any]) -> None:
        from trainer_client.loader import LoaderConfig

        self.dataset, self.labels, self.collate = dataset, labels, collate
        self.config = LoaderConfig(batch_size=batch_size)
        self.rng = np.random.default_rng(0)

    def __iter__(self) -> Iterator[Any]:
        import torch

        from trainer_client.batches import collate_ids, with_weights

        while True:
            ids = np.sort(self.rng.choice(len(self.labels), self.config.batch_size, replace=False))
            batch = collate_ids(self.dataset, self.collate, ids)
            yield with_weights(batch, torch.ones(len(ids)), self.config.weights_key)

    def close(self, end_session: bool = True) -> None:
        pass


# -- Hugging Face ----------------------------------------------------------------------------------------------


def _hf_block(way: str, cfg: IntegrationsConfig, target: str, out_dir: str) -> StepClock:
    import torch
    from torch.utils.data import Dataset
    from transformers import ResNetConfig, ResNetForImageClassification, Trainer, TrainerCallback, TrainingArguments

    from trainer_client.data import FashionMNIST
    from trainer_client.integrations.hf import CoresetTrainer
    from trainer_client.integrations.steps import StepBatches, dataset_labels

    class Pixels(Dataset):
        def __init__(self) -> None:
            self.data = FashionMNIST("train", limit=cfg.train_limit)

        def __len__(self) -> int:
            return len(self.data)

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            x, y = self.data[i]
            return {"pixel_values": x, "labels": y}

    class UniformTrainer(CoresetTrainer):
        def get_train_dataloader(self) -> Any:
            collate = self._get_collator_with_removed_columns(self.data_collator, description="training")
            labels = dataset_labels(self.train_dataset)
            return StepBatches(UniformBatches(self.train_dataset, labels, cfg.batch_size, collate))  # type: ignore[arg-type]

    trainer: Any = None
    clock = StepClock(lambda: getattr(trainer, "coreset_loader", None))

    class Tick(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            clock.tick()

    torch.manual_seed(0)
    config = ResNetConfig(num_channels=1, embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1])
    config.num_labels = 10
    args = TrainingArguments(
        output_dir=out_dir,
        max_steps=cfg.steps,
        per_device_train_batch_size=cfg.batch_size,
        learning_rate=1e-2,
        save_strategy="no",
        logging_strategy="no",
        report_to=[],
        use_cpu=True,
        dataloader_pin_memory=False,
        disable_tqdm=True,
    )
    common: dict[str, Any] = {"model": ResNetForImageClassification(config), "args": args, "train_dataset": Pixels()}
    if way == "plain":
        trainer = Trainer(**common, callbacks=[Tick()])
    elif way == "uniform":
        trainer = UniformTrainer(**common, endpoint=target, callbacks=[Tick()])
    else:
        trainer = CoresetTrainer(**common, endpoint=target, loader_config=_loader_config(cfg), callbacks=[Tick()])
    trainer.train()
    return clock


# -- Lightning --------------------------------------------------------------------------------------------------


def _lightning_block(way: str, cfg: IntegrationsConfig, target: str, out_dir: str) -> StepClock:
    import lightning.pytorch as pl
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, default_collate

    from trainer_client.data import FashionMNIST
    from trainer_client.embeddings import weighted_loss
    from trainer_client.integrations.lightning import CoresetDataModule
    from trainer_client.integrations.steps import StepBatches
    from trainer_client.models import SmallCNN

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # set to INFO when lightning loads

    class Classifier(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = SmallCNN()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            if len(batch) == 3:
                x, y, w = batch
                return weighted_loss(self(x), y, w)
            x, y = batch
            return F.cross_entropy(self(x), y)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    class UniformData(CoresetDataModule):
        def train_dataloader(self) -> Any:
            labels = np.asarray(data.targets)
            return StepBatches(UniformBatches(data, labels, cfg.batch_size, default_collate))  # type: ignore[arg-type]

    module: Any = None
    clock = StepClock(lambda: getattr(module, "loader", None))

    class Tick(pl.Callback):
        def on_train_batch_end(self, *args: Any, **kwargs: Any) -> None:
            clock.tick()

    pl.seed_everything(0, verbose=False)
    data = FashionMNIST("train", limit=cfg.train_limit)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=cfg.steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[Tick()],
        default_root_dir=out_dir,
    )
    if way == "plain":
        trainer.fit(Classifier(), DataLoader(data, batch_size=cfg.batch_size, shuffle=True))
    else:
        kind = UniformData if way == "uniform" else CoresetDataModule
        module = kind(data, target, batch_size=cfg.batch_size, loader_config=_loader_config(cfg))
        trainer.fit(Classifier(), datamodule=module)
    return clock


BLOCKS: dict[str, Callable[[str, IntegrationsConfig, str, str], StepClock]] = {
    "hf": _hf_block,
    "lightning": _lightning_block,
}


def _loader_config(cfg: IntegrationsConfig) -> Any:
    from trainer_client import LoaderConfig, RegionConfig

    # The recommended recipe with this benchmark's round shape (a small dataset's subsets, a fixed round length).
    return LoaderConfig(
        subset_fraction=cfg.subset_fraction,
        num_subsets=cfg.num_subsets,
        region=RegionConfig(mode="fixed", steps_per_round=cfg.steps_per_round),
        lookahead_steps=LOOKAHEAD,
        client_name="bench-integrations",
    )


def paired(way_s: list[float], plain_s: list[float]) -> dict[str, float]:
    """Block-by-block ratios of a way's mean step to plain's in the same rotation: median, min and max."""
    ratios = np.asarray(way_s) / np.asarray(plain_s)
    return {"median": float(np.median(ratios)), "min": float(ratios.min()), "max": float(ratios.max())}


def round_cost(by_position_s: dict[int, list[float]], steps_per_round: int, settled_from: int) -> dict[str, Any]:
    """What a round costs CREST's steps besides its passes, from the steps timed by position in their region.

    The steps from ``settled_from`` on (the round and its switch are over) are the baseline: their median. Each
    earlier position costs its median step above it; their sum is the round's fixed cost, and per step of a round
    it sets the framework step time at which that cost alone would be 5% (it is fixed, so faster steps pay a
    larger share of it; 0 when the round's steps measured no slower than the settled ones).
    """
    settled = [t for pos, ts in by_position_s.items() if settled_from <= pos < steps_per_round for t in ts]
    if not settled:
        return {}
    base = float(np.median(settled))
    extra = {
        pos: 1e3 * (float(np.median(by_position_s[pos])) - base) for pos in range(settled_from) if pos in by_position_s
    }
    per_round = sum(extra.values())
    return {
        "settled_median_ms": 1e3 * base,
        "extra_ms_by_position": {str(pos): ms for pos, ms in extra.items()},
        "round_extra_ms": per_round,
        "five_percent_at_step_ms": max(0.0, per_round) / steps_per_round / 0.05,
    }


def summarise(timings: dict[str, Timing], cfg: IntegrationsConfig) -> dict[str, Any]:
    """Per way: ms per step and the ratio to plain (pooled and paired by rotation); CREST's passes and waits per
    step, and its ratios without them; what a round costs its steps (``round_cost``)."""
    plain = timings["plain"]
    out: dict[str, Any] = {}
    for way, t in timings.items():
        out[way] = {
            "ms_per_step": t.ms(),
            "ratio_to_plain": t.ms() / plain.ms(),
            "paired_ratio_to_plain": paired(t.block_s, plain.block_s),
            "median_ms_per_step": t.median_ms(),
            "median_ratio_to_plain": t.median_ms() / plain.median_ms(),
            "measured_steps": len(t.step_s),
        }
    crest = timings["crest"]
    steps = len(crest.step_s)
    passes_ms, wait_ms = 1e3 * crest.embed_s / steps, 1e3 * crest.wait_s / steps
    without = np.asarray(crest.block_s) - np.asarray(crest.block_passes_s)
    out["crest"].update(
        {
            "embedding_ms_per_step": passes_ms,
            "wait_ms_per_step": wait_ms,
            "ratio_to_plain_without_embedding": (crest.ms() - passes_ms) / plain.ms(),
            "paired_ratio_to_plain_without_embedding": paired(without.tolist(), plain.block_s),
            "ratio_to_plain_without_embedding_and_wait": (crest.ms() - passes_ms - wait_ms) / plain.ms(),
            "fallback_batches": crest.fallback_batches,
        }
    )
    # A round: its start (the pass), the steps while the stream thread sends and the service selects, and the
    # switch ``LOOKAHEAD`` steps on with the step after it; settled from there.
    out["crest"]["round_cost"] = round_cost(crest.by_position_s, cfg.steps_per_round, LOOKAHEAD + 2)
    return out


def run(args: argparse.Namespace) -> int:
    """``crest bench integrations``: every framework's three ways in interleaved blocks; prints and writes JSON."""
    import torch

    from selector_service.process import spawn_service

    cfg = IntegrationsConfig(train_limit=1000, steps=40, blocks=2) if args.quick else IntegrationsConfig()
    if args.steps is not None or args.blocks is not None:
        cfg = IntegrationsConfig(
            **{**vars(cfg), "steps": args.steps or cfg.steps, "blocks": args.blocks or cfg.blocks},
        )
    frameworks = [f for f in args.frameworks.split(",") if f]
    unknown = sorted(set(frameworks) - set(FRAMEWORKS))
    if unknown:
        raise SystemExit(f"unknown frameworks {unknown}; choose from {','.join(FRAMEWORKS)}")
    torch.set_num_threads(cfg.threads)
    for noisy in ("transformers", "lightning", "lightning.pytorch", "trainer_client", "selector_service"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    results: dict[str, Any] = {}
    # The service in its own process, as deployed: its threads do not share this interpreter's lock.
    serve = ["--host", "127.0.0.1", "--port", "0", "--backend", "local", "--num-workers", "1"]
    with spawn_service(serve) as service, tempfile.TemporaryDirectory() as out_dir:
        for framework in frameworks:
            timings = {way: Timing() for way in WAYS}
            BLOCKS[framework]("plain", cfg, service.target, out_dir)  # warm-up, not measured
            for block in range(cfg.blocks):
                for i in range(len(WAYS)):  # the order rotates, so no way always runs first
                    way = WAYS[(block + i) % len(WAYS)]
                    BLOCKS[framework](way, cfg, service.target, out_dir).add_to(timings[way])
            results[framework] = summarise(timings, cfg)
            _print(framework, results[framework])
    report = {**machine(), "quick": args.quick, "argv": getattr(args, "argv", None), "config": vars(cfg)}
    report["results"] = results
    out = Path(args.out)
    write_json(out, report)
    print(f"wrote {out}")
    return 0


def _print(framework: str, r: dict[str, Any]) -> None:
    c = r["crest"]
    print(
        f"{framework}: plain {r['plain']['ms_per_step']:.1f} ms/step; uniform {r['uniform']['ms_per_step']:.1f} "
        f"(x{r['uniform']['ratio_to_plain']:.3f}); crest {c['ms_per_step']:.1f} (x{c['ratio_to_plain']:.3f}), of "
        f"which embedding {c['embedding_ms_per_step']:.1f} and waiting {c['wait_ms_per_step']:.1f} ms/step: "
        f"x{c['ratio_to_plain_without_embedding']:.3f} without embedding, "
        f"x{c['ratio_to_plain_without_embedding_and_wait']:.3f} without both; median step: uniform "
        f"x{r['uniform']['median_ratio_to_plain']:.3f}, crest x{c['median_ratio_to_plain']:.3f}"
    )
    u, cp, cw = (
        r["uniform"]["paired_ratio_to_plain"],
        c["paired_ratio_to_plain"],
        c["paired_ratio_to_plain_without_embedding"],
    )
    print(
        f"{framework}, paired by rotation (median [min, max]): uniform x{u['median']:.3f} [{u['min']:.3f}, "
        f"{u['max']:.3f}]; crest x{cp['median']:.3f} [{cp['min']:.3f}, {cp['max']:.3f}], without embedding "
        f"x{cw['median']:.3f} [{cw['min']:.3f}, {cw['max']:.3f}]"
    )
    rc = c["round_cost"]
    if rc:
        by_position = ", ".join(f"{pos}: {ms:+.2f}" for pos, ms in rc["extra_ms_by_position"].items())
        print(
            f"{framework}, a round's first steps besides their passes, ms above the region's settled median step "
            f"({rc['settled_median_ms']:.2f} ms) by position ({by_position}): {rc['round_extra_ms']:.2f} ms a round, "
            f"5% of a framework step of {rc['five_percent_at_step_ms']:.2f} ms"
        )
