"""Time to accuracy: CREST through the real service against full data, random batches and InfoBatch pruning.

    python benchmarks/train.py                  # Fashion-MNIST, 60k train, 1,000 steps, 3 seeds (~30 min)
    python benchmarks/train.py --quick          # 6k train, 150 steps, 1 seed (used by the test suite)
    python benchmarks/train.py --crest-adaptive # CREST's Taylor check instead of 50-step regions

Every method trains the same SmallCNN with the same SGD (momentum 0.9, weight decay 5e-4, cosine LR) for the
same number of optimizer steps of about ``batch_size`` examples, in one process, one torch thread:

- ``full``: shuffled epochs over all the data, weights 1.
- ``random``: uniformly sampled mini-batches (each batch without replacement), weights 1.
- ``crest``: ``CoresetLoader`` against ``crest serve`` (started once, port 0, embedded Ray, 2 selector actors).
- ``infobatch``: InfoBatch-style dynamic pruning (Qin et al., ICLR 2024): each epoch, a random ``prune``
  fraction of the examples whose last loss is below the mean is left out and the kept low-loss examples'
  loss is scaled by 1 / (1 - prune); epochs that start in the last ``anneal`` fraction of steps use all data.

The clock runs from building the model to the last step and includes everything a method needs (embedding
forward passes, gRPC, selection waits, batch assembly); evaluations pause it. Every ``eval_every`` steps the
model is scored on a fixed test subset (the accuracy-vs-time curve, ending at the last step). The target of
a seed is the full-data run's final curve accuracy minus ``target_drop``; ``time_to_target_s`` is the clock
at the first curve point reaching it (None when never), and ``speedup`` = full-data wall time / a method's
time to target. CREST's stream thread keeps running while the clock is paused for evaluation, so rounds can
arrive during it; with ``lookahead_steps`` and ~0.2 s evaluations this hides at most a little latency.

Writes JSON (default results/train.json), a markdown table next to it (.md) and, when matplotlib is
installed, an accuracy-vs-time plot (results/train_accuracy_vs_time.png).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: spin-waiting starves the selectors

import argparse
import json
import logging
import platform
import signal
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _report import write_atomic

from selector_service.process import ServiceProcess, spawn_service
from trainer_client.client import SelectionClient
from trainer_client.data import FashionMNIST
from trainer_client.embeddings import weighted_loss
from trainer_client.loader import CoresetLoader, LoaderConfig
from trainer_client.models import SmallCNN
from trainer_client.region import RegionConfig
from trainer_client.train import evaluate

log = logging.getLogger("bench.train")

METHODS = ("full", "random", "crest", "infobatch")


@dataclass(frozen=True, kw_only=True)
class BenchConfig:
    """One benchmark: every method and seed on the same data."""

    # Optimizer steps per run (the same for every method).
    steps: int = 1000
    batch_size: int = 128
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    # First N training / test examples; None uses all (60,000 / 10,000).
    train_limit: int | None = None
    test_limit: int | None = None
    # Curve: evaluate every this many steps on the first eval_examples test examples (clock paused).
    eval_every: int = 50
    eval_examples: int = 2000
    # Target = the full-data run's final curve accuracy minus this (1%).
    target_drop: float = 0.01
    # CREST: fixed regions of this many steps; None uses CREST's adaptive Taylor check.
    steps_per_round: int | None = 50
    # CREST adaptive rule: random-subset ids the check evaluates (as the crest CLI's default).
    check_examples: int = 256
    # InfoBatch: fraction of the below-mean-loss examples pruned each epoch, and the final fraction of
    # training on all data (the paper's delta = 0.875).
    prune: float = 0.5
    anneal: float = 0.125
    # torch intra-op threads of the trainer (the other core is the selectors').
    threads: int = 1
    data_dir: str | None = None


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
    curve: list[dict[str, float]] = field(default_factory=list)  # {"step", "time_s", "examples", "accuracy"}
    target_accuracy: float | None = None
    time_to_target_s: float | None = None
    speedup: float | None = None


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


# -- batch sources: each yields (ids int64 (b,), weights float32 (b,)) forever ---------------------------------


def full_batches(n: int, batch_size: int, seed: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng([seed, 10])
    ones = np.ones(batch_size, dtype=np.float32)
    while True:
        perm = rng.permutation(n)
        for lo in range(0, n - batch_size + 1, batch_size):  # drop the ragged last batch
            yield perm[lo : lo + batch_size], ones


def random_batches(n: int, batch_size: int, seed: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng([seed, 11])
    ones = np.ones(batch_size, dtype=np.float32)
    while True:
        yield rng.choice(n, batch_size, replace=False), ones


class InfoBatch:
    """InfoBatch-style pruning: losses of the last visit drive which examples the next epoch leaves out."""

    def __init__(self, n: int, config: BenchConfig, seed: int) -> None:
        self.n, self.config = n, config
        self.losses = np.full(n, np.inf, dtype=np.float64)  # unseen examples are never pruned
        self.rng = np.random.default_rng([seed, 12])
        self.pruned_total = 0
        self.epochs = 0

    def batches(self, step: Iterator[int]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        cfg = self.config
        while True:
            weights = np.ones(self.n, dtype=np.float32)
            keep = np.arange(self.n)
            if next(step) < (1 - cfg.anneal) * cfg.steps and np.isfinite(self.losses).any():
                seen = np.isfinite(self.losses)
                low = np.flatnonzero(seen & (self.losses < self.losses[seen].mean()))
                pruned = low[self.rng.random(len(low)) < cfg.prune]
                mask = np.ones(self.n, dtype=bool)
                mask[pruned] = False
                weights[low] = 1.0 / (1.0 - cfg.prune)  # kept low-loss examples stand for the pruned ones
                keep = np.flatnonzero(mask)
                self.pruned_total += len(pruned)
            self.epochs += 1
            perm = self.rng.permutation(keep)
            for lo in range(0, len(perm) - cfg.batch_size + 1, cfg.batch_size):
                ids = perm[lo : lo + cfg.batch_size]
                yield ids, weights[ids]


# -- one run ------------------------------------------------------------------------------------------------------


def run_one(
    method: str,
    seed: int,
    config: BenchConfig,
    train_set: FashionMNIST,
    test_set: FashionMNIST,
    endpoint: str | None,
) -> RunResult:
    torch.manual_seed(seed)
    eval_x, eval_y = test_set.images[: config.eval_examples], test_set.targets[: config.eval_examples]
    n = len(train_set)
    clock = Clock()
    model = SmallCNN(num_classes=len(FashionMNIST.classes))
    opt = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=config.steps)
    curve: list[dict[str, float]] = []
    backprop = 0
    loader: CoresetLoader | None = None
    client: SelectionClient | None = None
    info: InfoBatch | None = None
    current = [0]

    def step_counter() -> Iterator[int]:
        while True:
            yield current[0]

    if method == "full":
        source: Iterator[Any] = full_batches(n, config.batch_size, seed)
    elif method == "random":
        source = random_batches(n, config.batch_size, seed)
    elif method == "infobatch":
        info = InfoBatch(n, config, seed)
        source = info.batches(step_counter())
    elif method == "crest":
        assert endpoint is not None
        client = SelectionClient(endpoint)
        client.wait_ready(timeout_s=60)
        loader_config = LoaderConfig(
            batch_size=config.batch_size,
            seed=seed,
            steps_per_round=config.steps_per_round,
            check_examples=0 if config.steps_per_round else config.check_examples,
            region=RegionConfig(),
            client_name=f"bench-train-{seed}",
        )
        loader = CoresetLoader(train_set, model, client, train_set.targets.numpy(), config=loader_config)
        source = iter(loader)
    else:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")

    def checkpoint(step: int) -> None:
        clock.pause()
        curve.append(
            {"step": step, "time_s": clock.read(), "examples": backprop, "accuracy": evaluate(model, eval_x, eval_y)}
        )
        clock.resume()

    try:
        for step in range(config.steps):
            current[0] = step
            if method == "crest":
                x, y, w = next(source)
            else:
                ids, weights = next(source)
                index = torch.from_numpy(ids)
                x, y, w = train_set.images[index], train_set.targets[index], torch.from_numpy(weights)
            logits = model(x)
            if info is not None:
                info.losses[ids] = torch.nn.functional.cross_entropy(logits.detach(), y, reduction="none").numpy()
            loss = weighted_loss(logits, y, w)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
            backprop += len(y)
            if (step + 1) % config.eval_every == 0 or step + 1 == config.steps:
                checkpoint(step + 1)
        wall = clock.read()
        stats = loader.stats if loader is not None else None
    finally:
        if loader is not None:
            loader.close()
        if client is not None:
            client.close()
    accuracy = evaluate(model, test_set.images, test_set.targets)
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
        curve=curve,
    )


def score(runs: list[RunResult], drop: float) -> None:
    """Fill in each run's target, time to target and speedup against the full-data run of its seed."""
    full = {r.seed: r for r in runs if r.method == "full"}
    for r in runs:
        ref = full.get(r.seed)
        if ref is None:
            continue
        r.target_accuracy = ref.curve[-1]["accuracy"] - drop
        r.time_to_target_s = next((p["time_s"] for p in r.curve if p["accuracy"] >= r.target_accuracy), None)
        r.speedup = ref.wall_s / r.time_to_target_s if r.time_to_target_s else None


