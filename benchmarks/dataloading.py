"""Input-pipeline throughput: ``CoresetLoader``'s DataLoader workers against a plain ``DataLoader``.

    crest bench dataloading            # W = 0, 1, 2; 3 interleaved rounds of 10 + 60 steps per run
    crest bench dataloading --quick    # W = 0, 1; 1 round of 5 + 25 steps on 10,000 examples (the test's mode)

The workload: Fashion-MNIST behind a CPU-heavy per-example transform written in torch ops (``augment``: bilinear
upsampling of the 28x28 image, a random resized crop back to 64x64 with antialiasing, a random horizontal flip,
normalisation), timed in this process before the runs (``transform_ms_per_example``) and again before every round,
and a model whose step costs far less than a batch's transforms (``tiny_net``), so that input is the bottleneck.
Three arms train it:

- ``plain``: ``DataLoader(shuffle=True, num_workers=W)``, unweighted cross-entropy;
- ``uniform``: ``CoresetLoader`` with ``LoaderConfig(selection="uniform")``, no service: uniform batches (weights 1)
  through the loader's input pipeline (``trainer_client/_fetch.py``, its forecast ``_forecast.py``);
- ``crest``: ``CoresetLoader`` with the recommended ``LoaderConfig()`` against ``crest serve --backend local`` (one
  selector thread) in a child process on loopback, as ``crest bench integrations`` runs it.

Every (arm, W) runs once per round (``order``: the arms of one W next to each other, the order of the Ws and of the
arms changed every round), so that a busy spell of the machine touches all of them and the arms compared at a W run
seconds apart; the medians over rounds are reported. A run takes ``warmup`` untimed steps (workers started, CREST's
first round), then ``steps`` timed ones. Per run: batches per second over the timed steps (the loop's wall clock:
fetch, forward, backward, optimizer step); the time blocked in ``next(iterator)``; for the loaders the
``LoaderStats`` deltas (``input_wait_s``, the training thread's time getting training batches; the model passes
``embed_s``, ``fit_s``, ``check_s``; ``wait_s`` on the service; ``input_misses``; ``passes_ahead``, the embedding
passes whose candidates the workers were given before the pass; ``fallback_batches``). The input
wait share of a step is ``input_wait / (wall - embed - fit - check)``: waiting for input, CREST's passes excluded
(the plain loader's input wait is its time blocked in ``next``). Writes JSON (default
benchmarks/results/dataloading_<machine>.json) and checks its two targets: uniform at >= 0.95x plain's
batches per second at every W, and CREST's input wait share at most 5% at every W >= 1.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import math
import os
import platform
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, get_worker_info

from crest_bench.report import machine, write_json
from trainer_client import CoresetLoader, LoaderConfig, SelectionClient
from trainer_client.data import MEAN, STD, FashionMNIST
from trainer_client.embeddings import weighted_loss

ARMS = ("plain", "uniform", "crest")
SERVICE = "crest serve --backend local --num-workers 1, a child process, gRPC on 127.0.0.1"
UNIFORM_TARGET = 0.95  # uniform's batches/s against plain's, at every W
WAIT_TARGET = 0.05  # CREST's input wait share of a step, embedding excluded, at every W >= 1
# The LoaderStats counters a run reports as deltas over its timed steps.
COUNTERS = (
    "input_wait_s",
    "input_misses",
    "passes_ahead",
    "embed_s",
    "fit_s",
    "check_s",
    "wait_s",
    "fallback_batches",
    "regions",
)
COUNTS = ("input_misses", "passes_ahead", "fallback_batches", "regions")  # of COUNTERS, the integer ones


@dataclass(frozen=True, kw_only=True)
class DataloadingConfig:
    """One benchmark run."""

    # Training examples: the first N of Fashion-MNIST's training split (None: all 60,000).
    train_limit: int | None = None
    # Examples per step, every arm (CREST's coresets are 128).
    batch_size: int = 128
    # Untimed steps per run (workers started, CREST's first round), then timed ones: the recommended recipe's
    # 20-step regions switch at steps 24, 44 and 64 (4 steps of lookahead), so 10 + 60 times 3 switches.
    warmup: int = 10
    steps: int = 60
    # Rounds: each runs every (arm, W) once; medians over them.
    repeats: int = 3
    workers: tuple[int, ...] = (0, 1, 2)
    # The transform: upsampled to this side (bilinear), then a random resized crop to ``crop`` (antialiased). 448
    # makes it cost 0.55 ms per example on one idle core of a 2-core Xeon with AMX (384: 0.43 ms; the workload
    # needs at least about 0.5).
    upsample: int = 448
    crop: int = 64
    # Examples whose transform is timed in this process before the runs.
    timed_examples: int = 400
    # Plain SGD.
    lr: float = 0.01
    # torch threads of the training process (the workers run one each, as DataLoader sets them).
    threads: int = 1
    # Pinned batches (every arm; without an accelerator both loaders ignore it, as a DataLoader does).
    pin_memory: bool = True
    seed: int = 0


QUICK = DataloadingConfig(train_limit=10_000, warmup=5, steps=25, repeats=1, workers=(0, 1), timed_examples=200)


# -- the workload ------------------------------------------------------------------------------------------------


def augment(x: torch.Tensor, gen: torch.Generator, upsample: int, crop: int) -> torch.Tensor:
    """One example's transform: float32 (1, 28, 28) in [0, 1] -> float32 (1, crop, crop), normalised.

    Bilinear upsampling to (upsample, upsample); a random resized crop (area 25-100% of the image, aspect ratio
    3/4-4/3, as torchvision's ``RandomResizedCrop`` draws them) resized to (crop, crop) with antialiasing; a
    horizontal flip with probability 1/2; normalisation by Fashion-MNIST's pixel mean and deviation. Every random
    draw comes from ``gen`` (a ``torch.Generator``).
    """
    side = upsample
    big = F.interpolate(x[None], size=(side, side), mode="bilinear", align_corners=False)
    area = side * side * float(torch.empty(()).uniform_(0.25, 1.0, generator=gen))
    ratio = math.exp(float(torch.empty(()).uniform_(math.log(3 / 4), math.log(4 / 3), generator=gen)))
    w = min(side, max(1, round(math.sqrt(area * ratio))))
    h = min(side, max(1, round(math.sqrt(area / ratio))))
    top = int(torch.randint(0, side - h + 1, (), generator=gen))
    left = int(torch.randint(0, side - w + 1, (), generator=gen))
    out = F.interpolate(
        big[:, :, top : top + h, left : left + w],
        size=(crop, crop),
        mode="bilinear",
        align_corners=False,
        antialias=True,
    )
    if float(torch.rand((), generator=gen)) < 0.5:
        out = out.flip(-1)
    return ((out - MEAN) / STD)[0]


class Augmented(Dataset):
    """Fashion-MNIST through ``augment``: ``ds[i]`` is (float32 (1, crop, crop), int64 label). Each process draws
    from its own generator (seeded by ``seed`` and the DataLoader worker's id), so augmentations differ between
    worker counts."""

    def __init__(self, cfg: DataloadingConfig) -> None:
        data = FashionMNIST("train", limit=cfg.train_limit)
        self.images = data.images * STD + MEAN  # back to [0, 1]: the transform normalises
        self.targets = data.targets
        self.upsample, self.crop, self.seed = cfg.upsample, cfg.crop, cfg.seed
        self._gen = torch.Generator()
        self._pid = -1

    def __len__(self) -> int:
        return len(self.targets)

    def _generator(self) -> torch.Generator:
        if self._pid != os.getpid():  # a new worker process: its own stream
            info = get_worker_info()
            self._gen = torch.Generator().manual_seed(1000 * self.seed + (0 if info is None else info.id + 1))
            self._pid = os.getpid()
        return self._gen

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return augment(self.images[i], self._generator(), self.upsample, self.crop), self.targets[i]


def tiny_net(crop: int) -> nn.Module:
    """A strided conv, a pool and a linear classifier on (1, crop, crop) input: a step costs a few ms."""
    pooled = crop // 2 // 4
    return nn.Sequential(
        nn.Conv2d(1, 8, 5, stride=2, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(4),
        nn.Flatten(),
        nn.Linear(8 * pooled * pooled, 10),
    )


def transform_ms(data: Augmented, n: int) -> float:
    """Mean ms per example of ``data[i]`` (the transform) in this process, after 20 untimed."""
    for i in range(20):
        data[i]
    start = time.perf_counter()
    for i in range(n):
        data[i % len(data)]
    return 1e3 * (time.perf_counter() - start) / n


def model_step_ms(cfg: DataloadingConfig, data: Augmented, steps: int = 20) -> float:
    """Mean ms of a training step (forward, backward, SGD) on one fixed batch: the model's share of a step."""
    model = tiny_net(cfg.crop)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr)
    x = torch.stack([data[i][0] for i in range(cfg.batch_size)])
    y = data.targets[: cfg.batch_size]
    for i in range(steps + 3):
        if i == 3:
            start = time.perf_counter()
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return 1e3 * (time.perf_counter() - start) / steps


# -- one run -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    """One (arm, W) run's timed steps. Seconds; counters are deltas over the timed steps (0 for ``plain``)."""

    arm: str
    workers: int
    repeat: int
    steps: int
    wall_s: float
    batches_per_s: float
    next_wait_s: float  # time blocked in next(iterator)
    input_wait_s: float  # plain: next_wait_s; the loaders: LoaderStats.input_wait_s
    input_wait_share: float  # input_wait_s / (wall_s - embed_s - fit_s - check_s)
    embed_s: float = 0.0
    fit_s: float = 0.0
    check_s: float = 0.0
    wait_s: float = 0.0  # blocked on the service
    input_misses: int = 0
    passes_ahead: int = 0  # embedding passes whose candidates were given to the workers before the pass began
    fallback_batches: int = 0
    regions: int = 0


def _counters(loader: Any) -> dict[str, float]:
    stats = loader.stats
    return {name: getattr(stats, name) for name in COUNTERS}


def _timed(
    arm: str,
    w: int,
    repeat: int,
    cfg: DataloadingConfig,
    batches: Iterator[Any],
    train: Callable[[Any], None],
    counters: Callable[[], dict[str, float]],
) -> Run:
    """Train ``warmup`` untimed then ``steps`` timed steps on ``batches``; the timed steps' numbers."""
    blocked, before, start = 0.0, counters(), time.perf_counter()
    for step in range(cfg.warmup + cfg.steps):
        if step == cfg.warmup:
            blocked, before, start = 0.0, counters(), time.perf_counter()
        t = time.perf_counter()
        batch = next(batches)
        blocked += time.perf_counter() - t
        train(batch)
    wall = time.perf_counter() - start
    after = counters()
    delta = {k: after[k] - before[k] for k in before}
    input_wait = delta.pop("input_wait_s", blocked)
    passes = delta.get("embed_s", 0.0) + delta.get("fit_s", 0.0) + delta.get("check_s", 0.0)
    return Run(
        arm=arm,
        workers=w,
        repeat=repeat,
        steps=cfg.steps,
        wall_s=wall,
        batches_per_s=cfg.steps / wall,
        next_wait_s=blocked,
        input_wait_s=input_wait,
        input_wait_share=input_wait / (wall - passes),
        **{k: int(v) if k in COUNTS else float(v) for k, v in delta.items()},
    )


def run_arm(arm: str, w: int, repeat: int, cfg: DataloadingConfig, data: Augmented, target: str) -> Run:
    """One timed run of ``arm`` with ``w`` workers (``target``: the service's HOST:PORT for ``crest``)."""
    torch.manual_seed(cfg.seed)
    model = tiny_net(cfg.crop)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr)
    pin = cfg.pin_memory

    def train(batch: Any) -> None:
        if len(batch) == 3:
            x, y, weights = batch
            loss = weighted_loss(model(x), y, weights)
        else:
            x, y = batch
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    if arm == "plain":
        plain = DataLoader(data, batch_size=cfg.batch_size, shuffle=True, num_workers=w, pin_memory=pin, drop_last=True)
        if len(plain) < cfg.warmup + cfg.steps:
            raise ValueError(f"{len(data)} examples make {len(plain)} batches, fewer than a run's steps")
        it = iter(plain)
        try:
            return _timed(arm, w, repeat, cfg, it, train, lambda: {})
        finally:
            getattr(it, "_shutdown_workers", lambda: None)()
    labels = data.targets.numpy()
    client: SelectionClient | None = None
    if arm == "uniform":
        config = LoaderConfig(selection="uniform", batch_size=cfg.batch_size, seed=cfg.seed)
    else:
        config = LoaderConfig(batch_size=cfg.batch_size, seed=cfg.seed, client_name="bench-dataloading")
        client = SelectionClient(target)
        client.wait_ready(timeout_s=60)
    try:
        with CoresetLoader(data, model, client, labels, config=config, num_workers=w, pin_memory=pin) as loader:
            return _timed(arm, w, repeat, cfg, iter(loader), train, lambda: _counters(loader))
    finally:
        if client is not None:
            client.close()


