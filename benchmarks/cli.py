"""The ``bench`` command: benchmarks that start what they measure.

``add_commands`` registers ``crest bench {train,frontier,facility-location,workload,service,integrations,staleness,
offload}`` on the ``crest`` parser (``crest.cli``, the composition root, loads this module for ``bench`` only).
Building the parser imports the flag definitions only; each benchmark imports what it measures when it runs.
CREST's selection flags of ``bench frontier`` are ``LoaderConfig``'s fields (``trainer_client.flags``) under
``--crest-``, with the names they had before they were derived as aliases. Environment read here: CREST_DATA_DIR
(``bench train``/``frontier`` ``--data-dir``).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from crest_bench.crest_flags import FRONTIER_CREST_FLAGS, add_recipe_flag
from trainer_client.flags import add_flags
from trainer_client.loader_config import RECIPES

COMMANDS = ("bench",)

# The training benchmark's methods (crest_bench.train_methods.METHODS, which imports torch).
METHOD_NAMES = ("full", "random", "crest", "infobatch", "balanced")


def add_commands(sub: Any) -> None:
    """Register ``bench`` and its benchmarks on ``sub`` (an ``add_subparsers`` result)."""
    bench = sub.add_parser("bench", help="benchmarks", description="Benchmarks that start what they measure.")
    benches = bench.add_subparsers(dest="bench", required=True, metavar="BENCHMARK")
    _add_bench_train(benches)
    _add_bench_frontier(benches)
    _add_bench_facility_location(benches)
    _add_bench_workload(benches)
    _add_bench_service(benches)
    _add_bench_integrations(benches)
    _add_bench_staleness(benches)
    _add_bench_offload(benches)


def _add_bench_train(benches: Any) -> None:
    p = benches.add_parser(
        "train",
        help="time to accuracy: CREST against full data, random batches and InfoBatch",
        description="Train the same model under full data, uniform random batches, CREST through a local service "
        "(embedded Ray) and InfoBatch-style pruning, for the same steps and seeds; write JSON, a markdown table "
        "and PNG plots (accuracy vs time and vs examples, difficulty of the selected examples, fraction of the "
        "data left out). Defaults: Fashion-MNIST with a small CNN, 1,000 steps, 3 seeds (about 30 minutes on 2 "
        "cores). See benchmarks/train.py.",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="the first 6,000/1,000 examples (CREST subsets of 10%% so r stays 600), 150 steps, 1 seed, every method "
        "(about 2 minutes; the test suite's mode)",
    )
    p.add_argument(
        "--demo",
        action="store_true",
        help="full and crest only, 1 seed, results/demo.json, CREST with --recipe (the recommended recipe by "
        "default: what make demo runs; about 2 minutes on 2 cores)",
    )
    p.add_argument("--seeds", type=int, default=None, help="seeds per method (default 3; --quick and --demo 1)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 1000, --quick 150)")
    p.add_argument(
        "--methods",
        default=None,
        help="comma-separated subset of full,random,crest,infobatch,balanced (uniform class-balanced batches); "
        "full is required (default all but balanced; --demo full,crest)",
    )
    add_recipe_flag(p, "CREST's settings")
    p.add_argument(
        "--crest-adaptive", action="store_true", help="CREST's Taylor check ends regions (instead of the recipe's rule)"
    )
    p.add_argument(
        "--drop-learned",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="CREST: the service's learned-example exclusion (default: the recipe's; on in recommended)",
    )
    p.add_argument("--prune", type=float, default=0.5, help="InfoBatch: pruned fraction of low-loss examples")
    p.add_argument("--num-workers", type=int, default=2, help="selector actors of the service; default 2")
    p.add_argument(
        "--dataset",
        default="crest_bench.train_data:fashion_mnist",
        help="MODULE:FUNCTION or FILE.py:FUNCTION returning a crest_bench.train_data.BenchData (map-style "
        "train/test datasets and a model factory); default Fashion-MNIST with the SmallCNN",
    )
    p.add_argument(
        "--data-dir",
        default=os.environ.get("CREST_DATA_DIR"),
        help="passed to the dataset hook; Fashion-MNIST: the directory of its four .gz files (default: "
        "$CREST_DATA_DIR, then /usr/share/datasets/fashion-mnist)",
    )
    p.add_argument(
        "--out",
        default=None,
        help="JSON output; the .md table and the PNGs go next to it (default results/train.json, --demo "
        "results/demo.json)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar (it shows only on a terminal)")


def _add_bench_frontier(benches: Any) -> None:
    p = benches.add_parser(
        "frontier",
        help="the budget frontier: accuracy against wall-clock, every method at a sweep of budgets",
        description="Train full data, uniform random batches, CREST through a local service and InfoBatch at "
        "budgets that are fractions of E epochs, each run with its cosine schedule sized to its own steps, seeds "
        "paired across methods, on the same two cores (the split recorded per run); then full data at E epochs "
        "(and 2E with --reference). Report each method's frontier against wall-clock and steps, paired "
        "differences, time to accuracy and speedups, the paper's metric against the reference, and CREST's "
        "accuracy at equal steps and time with its cost per step by part. Defaults: Fashion-MNIST, E = 10, "
        "budgets 5-50%%, 3 seeds (about an hour on 2 cores). See benchmarks/frontier.py.",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="the first 6,000/1,000 examples (CREST subsets of 10%%), E = 2, budgets 0.25,0.5, 1 seed, every "
        "method (about 2 minutes; the test suite's mode)",
    )
    p.add_argument("--epochs", type=float, default=None, help="E: the reference run's epochs (default 10; --quick 2)")
    p.add_argument(
        "--budgets",
        default=None,
        help="comma-separated fractions of E epochs; steps = round(b E N / batch) (default 0.05,0.1,0.2,0.3,0.5)",
    )
    p.add_argument(
        "--methods",
        default=",".join(METHOD_NAMES[:4]),
        help="comma-separated subset of full,random,crest,infobatch,balanced (uniform class-balanced batches: the "
        "control of CREST's class-balanced subsets); full is required (default all but balanced)",
    )
    p.add_argument("--seeds", type=int, default=None, help="seeds per method, paired across methods (default 3)")
    p.add_argument(
        "--first-seed",
        type=int,
        default=0,
        help="seeds are FIRST..FIRST+S-1 (default 0): tune on other seeds than the reported table's",
    )
    p.add_argument(
        "--reference",
        action="store_true",
        help="also train full data for 2E epochs (E always runs) and report the gap doubling E adds",
    )
    p.add_argument("--baseline-threads", type=int, default=2, help="torch threads of full, random, infobatch, balanced")
    p.add_argument(
        "--crest-threads",
        type=int,
        default=2,
        help="torch threads of CREST's trainer (default 2: its selector actors barely use the CPU they reserve)",
    )
    p.add_argument("--num-workers", type=int, default=2, help="selector actors of the service; default 2")
    p.add_argument("--cpus-per-worker", type=float, default=0.5, help="CPUs each selector actor reserves; 0.5")
    p.add_argument(
        "--service-backend",
        default="ray",
        choices=("ray", "local"),
        help="CREST's service: selectors as Ray actors (default) or as threads in the server's process (local)",
    )
    p.add_argument(
        "--eval",
        default="test",
        choices=("test", "validation"),
        help="score on the test set, or on --validation-size examples held out of the training set (for tuning)",
    )
    p.add_argument(
        "--validation-size", type=int, default=None, help="held-out training examples (default 5000; --quick 1000)"
    )
    p.add_argument("--prune", type=float, default=0.5, help="InfoBatch: pruned fraction of low-loss examples")
    add_recipe_flag(p, "CREST's settings")
    add_flags(p, FRONTIER_CREST_FLAGS, recipes=RECIPES)
    p.add_argument("--lr", type=float, default=0.05, help="every method's peak learning rate (cosine to 0)")
    p.add_argument(
        "--momentum",
        type=float,
        default=0.9,
        help="every method's SGD momentum (0: plain SGD, as the released CREST code trains)",
    )
    p.add_argument(
        "--dataset",
        default="crest_bench.train_data:fashion_mnist",
        help="MODULE:FUNCTION or FILE.py:FUNCTION returning a crest_bench.train_data.BenchData, as bench train's "
        "(crest_bench.train_data:fashion_mnist_noisy and :fashion_mnist_imbalanced are the harder tasks)",
    )
    p.add_argument(
        "--data-dir",
        default=os.environ.get("CREST_DATA_DIR"),
        help="passed to the dataset hook (default: $CREST_DATA_DIR, then /usr/share/datasets/fashion-mnist)",
    )
    p.add_argument(
        "--out", default="results/frontier.json", help="JSON output; the .md tables and the PNGs go next to it"
    )
    p.add_argument(
        "--summary",
        default=None,
        help="also write the final tables alone, with the command line, to this JSON (the file to commit)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar (it shows only on a terminal)")


def _add_bench_facility_location(benches: Any) -> None:
    p = benches.add_parser(
        "facility-location",
        help="facility location against apricot and submodlib, side by side on the same inputs",
        description="Time this project's facility location against apricot and submodlib (each library in its "
        "own process, timed in turns) on a grid of seeded clustered inputs, score every selection under CREST's "
        "objective, then run the CREST-shaped workload. Needs the bench extra. See benchmarks/facility_location.py.",
    )
    p.add_argument("--quick", action="store_true", help="two small configurations and 20 CREST repeats")
    p.add_argument(
        "--libraries", default="ours,submodlib,apricot", help="comma-separated subset of ours,submodlib,apricot"
    )
    p.add_argument("--timeout", type=float, default=600, help="seconds to wait for one library call")
    p.add_argument("--out", default="results/facility_location.json", help="JSON output path")
    p.add_argument("--sizes", default="", help="comma-separated ground-set sizes to keep from the grid")
    p.add_argument(
        "--crest-repeats",
        type=int,
        default=None,
        help="repeats of the CREST-shaped workload (default 1000, quick 20; 0 skips it)",
    )


def _add_bench_workload(benches: Any) -> None:
    p = benches.add_parser(
        "workload",
        help="the CREST-shaped workload alone: many small per-class problems, ours against submodlib",
        description="Rounds of 5 subsets x 10 classes x 50 points (d = 10, budget 13 per class), timed in "
        "alternating blocks against submodlib; prints the JSON. See benchmarks/crest_workload.py.",
    )
    p.add_argument("--repeats", type=int, default=1000, help="rounds per library (default 1000)")
    p.add_argument("--timeout", type=float, default=600, help="seconds to wait for one block")


def _add_bench_service(benches: Any) -> None:
    p = benches.add_parser(
        "service",
        help="service overhead: selection through gRPC and Ray actors against the engine in process",
        description="CIFAR-10-shaped sessions through a real server and Ray actors (1/2/4 actors x 1/4/16 "
        "sessions): selections/s, embeddings/s and round latency, against the engine called in process. See "
        "benchmarks/service.py.",
    )
    p.add_argument("--quick", action="store_true", help="1 and 2 actors, 1 and 4 sessions, 2 rounds each")
    p.add_argument("--rounds", type=int, default=None, help="rounds per session (default 5; quick 2)")
    p.add_argument("--out", default="results/service.json", help="JSON output path")


def _add_bench_integrations(benches: Any) -> None:
    p = benches.add_parser(
        "integrations",
        help="per-step overhead of the Hugging Face and Lightning integrations against each framework's own loop",
        description="Train the same model three ways, side by side in interleaved blocks: the framework's own "
        "loop, the integration on uniform-random batches, and the integration on coresets from a local service; "
        "print ms per step, the ratios to the framework's loop, and CREST's embedding passes and waits separately. "
        "Needs the hf and lightning extras. See benchmarks/integrations.py.",
    )
    p.add_argument("--quick", action="store_true", help="1,000 examples, 2 blocks of 20 steps (the test suite's mode)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per block (default 100; --quick 20)")
    p.add_argument("--blocks", type=int, default=None, help="interleaved blocks per way (default 10; --quick 2)")
    p.add_argument("--frameworks", default="hf,lightning", help="comma-separated subset of hf,lightning")
    p.add_argument("--out", default="results/integrations.json", help="JSON output path")


def _add_bench_staleness(benches: Any) -> None:
    p = benches.add_parser(
        "staleness",
        help="how a candidate embedding's age changes the coresets selected on it",
        description="Train the SmallCNN and, every few steps, select a round's coresets on embeddings from the "
        "current model and from the model some steps earlier; report how many picks and how much of the "
        "facility-location objective each age keeps, beside a random pick. See benchmarks/staleness.py.",
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


def _add_bench_offload(benches: Any) -> None:
    p = benches.add_parser(
        "offload",
        help="CREST's embedding pass on the training thread against a worker on the spare core",
        description="Time training steps alone (on every core and on one), CREST's step with the round's "
        "embedding pass on the training thread, and the same with the pass on a second thread using a snapshot "
        "of the weights while the trainer keeps one core. See benchmarks/offload.py.",
    )
    p.add_argument("--quick", action="store_true", help="2,000 examples, batches of 32, one repetition")
    p.add_argument("--candidates", type=int, default=None, help="candidates embedded per round (default 3000)")
    p.add_argument("--steps-per-round", type=int, default=None, help="training steps per round (default 20)")
    p.add_argument("--rounds", type=int, default=None, help="rounds per timed run (default 8)")
    p.add_argument("--repetitions", type=int, default=None, help="runs of each mode, order rotated (default 5)")
    p.add_argument("--dataset", default=None, help="dataset hook MODULE:FUNCTION (default Fashion-MNIST)")
    p.add_argument("--data-dir", default=None, help="directory with the Fashion-MNIST files")
    p.add_argument("--out", default="results/offload.json", help="JSON output path")


def run(args: argparse.Namespace) -> int:
    """Import the benchmark that runs (each pulls in what it measures) and run it."""
    if args.bench == "train":
        from crest_bench import train as bench
    elif args.bench == "frontier":
        from crest_bench import frontier as bench  # type: ignore[no-redef]
    elif args.bench == "facility-location":
        from crest_bench import facility_location as bench  # type: ignore[no-redef]
    elif args.bench == "workload":
        from crest_bench import crest_workload as bench  # type: ignore[no-redef]
    elif args.bench == "integrations":
        from crest_bench import integrations as bench  # type: ignore[no-redef]
    elif args.bench == "staleness":
        from crest_bench import staleness as bench  # type: ignore[no-redef]
    elif args.bench == "offload":
        from crest_bench import offload as bench  # type: ignore[no-redef]
    else:
        from crest_bench import service as bench  # type: ignore[no-redef]
    return int(bench.run(args))


def main(argv: list[str] | None = None) -> int:
    """``python -m crest_bench.cli ...``: the ``crest`` command (``crest.cli.main``)."""
    from crest.cli import main as crest_main

    return crest_main(argv)


if __name__ == "__main__":
    sys.exit(main())
