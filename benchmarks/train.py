"""Time to accuracy: CREST through the real service against full data, random batches and InfoBatch pruning.

    crest bench train                   # Fashion-MNIST, 60k train, 1,000 steps, 3 seeds (~30 min on 2 cores)
    crest bench train --quick           # 6k train, 150 steps, 1 seed (the test suite's mode)
    crest bench train --demo            # full and crest, 1 seed, 1,000 steps (make demo, ~2 min)
    crest bench train --recipe released # CREST with the released code's settings instead of the recommended
    crest bench train --crest-adaptive  # CREST's Taylor check ends the recipe's regions
    crest bench train --dataset my_data.py:load   # any map-style dataset and model (benchmarks/train_data.py)

The flags are parsed in ``benchmarks/cli.py`` (``crest_bench.cli``), like every other benchmark's.

Every method trains the same model with the same SGD (momentum 0.9, weight decay 5e-4, cosine LR) for the
same number of optimizer steps of about ``batch_size`` examples, in one process, one torch thread, every
batch assembled the same way (``default_collate`` of ``dataset[i]``):

- ``full``: shuffled epochs over all the data, weights 1.
- ``random``: uniformly sampled mini-batches (each batch without replacement), weights 1.
- ``crest``: ``CoresetLoader`` against ``crest serve`` (started once, port 0, embedded Ray, 2 selector actors),
  with ``--recipe``'s settings (``recommended`` by default; ``--no-drop-learned`` turns the exclusion off).
- ``infobatch``: InfoBatch-style dynamic pruning (Qin et al., ICLR 2024): each epoch, a random ``prune``
  fraction of the examples whose last loss is below the mean is left out and the kept low-loss examples'
  loss is scaled by 1 / (1 - prune); epochs that start in the last ``anneal`` fraction of steps use all data.

The clock runs from building the model to the last step and includes everything a method needs (embedding
forward passes, gRPC, selection waits, batch assembly); evaluations and the benchmark's own queries of the
service's exclusion state pause it. Every ``eval_every`` steps the model is scored on a fixed test subset (the
accuracy-vs-time curve, ending at the last step). The target of a seed is the full-data run's final curve
accuracy minus ``target_drop``; ``time_to_target_s`` is the clock at the first curve point reaching it (None
when never), and ``speedup`` = full-data wall time / a method's time to target. CREST's stream thread keeps
running while the clock is paused for evaluation, so rounds can arrive during it; with ``lookahead_steps`` and
~0.2 s evaluations this hides at most a little latency.

Over training each run also records the mean loss of its trained batches (per curve window), CREST the
difficulty of each round's coresets against the round's random subsets (``trainer_client.RoundDifficulty``:
is CREST picking harder examples as training goes on, as the paper reports?) and the fraction of the data left
out of sampling (CREST: excluded as learned; InfoBatch: pruned per epoch).

Writes JSON (default results/train.json: one object per method and seed in ``runs``, and a ``summary``), a
markdown table next to it (.md) and, when matplotlib is installed, four PNGs next to it: accuracy vs wall time,
accuracy vs examples back-propagated, difficulty over training, and the fraction left out over training.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: spin-waiting starves the selectors

import argparse
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from crest_bench.report import machine, write_atomic, write_json
from crest_bench.train_data import BenchData, load_data, materialize
from crest_bench.train_methods import DEFAULT_METHODS, METHODS, BenchConfig, EvalSets, RunResult, run_one, warm_up
from crest_bench.train_report import markdown, plot, score, summarize
from selector_service.process import ServiceProcess, spawn_service
from trainer_client.flags import with_overrides
from trainer_client.loader_config import LoaderConfig

# A tenth of the data keeps CREST's random subsets at r = 600 (at 1% of 6,000 they would be smaller than a
# coreset of 128, and CREST would train on whole random subsets without selecting).
QUICK = {"train_limit": 6000, "test_limit": 1000, "steps": 150, "eval_every": 15, "eval_examples": 1000}
QUICK_CREST = {"subset_fraction": 0.1}


def plan(args: argparse.Namespace) -> tuple[BenchConfig, tuple[str, ...], int, Path]:
    """(config, methods, seeds, JSON path) from ``crest bench train`` flags; explicit flags beat the presets.

    CREST runs ``--recipe`` (``recommended`` by default: what ``make demo`` runs), with ``--crest-adaptive`` and
    ``--drop-learned`` on top when given.
    """
    methods = tuple(
        m for m in (args.methods or ("full,crest" if args.demo else ",".join(DEFAULT_METHODS))).split(",") if m
    )
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    if "full" not in methods:
        raise ValueError("the full-data run sets the target; keep 'full' in --methods")
    preset: dict[str, Any] = {**(QUICK if args.quick else {}), **({"steps": args.steps} if args.steps else {})}
    crest = LoaderConfig.from_recipe(
        args.recipe,
        **(QUICK_CREST if args.quick else {}),
        **({"drop_learned": args.drop_learned} if args.drop_learned is not None else {}),
    )
    if args.crest_adaptive:
        crest = with_overrides(crest, {"region.mode": "crest"})
    config = BenchConfig(**preset, dataset=args.dataset, data_dir=args.data_dir, crest=crest, prune=args.prune)
    seeds = args.seeds or (1 if args.quick or args.demo else 3)
    out = Path(args.out or ("results/demo.json" if args.demo else "results/train.json"))
    return config, methods, seeds, out


def start_service(num_workers: int, *, cpus_per_worker: float | None = None, backend: str = "ray") -> ServiceProcess:
    """``crest serve --port 0``, serving: with an embedded Ray and ``num_workers`` selector actors (``backend``
    "ray"; ``cpus_per_worker`` None keeps serve's default), or ``num_workers`` selector threads in the server's
    process ("local")."""
    env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}
    cpus = [] if cpus_per_worker is None or backend != "ray" else ["--cpus-per-worker", str(cpus_per_worker)]
    return spawn_service(["--port", "0", "--backend", backend, "--num-workers", str(num_workers), *cpus], env=env)


def run(args: argparse.Namespace) -> int:
    """``crest bench train``: every method and seed, then the JSON, the table and the plots."""
    try:
        config, methods, seeds, out = plan(args)
    except ValueError as exc:
        print(f"crest bench train: {exc}", file=sys.stderr)
        return 2
    torch.set_num_threads(config.threads)
    data = load_data(config.dataset, config.data_dir, config.train_limit, config.test_limit)
    evals = EvalSets(
        curve=materialize(data.test, config.eval_examples), test=materialize(data.test), balanced=data.balanced_score
    )
    service = start_service(args.num_workers) if "crest" in methods else None
    endpoint = service.target if service else None
    runs: list[RunResult] = []
    # SIGTERM unwinds like Ctrl-C, so the service (and its Ray) is stopped and finished seeds are kept.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        warm_up(data, config)  # after the service: its start-up work settles meanwhile
        started = time.perf_counter()
        for seed in range(seeds):
            for method in methods:
                r = run_one(method, seed, config, data, evals, endpoint, progress=not args.no_progress)
                runs.append(r)
                print(
                    f"[{time.perf_counter() - started:6.0f} s] seed {seed} {method:<9} acc {r.test_accuracy:.4f} "
                    f"wall {r.wall_s:6.1f} s  backprop {r.examples_backpropagated:,}  "
                    f"forward-only {r.examples_forward_only:,}  wait {r.wait_s:.2f} s",
                    flush=True,
                )
            report(runs, config, data, out, quick=args.quick, seeds=seeds)  # a stopped run keeps its finished seeds
    finally:
        if service is not None:
            service.stop()
    print()
    print(report(runs, config, data, out, quick=args.quick, seeds=seeds))
    written = [str(p) for p in plot(runs, out)]
    print("wrote " + ", ".join([str(out), str(out.with_suffix(".md")), *written]))
    return 0


def report(runs: list[RunResult], config: BenchConfig, data: BenchData, out: Path, *, quick: bool, seeds: int) -> str:
    """Score the runs so far, write the JSON and the markdown table atomically, and return the table."""
    score(runs, config.target_drop)
    summary = summarize(runs)
    n = len(data.train)  # type: ignore[arg-type]
    table = markdown(summary, config, n, data.name)
    doc = {
        "machine": machine(),
        "dataset": data.name,
        "train_examples": n,
        "quick": quick,
        "config": asdict(config),
        # CREST's recipe and what this run overrode in it.
        "crest_recipe": config.crest.recipe,
        "crest_overrides": config.crest.overrides(),
        "seeds": seeds,
        "seeds_done": len({r.seed for r in runs}),
        "methods": list(dict.fromkeys(r.method for r in runs)),
        "runs": [asdict(r) for r in runs],
        "summary": summary,
    }
    write_json(out, doc)
    write_atomic(out.with_suffix(".md"), table)
    return table
