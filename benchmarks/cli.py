"""The ``crest`` command: one entry point that dispatches to the side that owns each command.

- ``serve``, ``inspect``: the service side (``selector_service.cli``);
- ``train``: the trainer side (``trainer_client.cli``);
- ``demo`` and ``bench {train,frontier,facility-location,workload,service,integrations,staleness,offload}``: the
  benchmarks (this package).

This module sits at the top of the package graph (``crest`` <- {``selector_service``, ``trainer_client``} <-
``crest_bench``), so it may import both sides; neither side imports it. Building the parser imports only the
sides' flag definitions (no torch, Ray or faiss): a side whose dependencies are missing keeps its command
names, which then say what to install. Environment read here: CREST_DATA_DIR (``bench train``/``frontier``
``--data-dir``).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from selector_service import cli as service_cli

# The training benchmark's methods (crest_bench.train_methods.METHODS, which imports torch).
METHOD_NAMES = ("full", "random", "crest", "infobatch", "balanced")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="crest", description="CREST data selection as a service.")
    service_cli.add_log_level(parser)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    service_cli.add_commands(sub)
    trainer = _trainer_cli()
    if trainer is not None:
        trainer.add_commands(sub)
    else:
        _add_missing(sub, "train", "train the Fashion-MNIST CNN against a running service")

    demo = sub.add_parser(
        "demo",
        help="start a local service and train against it",
        description="Start the service on localhost (embedded Ray), train the Fashion-MNIST "
        "CNN through it over gRPC, print the results, stop the service. The demo trains 50 steps on each "
        "round's coresets so it finishes in a few minutes on 2 CPU cores; --steps-per-round 0 switches to "
        "CREST's adaptive Taylor check (several times slower on CPU, where every reselection costs a "
        "forward pass over the round's random subsets and a Hessian estimate).",
    )
    service_cli.add_selector_flags(demo)
    if trainer is not None:
        trainer.add_train_flags(demo, steps_per_round=50)

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
    return parser


def _trainer_cli() -> Any:
    """``trainer_client.cli``, or None when the trainer side's dependencies (torch) are not installed."""
    try:
        from trainer_client import cli
    except ImportError:
        return None
    return cli