# -- the summary -------------------------------------------------------------------------------------------------


def summarise(runs: list[Run], cfg: DataloadingConfig) -> dict[str, Any]:
    """Per (arm, W) the medians over rounds; uniform's batches/s against plain's (ratio of the medians, and the
    median of the per-round ratios); CREST's input wait share; the two targets, met or not."""
    medians: dict[str, dict[str, dict[str, float]]] = {}
    for arm in ARMS:
        medians[arm] = {}
        for w in cfg.workers:
            mine = [asdict(r) for r in runs if r.arm == arm and r.workers == w]
            keys = ("batches_per_s", "input_wait_share", "input_wait_s", "next_wait_s", *COUNTERS[1:], "wall_s")
            medians[arm][str(w)] = {k: float(np.median([r[k] for r in mine])) for k in dict.fromkeys(keys)}
    ratios: dict[str, dict[str, float]] = {}
    for w in cfg.workers:
        per_round = [
            u.batches_per_s / p.batches_per_s
            for u in runs
            for p in runs
            if u.arm == "uniform" and p.arm == "plain" and u.workers == p.workers == w and u.repeat == p.repeat
        ]
        m = medians["uniform"][str(w)]["batches_per_s"] / medians["plain"][str(w)]["batches_per_s"]
        ratios[str(w)] = {"ratio_of_medians": m, "median_paired": float(np.median(per_round))}
    shares = {str(w): medians["crest"][str(w)]["input_wait_share"] for w in cfg.workers}
    judged = {w: s for w, s in shares.items() if int(w) >= 1}
    return {
        "medians": medians,
        "uniform_to_plain_batches_per_s": ratios,
        "crest_input_wait_share": shares,
        "targets": {
            "uniform_throughput": {
                "target": f"uniform's batches/s >= {UNIFORM_TARGET}x plain's at every W (ratio of the medians)",
                "ratios": {w: r["ratio_of_medians"] for w, r in ratios.items()},
                "met": all(r["ratio_of_medians"] >= UNIFORM_TARGET for r in ratios.values()),
            },
            "crest_input_wait": {
                "target": f"CREST's input wait <= {WAIT_TARGET:.0%} of a step, embedding excluded, at every W >= 1",
                "shares": judged,
                "met": bool(judged) and all(s <= WAIT_TARGET for s in judged.values()),
                # The plain DataLoader's share at the same W: what input-bound training waits with no selection.
                "plain_shares": {w: medians["plain"][w]["input_wait_share"] for w in judged},
            },
        },
    }