def mean_std(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def summarize(runs: list[RunResult]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for method in dict.fromkeys(r.method for r in runs):
        mine = [r for r in runs if r.method == method]
        reached = [r for r in mine if r.time_to_target_s is not None]
        out[method] = {
            "seeds": len(mine),
            "reached_target": len(reached),
            **{
                key: mean_std([float(getattr(r, key)) for r in mine])
                for key in (
                    "test_accuracy",
                    "wall_s",
                    "examples_backpropagated",
                    "examples_forward_only",
                    "examples_forwarded",
                    "wait_s",
                    "embed_s",
                )
            },
            "time_to_target_s": mean_std([float(r.time_to_target_s) for r in reached if r.time_to_target_s]),
            "speedup": mean_std([float(r.speedup) for r in reached if r.speedup]),
        }
    return out


def markdown(summary: dict[str, dict[str, Any]], config: BenchConfig, n: int) -> str:
    def pm(s: dict[str, Any], fmt: str) -> str:
        if s["mean"] is None:
            return "never"
        return format(s["mean"], fmt) + (f" ± {format(s['std'], fmt)}" if s["std"] else "")

    lines = [
        f"Fashion-MNIST, {n:,} training examples, SmallCNN, {config.steps} steps of {config.batch_size}, "
        f"target = full-data accuracy - {config.target_drop:.0%}",
        "",
        "| method | test accuracy | wall s | time to target s | speedup vs full | back-propagated "
        "| forward-only | trainer wait s | reached |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for method, s in summary.items():
        lines.append(
            f"| {method} | {pm(s['test_accuracy'], '.4f')} | {pm(s['wall_s'], '.1f')} "
            f"| {pm(s['time_to_target_s'], '.1f')} | {pm(s['speedup'], '.2f')} "
            f"| {s['examples_backpropagated']['mean']:,.0f} | {s['examples_forward_only']['mean']:,.0f} "
            f"| {pm(s['wait_s'], '.2f')} | {s['reached_target']}/{s['seeds']} |"
        )
    return "\n".join(lines) + "\n"


def plot(runs: list[RunResult], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colours = dict(zip(METHODS, ("black", "tab:grey", "tab:red", "tab:blue"), strict=True))
    for r in runs:
        ax.plot(
            [p["time_s"] for p in r.curve],
            [p["accuracy"] for p in r.curve],
            color=colours.get(r.method, "tab:green"),
            label=r.method if r.seed == runs[0].seed else None,
            alpha=0.8,
        )
    targets = {r.target_accuracy for r in runs if r.target_accuracy is not None}
    for t in targets:
        ax.axhline(t, color="black", linestyle=":", linewidth=0.8)
    ax.set_xlabel("wall time, s (evaluation excluded)")
    ax.set_ylabel("test accuracy (eval subset)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def warm_up(train_set: FashionMNIST, config: BenchConfig) -> None:
    """A few untimed steps on a throwaway model, so the first method timed does not pay torch's start-up."""
    model = SmallCNN(num_classes=len(FashionMNIST.classes))
    opt = torch.optim.SGD(model.parameters(), lr=config.lr)
    x, y = train_set.images[: config.batch_size], train_set.targets[: config.batch_size]
    for _ in range(10):
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    evaluate(model, x, y)


# -- the service --------------------------------------------------------------------------------------------------


def start_service(num_workers: int) -> ServiceProcess:
    """``crest serve --port 0`` with an embedded Ray, serving."""
    env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}
    return spawn_service(["--port", "0", "--num-workers", str(num_workers)], env=env)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="6k/1k examples, 150 steps, 1 seed (a few minutes)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per method (default 3, quick 1)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 1000, quick 150)")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    parser.add_argument(
        "--crest-adaptive", action="store_true", help="CREST's Taylor check ends regions (default: 50-step regions)"
    )
    parser.add_argument("--prune", type=float, default=0.5, help="InfoBatch pruned fraction of low-loss examples")
    parser.add_argument("--num-workers", type=int, default=2, help="selector actors of the service; default 2")
    parser.add_argument("--data-dir", default=None, help="directory with the Fashion-MNIST .gz files")
    parser.add_argument("--out", default="results/train.json", help="JSON output; the .md table goes next to it")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    methods = tuple(m for m in args.methods.split(",") if m)
    if set(methods) - set(METHODS):
        parser.error(f"unknown methods {sorted(set(methods) - set(METHODS))}; choose from {METHODS}")
    if "full" not in methods:
        parser.error("the full-data run sets the target; keep 'full' in --methods")
    quick = dict(train_limit=6000, test_limit=1000, steps=150, eval_every=15, eval_examples=1000)
    config = BenchConfig(
        **(quick if args.quick else {}),
        **({"steps": args.steps} if args.steps else {}),
        steps_per_round=None if args.crest_adaptive else 50,
        prune=args.prune,
        data_dir=args.data_dir,
    )
    seeds = args.seeds or (1 if args.quick else 3)
    torch.set_num_threads(config.threads)
    train_set = FashionMNIST("train", config.data_dir, limit=config.train_limit)
    test_set = FashionMNIST("test", config.data_dir, limit=config.test_limit)
    service = start_service(args.num_workers) if "crest" in methods else None
    endpoint = service.target if service else None
    runs: list[RunResult] = []
    # SIGTERM unwinds like Ctrl-C, so the service (and its Ray) is stopped and finished seeds are kept.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        warm_up(train_set, config)  # after the service: its start-up work settles meanwhile
        started = time.perf_counter()
        for seed in range(seeds):
            for method in methods:
                r = run_one(method, seed, config, train_set, test_set, endpoint)
                runs.append(r)
                print(
                    f"[{time.perf_counter() - started:6.0f} s] seed {seed} {method:<9} acc {r.test_accuracy:.4f} "
                    f"wall {r.wall_s:6.1f} s  backprop {r.examples_backpropagated:,}  "
                    f"forward-only {r.examples_forward_only:,}  wait {r.wait_s:.2f} s",
                    flush=True,
                )
            report(runs, config, args, len(train_set), seeds)  # a stopped run keeps its finished seeds
    finally:
        if service is not None:
            service.stop()
    print()
    print(report(runs, config, args, len(train_set), seeds))
    out = Path(args.out)
    png = out.parent / f"{out.stem}_accuracy_vs_time.png"
    wrote_plot = plot(runs, png)
    print(f"wrote {out}, {out.with_suffix('.md')}" + (f", {png}" if wrote_plot else ""))
    return 0


def report(runs: list[RunResult], config: BenchConfig, args: argparse.Namespace, n: int, seeds: int) -> str:
    """Score the runs so far, write the JSON and the markdown table atomically, and return the table."""
    score(runs, config.target_drop)
    summary = summarize(runs)
    table = markdown(summary, config, n)
    out = Path(args.out)
    doc = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "quick": args.quick,
        "config": asdict(config),
        "seeds": seeds,
        "seeds_done": len({r.seed for r in runs}),
        "methods": list(dict.fromkeys(r.method for r in runs)),
        "runs": [asdict(r) for r in runs],
        "summary": summary,
    }
    write_atomic(out, json.dumps(doc, indent=2))
    write_atomic(out.with_suffix(".md"), table)
    return table


if __name__ == "__main__":
    sys.exit(main())
