"""The ``bench`` command: benchmarks that start what they measure.

``add_commands`` registers ``crest bench {train,frontier,facility-location,workload,service,integrations,dataloading,
staleness,offload}`` on the ``crest`` parser (``crest.cli``, the composition root, loads this module for ``bench``
only).
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

from crest_bench.crest_flags import add_recipe_flag

COMMANDS = ("bench",)

# The training benchmark's methods (crest_bench.train_methods.METHODS, which imports torch).
METHOD_NAMES = ("full", "random", "crest", "infobatch", "balanced", "crest-measure", "crest-govern")


def add_commands(sub: Any) -> None:
    """Register ``bench`` and its benchmarks on ``sub`` (an ``add_subparsers`` result)."""
    bench = sub.add_parser("bench", help="benchmarks", description="Benchmarks that start what they measure.")
    benches = bench.add_subparsers(dest="bench", required=True, metavar="BENCHMARK")
    _add_bench_train(benches)
    _add_bench_facility_location(benches)
    _add_bench_workload(benches)
    _add_bench_service(benches)
    _add_bench_integrations(benches)
    _add_bench_dataloading(benches)


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


def _add_bench_dataloading(benches: Any) -> None:
    p = benches.add_parser(
        "dataloading",
        help="input-pipeline throughput: CoresetLoader's DataLoader workers against a plain DataLoader",
        description="Fashion-MNIST behind a CPU-heavy per-example transform (upsample, random resized crop to 64x64, "
        "flip, normalise) and a model cheap enough that input is the bottleneck, trained by a plain DataLoader, "
        "CoresetLoader on uniform batches and CoresetLoader with CREST (a local service) at each worker count, in "
        "interleaved rounds: batches/s and the training thread's input wait, against its targets. Default "
        "output benchmarks/results/dataloading_<machine>.json. See benchmarks/dataloading.py.",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="10,000 examples, W = 0 and 1, 1 round of 5 + 25 steps per run (the test suite's mode)",
    )
    p.add_argument("--repeats", type=int, default=None, help="interleaved rounds of every run (default 3; --quick 1)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per run (default 60; --quick 25)")
    p.add_argument(
        "--workers",
        type=int,
        nargs="+",
        default=None,
        help="DataLoader worker counts W to run (default 0 1 2; --quick 0 1)",
    )
    p.add_argument(
        "--out", default=None, help="JSON output path (default benchmarks/results/dataloading_<machine>.json)"
    )


def run(args: argparse.Namespace) -> int:
    """Import the benchmark that runs (each pulls in what it measures) and run it."""
    if args.bench == "train":
        from crest_bench import train as bench
    elif args.bench == "facility-location":
        from crest_bench import facility_location as bench  # type: ignore[no-redef]
    elif args.bench == "workload":
        from crest_bench import crest_workload as bench  # type: ignore[no-redef]
    elif args.bench == "integrations":
        from crest_bench import integrations as bench  # type: ignore[no-redef]
    elif args.bench == "dataloading":
        from crest_bench import dataloading as bench  # type: ignore[no-redef]
    else:
        from crest_bench import service as bench  # type: ignore[no-redef]
    return int(bench.run(args))


def main(argv: list[str] | None = None) -> int:
    """``python -m crest_bench.cli ...``: the ``crest`` command (``crest.cli.main``)."""
    from crest.cli import main as crest_main

    return crest_main(argv)


if __name__ == "__main__":
    sys.exit(main())