def _add_missing(sub: Any, name: str, help: str) -> None:
    p = sub.add_parser(name, help=f"{help} (needs the trainer side)", add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER, help="not available: the trainer side is not installed")


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
        help="full and crest only, 1 seed, results/demo.json, CREST with the clean task's tuned settings (20-step "
        "regions of 10 coresets, r = 0.5%%, weight 1; what make demo runs; about 3 minutes on 2 cores)",
    )
    p.add_argument("--seeds", type=int, default=None, help="seeds per method (default 3; --quick and --demo 1)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 1000, --quick 150)")
    p.add_argument(
        "--methods",
        default=None,
        help="comma-separated subset of full,random,crest,infobatch,balanced (uniform class-balanced batches); "
        "full is required (default all but balanced; --demo full,crest)",
    )
    p.add_argument(
        "--crest-adaptive", action="store_true", help="CREST's Taylor check ends regions (default: 50-step regions)"
    )
    p.add_argument(
        "--drop-learned",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="CREST: the service's learned-example exclusion (loss <= 0.1 over 5 visits; floor 0.8 N); default on",
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
    p.add_argument(
        "--crest-steps-per-round",
        type=int,
        default=50,
        help="CREST: fixed regions of this many steps; 0 uses CREST's adaptive Taylor check (default 50)",
    )
    p.add_argument(
        "--crest-num-subsets",
        type=int,
        default=5,
        help="CREST: random subsets per round; a fixed region trains on that many coresets (default 5)",
    )
    p.add_argument(
        "--subset-fraction",
        type=float,
        default=None,
        help="CREST: random-subset size r as a fraction of the training set (default 0.01; --quick 0.1)",
    )
    p.add_argument(
        "--drop-learned",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="CREST: the service's learned-example exclusion (default on)",
    )
    p.add_argument(
        "--drop-threshold",
        type=float,
        default=0.0,
        help="CREST: the exclusion's learned-loss threshold in nats (default 0: the service's 0.1)",
    )
    p.add_argument(
        "--drop-window",
        type=int,
        default=0,
        help="CREST: recorded losses in a row that must be under the threshold (default 0: the service's 5)",
    )
    p.add_argument(
        "--min-pool-fraction",
        type=float,
        default=0.0,
        help="CREST: the exclusion's floor on the sampling pool, a fraction of N (default 0: the service's 0.8)",
    )
    p.add_argument("--prune", type=float, default=0.5, help="InfoBatch: pruned fraction of low-loss examples")
    p.add_argument(
        "--crest-weights",
        default="cluster",
        choices=("cluster", "uniform"),
        help="CREST: train on the coresets with their cluster-size weights (default) or with weight 1 (ablation)",
    )
    p.add_argument(
        "--crest-joint-selection",
        action="store_true",
        help="CREST: facility location over each whole random subset instead of per class (ablation)",
    )
    p.add_argument(
        "--crest-embed-dtype",
        default="float32",
        choices=("float32", "bfloat16"),
        help="CREST: precision of the embedding pass (default float32; training is float32 for every method)",
    )
    p.add_argument(
        "--crest-embedding",
        default="logit_gradient",
        choices=("logit_gradient", "last_layer_gradient"),
        help="CREST: the gradient embedding selection runs on (default logit_gradient: C floats)",
    )
    p.add_argument(
        "--crest-embedding-dim",
        type=int,
        default=0,
        help="CREST: random projection of the last-layer embedding to this many dimensions (0 keeps C (H + 1))",
    )
    p.add_argument(
        "--crest-embedding-max-age",
        type=int,
        default=0,
        help="CREST: reuse a candidate's embedding in later rounds while it is at most this many steps old "
        "(default 0: every round embeds all its candidates)",
    )
    p.add_argument(
        "--crest-learned-embedding-max-age",
        type=int,
        default=0,
        help="CREST: reuse the embedding of a candidate the model had learned (its loss at most "
        "--crest-learned-embedding-loss) while it is at most this many steps old (default 0: off)",
    )
    p.add_argument(
        "--crest-learned-embedding-loss",
        type=float,
        default=0.05,
        help="CREST: the loss in nats at or below which a stored embedding counts as learned (default 0.05)",
    )
    p.add_argument(
        "--crest-training-logits",
        action="store_true",
        help="CREST: refresh the stored embeddings of the trained examples from the training steps' logits "
        "(needs an embedding max age)",
    )
    p.add_argument(
        "--crest-fit-examples",
        type=int,
        default=0,
        help="CREST's adaptive rule: fit the quadratic model on a seeded sample of this many of the region's pool "
        "(default 0: the whole pool)",
    )
    p.add_argument(
        "--crest-hessian-every",
        type=int,
        default=1,
        help="CREST's adaptive rule: estimate the Hessian diagonal on every this-many-th fit only; the fits in "
        "between take the gradient alone (default 1: every fit)",
    )
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


def _run_demo(args: argparse.Namespace, trainer: Any) -> int:
    import logging

    from selector_service.process import spawn_service

    with spawn_service(service_cli.selector_serve_args(args), log_level=args.log_level) as service:
        logging.getLogger("crest").info("service ready at %s (pid %d)", service.target, service.proc.pid)
        return int(trainer.run_train(args, service.target, None))


def _command(argv: list[str]) -> str | None:
    """The command word of ``argv`` (after the global ``--log-level LEVEL``), None when there is none."""
    words = iter(argv)
    for word in words:
        if word == "--log-level":
            next(words, None)
        elif not word.startswith("-"):
            return word
    return None


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


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = _command(argv)
    if command in service_cli.COMMANDS:
        # The service side alone: a `crest serve` process never loads torch, and runs where it is not installed.
        return service_cli.main(argv)
    # Before torch loads anywhere: OpenMP spin-waiting slows torch 10-70x next to other busy processes.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    trainer = _trainer_cli() if command in ("train", "demo") else None
    if command in ("train", "demo") and trainer is None:
        print(
            f"crest {command}: the trainer side is not installed (torch); install it: pip install "
            "'.[trainer]' from a checkout, or the wheel that `make wheel` builds with the same extra",
            file=sys.stderr,
        )
        return 2
    args = build_parser().parse_args(argv)
    args.argv = argv  # the exact command line, for the results that record it
    service_cli.setup_logging(args)
    if args.command == "train":
        return int(trainer.run(args))
    if args.command == "demo":
        return _run_demo(args, trainer)
    return _run_bench(args)


def _run_bench(args: argparse.Namespace) -> int:
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


if __name__ == "__main__":
    sys.exit(main())
