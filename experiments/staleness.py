"""How far a candidate's embedding can age before selection picks other coresets (issue 15, point 4: reusing a
candidate's embedding across regions, ``LoaderConfig.embedding_max_age``).

    python -m experiments.staleness            # the long-tailed task, 575 steps (its frontier's 30% budget), ages 4-80
    python -m experiments.staleness --quick    # the test suite's: 2,000 balanced examples, 40 steps, coresets of 32

Trains the SmallCNN on shuffled full-data batches (``crest bench train``'s SGD, cosine schedule over ``--steps``)
and, every ``--every`` steps from the largest age on, draws a round's class-balanced random subsets as the service
does (r = ``--subset-fraction`` N per subset, ``--num-subsets`` of them) and selects every subset's mini-batch
coreset with the service's engine (per-class facility location, exp kernel, m = 128) on the logit-gradient
embeddings of the current model (fresh) and of the model ``age`` steps earlier (stale), for each age. Per age,
over every subset of every round:

- **kept**: the share of the fresh coreset's examples the stale coreset picked too;
- **objective**: the stale coreset's facility-location value under the fresh embeddings, as a share of the fresh
  coreset's (per class, summed over the classes); on C-dimensional logit gradients the exp kernel is flat (every
  s_ij is above exp(-sqrt(2)/C)), so a random pick scores near 1 too, and
- **gain**: the share of the fresh coreset's objective gain over a uniform pick (the mean of 5 with the same
  per-class sizes) that the stale coreset keeps: 1 selects as well as on fresh embeddings, 0 no better than chance;
- **drift**: the mean distance between an example's stale and fresh embeddings, over the mean fresh norm.

Beside them the same scores for one uniformly random pick with the coreset's per-class sizes: what selection is
worth at all against what age takes from it. Writes JSON (default results/staleness.json) and prints a table.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import copy
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from crest_bench.report import machine, write_json
from crest_bench.train_data import DEFAULT_HOOK, BenchData, fetch, load_data
from crest_bench.train_methods import BenchConfig, full_batches
from experiments._main import run_main
from selector_service.coreset import minibatch_coreset
from selector_service.facility_location import objective
from selector_service.similarity import dense_similarity
from selector_service.subsets import class_balanced_subsets, per_class_quota
from trainer_client.batches import Embedder, default_forward


@dataclass(frozen=True, kw_only=True)
class StalenessConfig:
    """One audit."""

    # Dataset hook (benchmarks/train_data.py), its --data-dir, and the first N training examples (None: all).
    dataset: str = "crest_bench.train_data:fashion_mnist_imbalanced"
    data_dir: str | None = None
    train_limit: int | None = None
    # Training steps (the long-tailed frontier's 30% budget), one seed, with crest bench train's batch and SGD.
    steps: int = 575
    batch_size: int = BenchConfig.batch_size
    lr: float = BenchConfig.lr
    momentum: float = BenchConfig.momentum
    weight_decay: float = BenchConfig.weight_decay
    seed: int = 0
    # Ages compared, in optimizer steps, and the steps between two audited rounds (the first at the largest age).
    ages: tuple[int, ...] = (4, 10, 20, 40, 80)
    every: int = 50
    # A round as the long-tailed frontier's CREST draws it: r = 1% N per subset, 10 subsets.
    subset_fraction: float = 0.01
    num_subsets: int = 10
    threads: int = 2


# The test suite's: the balanced task (a long tail of 2,000 examples leaves a few per class), coresets of 32 of 100.
RANDOM_DRAWS = 5  # uniform picks per subset whose mean objective is the floor of the gain

QUICK = {
    "dataset": DEFAULT_HOOK,
    "train_limit": 2000,
    "steps": 40,
    "ages": (5, 20),
    "every": 10,
    "num_subsets": 2,
    "subset_fraction": 0.05,
    "batch_size": 32,
}


def _embed(model: torch.nn.Module, data: BenchData, ids: np.ndarray) -> np.ndarray:
    """float32 (n, C) logit-gradient embeddings of ``ids``, eval mode (as the loader's embedding pass)."""
    was_training = model.training
    model.eval()
    embedder = Embedder("logit_gradient")
    batches = (fetch(data.train, ids[lo : lo + 256]) for lo in range(0, len(ids), 256))
    rows = [embedder(model, batch, default_forward)[0] for batch in batches]
    model.train(was_training)
    return torch.cat(rows).numpy()


def _objective(emb: np.ndarray, labels: np.ndarray, chosen: np.ndarray) -> float:
    """Facility location of the positions ``chosen`` (int64) of a subset, per class on ``emb``, summed."""
    total = 0.0
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        picked = np.flatnonzero(np.isin(members, chosen))
        total += objective(dense_similarity(np.ascontiguousarray(emb[members]), "exp"), picked)
    return total


def _random_pick(labels: np.ndarray, like: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Positions of a uniform pick with the per-class sizes of the positions ``like``."""
    sizes = {c: int((labels[like] == c).sum()) for c in np.unique(labels)}
    return np.concatenate([rng.choice(np.flatnonzero(labels == c), k, replace=False) for c, k in sizes.items()])


def _coreset_positions(sub: np.ndarray, labels: np.ndarray, emb: np.ndarray, batch_size: int) -> np.ndarray:
    """Positions in ``sub`` (sorted int64 ids) of the mini-batch coreset the service's engine selects on ``emb``."""
    chosen = minibatch_coreset(sub, labels, np.ascontiguousarray(emb), batch_size).ids
    return np.searchsorted(sub, np.sort(chosen))


def audit_round(
    config: StalenessConfig, data: BenchData, labels: np.ndarray, step: int, models: dict[int, torch.nn.Module]
) -> dict[str, Any]:
    """Select one round's coresets on the fresh model's embeddings (``models[step]``) and on each age's."""
    rng = np.random.default_rng([config.seed, 7, step])
    quota = per_class_quota(len(labels), int(labels.max()) + 1, config.subset_fraction)
    subsets = class_balanced_subsets(labels, np.ones(len(labels), bool), quota, config.num_subsets, rng)
    union = np.unique(np.concatenate(subsets))
    emb = {age: _embed(models[step - age], data, union) for age in (0, *config.ages)}
    scores: dict[str, list[float]] = {}
    for sub in subsets:
        rows, y = np.searchsorted(union, sub), labels[sub]
        fresh_rows = emb[0][rows]
        fresh = _coreset_positions(sub, y, fresh_rows, config.batch_size)
        best = _objective(fresh_rows, y, fresh)
        randoms = [_random_pick(y, fresh, rng) for _ in range(RANDOM_DRAWS)]
        floor = float(np.mean([_objective(fresh_rows, y, r) for r in randoms]))
        picks = {f"age {age}": _coreset_positions(sub, y, emb[age][rows], config.batch_size) for age in config.ages}
        picks["random"] = randoms[0]
        for name, chosen in picks.items():
            value = _objective(fresh_rows, y, chosen)
            scores.setdefault(f"{name} kept", []).append(len(np.intersect1d(chosen, fresh)) / len(fresh))
            scores.setdefault(f"{name} objective", []).append(value / best)
            scores.setdefault(f"{name} gain", []).append((value - floor) / (best - floor))
    norm = float(np.linalg.norm(emb[0], axis=1).mean())
    for age in config.ages:
        scores[f"age {age} drift"] = [float(np.linalg.norm(emb[age] - emb[0], axis=1).mean()) / norm]
    return {"step": step, "scores": {k: float(np.mean(v)) for k, v in scores.items()}}


def audit(config: StalenessConfig) -> dict[str, Any]:
    """Train, snapshot the model at every step an audit needs, and audit a round every ``every`` steps."""
    torch.set_num_threads(config.threads)
    data = load_data(config.dataset, config.data_dir, config.train_limit, None)
    labels = data.train_labels
    assert labels is not None, "load_data fills the labels in"
    torch.manual_seed(config.seed)
    model = data.model()
    opt = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=config.steps)
    audited = list(range(max(config.ages), config.steps + 1, config.every))
    needed = {t - age for t in audited for age in (0, *config.ages)}
    snapshots: dict[int, torch.nn.Module] = {}
    batches = full_batches(len(labels), config.batch_size, config.seed)
    rounds = []
    for step in range(config.steps + 1):
        if step in needed:
            snapshots[step] = copy.deepcopy(model)
        if step in audited:
            rounds.append(audit_round(config, data, labels, step, snapshots))
            later = {t - age for t in audited if t > step for age in (0, *config.ages)}
            snapshots = {s: m for s, m in snapshots.items() if s in later}
        if step == config.steps:
            break
        ids, _ = next(batches)
        x, y = fetch(data.train, ids)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
    names = sorted(rounds[0]["scores"])
    summary = {}
    for n in names:
        values = [r["scores"][n] for r in rounds]
        summary[n] = {"mean": float(np.mean(values)), "min": float(min(values))}
    return {"config": asdict(config), "rounds": rounds, "summary": summary}


def table(result: dict[str, Any]) -> str:
    """The summary as markdown: a row per age and one for the random pick."""
    s, ages = result["summary"], result["config"]["ages"]
    lines = [
        "| coreset from | kept of the fresh coreset | objective / fresh | gain over random kept | embedding drift |",
        "|---|---|---|---|---|",
    ]
    for name in [f"age {a}" for a in ages] + ["random"]:
        drift = s.get(f"{name} drift")
        lines.append(
            f"| {name} | {s[f'{name} kept']['mean']:.3f} (min {s[f'{name} kept']['min']:.3f}) | "
            f"{s[f'{name} objective']['mean']:.4f} (min {s[f'{name} objective']['min']:.4f}) | "
            f"{s[f'{name} gain']['mean']:.3f} (min {s[f'{name} gain']['min']:.3f}) | "
            + (f"{drift['mean']:.3f} |" if drift else "- |")
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """``python -m experiments.staleness``: audit, print the table, write JSON."""
    config = StalenessConfig(**QUICK) if args.quick else StalenessConfig()  # type: ignore[arg-type]
    given = {"dataset": args.dataset, "data_dir": args.data_dir, "steps": args.steps, "every": args.every}
    given["subset_fraction"] = args.subset_fraction
    if args.ages:
        given["ages"] = tuple(int(a) for a in args.ages.split(","))
    config = replace(config, **{k: v for k, v in given.items() if v is not None})
    if not config.ages or min(config.ages) < 1 or max(config.ages) > config.steps or config.every < 1:
        raise SystemExit(f"--ages must be >= 1 and <= --steps ({config.steps}), --every >= 1; received {config.ages}")
    result = {**machine(), "argv": getattr(args, "argv", None), **audit(config)}
    print(table(result))
    out = Path(args.out)
    write_json(out, result)
    print(f"wrote {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The flags of ``python -m experiments.staleness``."""
    p = argparse.ArgumentParser(
        prog="python -m experiments.staleness",
        description="Train the SmallCNN and, every few steps, select a round's coresets on embeddings from the "
        "current model and from the model some steps earlier; report how many picks and how much of the "
        "facility-location objective each age keeps, beside a random pick. See experiments/staleness.py.",
    )
    p.add_argument("--quick", action="store_true", help="2,000 balanced examples, 40 steps, ages 5 and 20")
    p.add_argument("--ages", default="", help="comma-separated ages in steps (default 4,10,20,40,80)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default 575)")
    p.add_argument("--every", type=int, default=None, help="steps between audited rounds (default 50)")
    p.add_argument(
        "--subset-fraction", type=float, default=None, help="random-subset size r as a fraction of N (default 0.01)"
    )
    p.add_argument(
        "--dataset",
        default=None,
        help="dataset hook MODULE:FUNCTION (default crest_bench.train_data:fashion_mnist_imbalanced)",
    )
    p.add_argument("--data-dir", default=None, help="directory with the Fashion-MNIST files")
    p.add_argument("--out", default="results/staleness.json", help="JSON output path")
    return p


def main(argv: list[str] | None = None) -> int:
    """``python -m experiments.staleness [flags]``, from the root of a checkout."""
    return run_main(build_parser, run, argv)


if __name__ == "__main__":
    sys.exit(main())