def order(workers: tuple[int, ...], repeat: int) -> list[tuple[str, int]]:
    """Round ``repeat``'s runs as (arm, W): the Ws rotated by ``repeat``; at each W, plain and uniform back to back
    (the pair the first target compares), which first alternating every round, CREST after them in rounds 0 and 1
    (mod 4), before them in 2 and 3."""
    k = repeat % len(workers)
    pair = ("plain", "uniform") if repeat % 2 == 0 else ("uniform", "plain")
    arms = (*pair, "crest") if repeat % 4 < 2 else ("crest", *pair)
    return [(arm, w) for w in (*workers[k:], *workers[:k]) for arm in arms]


def machine_tag(m: dict[str, Any]) -> str:
    """A short name of the CPU for the result's file name: epyc, xeon (xeon_amx with AMX), else the architecture."""
    model = str(m.get("cpu_model", "")).lower()
    for name in ("epyc", "xeon"):
        if name in model:
            return name + ("_amx" if name == "xeon" and "amx_tile" in m.get("cpu_flags", []) else "")
    return platform.machine().lower() or "cpu"


def run(args: argparse.Namespace) -> int:
    """``crest bench dataloading``: every (arm, W) in interleaved rounds; prints a table and writes JSON."""
    from selector_service.process import spawn_service

    cfg = QUICK if args.quick else DataloadingConfig()
    overrides = {"repeats": args.repeats, "steps": args.steps, "workers": tuple(args.workers) if args.workers else None}
    cfg = replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
    torch.set_num_threads(cfg.threads)
    for noisy in ("trainer_client", "selector_service"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    data = Augmented(cfg)
    per_example = transform_ms(data, cfg.timed_examples)
    step_ms = model_step_ms(cfg, data)
    print(
        f"transform: {per_example:.3f} ms per example ({cfg.batch_size * per_example:.1f} ms per batch of "
        f"{cfg.batch_size}); model step: {step_ms:.1f} ms"
    )
    runs: list[Run] = []
    by_round: list[float] = []  # the transform's ms per example before each round: how fast the machine ran then
    serve = ["--host", "127.0.0.1", "--port", "0", "--backend", "local", "--num-workers", "1"]
    with spawn_service(serve) as service:
        for repeat in range(cfg.repeats):
            by_round.append(transform_ms(data, cfg.timed_examples // 2))
            print(f"round {repeat}: transform {by_round[-1]:.3f} ms per example")
            for arm, w in order(cfg.workers, repeat):
                r = run_arm(arm, w, repeat, cfg, data, service.target)
                runs.append(r)
                print(
                    f"round {repeat} {arm:<7} W={w}: {r.batches_per_s:6.2f} batches/s, input wait "
                    f"{r.input_wait_share:6.1%}, misses {r.input_misses}, regions {r.regions}"
                )
    m = machine()
    report: dict[str, Any] = {
        "kind": "dataloading",
        "date": datetime.date.today().isoformat(),
        "machine": {**m, "torch": torch.__version__},
        "quick": args.quick,
        "argv": getattr(args, "argv", None),
        "config": asdict(cfg),
        "service": SERVICE,
        "transform_ms_per_example": per_example,
        "transform_ms_per_example_by_round": by_round,
        "model_step_ms": step_ms,
        "runs": [asdict(r) for r in runs],
        **summarise(runs, cfg),
    }
    _print(report)
    out = Path(args.out or f"benchmarks/results/dataloading_{machine_tag(m)}.json")
    write_json(out, report)
    print(f"wrote {out}")
    return 0


def _print(report: dict[str, Any]) -> None:
    workers = list(report["crest_input_wait_share"])
    med = report["medians"]
    print(f"\nmedians over {report['config']['repeats']} round(s); batches/s (input wait share of a step)")
    print(f"{'arm':<8}" + "".join(f"{'W=' + w:>22}" for w in workers))
    for arm in ARMS:
        cells = [f"{med[arm][w]['batches_per_s']:8.2f} ({med[arm][w]['input_wait_share']:6.1%})" for w in workers]
        print(f"{arm:<8}" + "".join(f"{c:>22}" for c in cells))
    ratios = report["uniform_to_plain_batches_per_s"]
    paired = ", ".join(f"W={w} {r['ratio_of_medians']:.3f} ({r['median_paired']:.3f})" for w, r in ratios.items())
    print(f"uniform / plain batches/s, ratio of the medians (median per-round ratio): {paired}")
    shares = ", ".join(f"W={w} {s:.1%}" for w, s in report["crest_input_wait_share"].items())
    print(f"CREST input wait share, passes excluded: {shares}")
    misses = ", ".join(f"W={w} {med['crest'][w]['input_misses']:.0f}" for w in workers)
    print(f"CREST input misses per run (median): {misses}")
    ahead = ", ".join(f"W={w} {med['crest'][w].get('passes_ahead', 0):.0f}" for w in workers)
    print(f"CREST embedding passes fetched ahead per run (median): {ahead}")
    by_round = ", ".join(f"{ms:.3f}" for ms in report["transform_ms_per_example_by_round"])
    print(f"transform: {report['transform_ms_per_example']:.3f} ms per example before the runs ({by_round} by round)")
    for name, t in report["targets"].items():
        numbers = {w: round(v, 3) for w, v in (t.get("ratios") or t.get("shares")).items()}
        print(f"target {name}: {'met' if t['met'] else 'NOT met'} ({t['target']}; {numbers})")
