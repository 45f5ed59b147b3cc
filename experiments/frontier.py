"""The budget frontier: accuracy against wall-clock for every method at a sweep of budgets, each run with its LR
schedule sized to its own budget (issue 15, points 1 and 2: the measurement harness; it claims no result).

    python -m experiments.frontier                    # Fashion-MNIST, E = 10 epochs, budgets 5-50%, 3 seeds, 4 methods
    python -m experiments.frontier --reference        # also full data at 2E epochs: does doubling E add < 0.3 points?
    python -m experiments.frontier --eval validation  # score on a split of the training set: tune without the test set
    python -m experiments.frontier --quick            # 6,000/1,000 examples, E = 2, budgets 25%/50%, 1 seed (tests)

The flags are ``build_parser``'s. The protocol:

- A budget b is a fraction of a reference run of E epochs (``--epochs``): steps = round(b x E x N / batch_size).
  Every run trains from scratch for its steps with ``train_methods.run_one`` (the model, SGD, batch assembly and
  clock of ``crest bench train``), and its cosine schedule spans its own steps.
- Methods ``full``, ``random``, ``crest``, ``infobatch``; seeds F..F+S-1 (``--first-seed``), paired: the same
  seed gives every method the same initial weights. For each seed the sweep runs budget by budget, every method
  in turn (side by side in time, so a slow minute on a shared box moves every method), then the reference: full
  data at E epochs (budget 1.0; the paper's metric and one target use it) and, with ``--reference``, at 2E.
- The same two cores for every method, split as each likes and recorded per run: the baselines (full, random,
  InfoBatch) train with ``--baseline-threads`` torch threads (2); CREST trains with ``--crest-threads`` (2) beside
  the service (``crest serve --port 0``, embedded Ray, started once and idle during the other runs), whose
  ``--num-workers`` selector actors reserve ``--cpus-per-worker`` CPUs (2 x 0.5) in Ray but select about 0.1 ms
  per step: measured on the validation split (2026-11-29), CREST's step cost 36.6 ms with 1 trainer thread
  against 24.6 ms with 2, the baselines' 21 ms. The service's
  process-tree CPU during each run is recorded too (Linux), so its idle cost during the baselines shows.
- The clock excludes evaluation: each run is scored once, at its end, on the whole evaluation split: the test set
  (``--eval test``) or ``--validation-size`` examples held out of the training set (``--eval validation``,
  ``train_data.split_validation``: the test set is never used for tuning).

Scoring (``frontier_report``): each method's frontier (upper envelope of the seed-mean points, against wall-clock
and against steps), paired differences at each budget, time to accuracy on each frontier and the speedups, the
paper's metric against the reference, each CREST (and InfoBatch) run at equal steps and at equal wall-clock
against its seed's baselines, and the cost per step by part (training, embedding, quadratic-model fits, checks,
waiting; the service's selection time, each selector call counted once).

Writes the JSON (default results/frontier.json: ``command``, ``protocol``, ``runs``, ``summary``), the markdown
tables next to it (.md), two PNGs when matplotlib is installed, and with ``--summary PATH`` the summary alone with
the command line that produced it (the file to commit; the raw JSON stays under results/).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: spin-waiting starves the selectors

import argparse
import shlex
import signal
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from crest_bench.crest_flags import add_recipe_flag
from crest_bench.report import machine, write_atomic, write_json
from crest_bench.train import start_service
from crest_bench.train_data import BenchData, load_data, materialize, split_validation
from crest_bench.train_methods import (
    DEFAULT_METHODS,
    METHODS,
    SELECTING,
    BenchConfig,
    EvalSets,
    RunResult,
    run_one,
    warm_up,
)
from experiments._main import run_main
from experiments.frontier_report import REFERENCE, SWEEP, FrontierRun, budget_steps, summarize
from experiments.frontier_tables import markdown, plot
from selector_service.process import ServiceProcess
from trainer_client.cli import loader_config
from trainer_client.flags import add_flags, config_flags
from trainer_client.loader_config import RECIPES, LoaderConfig

# The frontier's CREST flags: every LoaderConfig field as --crest-<field>, but those the benchmark sets itself (the
# batch size is every method's, the seed each run's), with the names the flags had before as aliases.
FRONTIER_CREST_FLAGS = config_flags(
    LoaderConfig,
    prefix="crest-",
    aliases={
        "region.steps_per_round": ("--crest-steps-per-round",),
        "region.hessian_every": ("--crest-hessian-every",),
        "subset_fraction": ("--subset-fraction",),
        "drop_learned": ("--drop-learned",),
        "drop_threshold": ("--drop-threshold",),
        "drop_window": ("--drop-window",),
        "min_pool_fraction": ("--min-pool-fraction",),
        "coreset_weights": ("--crest-weights",),
    },
    skip=("recipe", "batch_size", "seed", "client_name", "weights_key", "region.seed"),
    extra_help={"region.steps_per_round": "0: CREST's Taylor check ends regions (region mode crest)."},
)

# As ``crest bench train --quick``: a tenth of the data keeps CREST's random subsets at r = 600.
QUICK = {"train_limit": 6000, "test_limit": 1000}
QUICK_CREST = {"subset_fraction": 0.1}
QUICK_PROTOCOL = {"epochs": 2.0, "budgets": (0.25, 0.5), "seeds": 1, "validation_size": 1000}
EVALUATIONS = ("test", "validation")


@dataclass(frozen=True, kw_only=True)
class FrontierConfig:
    """One frontier: the protocol around the methods' shared settings."""

    # Model, optimizer, data and each method's own settings; ``steps`` is set per run from its budget.
    bench: BenchConfig = field(default_factory=BenchConfig)
    # E, the reference run's length in epochs of the training set: the issue asks for an E that doubling
    # changes by under 0.3 points (--reference measures it). 10 epochs of Fashion-MNIST: 4,688 steps of 128.
    epochs: float = 10.0
    # Budgets as fractions of E epochs (the 5-50%).
    budgets: tuple[float, ...] = (0.05, 0.1, 0.2, 0.3, 0.5)
    methods: tuple[str, ...] = DEFAULT_METHODS
    seeds: int = 3
    # Seeds are first_seed .. first_seed + seeds - 1: ablations run on seeds the reported table does not use.
    first_seed: int = 0
    # Also train full data for 2E epochs (E runs unless e_run is off).
    reference: bool = False
    # Train full data for E epochs after each seed's sweep (the paper's metric and one target use it); off for
    # studies that compare the sweep's methods only (the payoff's frontier), saving E epochs per seed.
    e_run: bool = True
    # "test", or "validation": validation_size examples held out of the training set (seeded, fixed).
    evaluation: str = "test"
    validation_size: int = 5000
    # The two cores: torch threads of the baselines; CREST's torch threads, its service's selector actors and
    # the CPUs each reserves in Ray (2 x 0.5). CREST's trainer takes both cores too: selection costs about 0.1 ms
    # a step, so a core left to the actors idles (36.6 ms a step with 1 thread, 24.6 ms with 2).
    baseline_threads: int = 2
    crest_threads: int = 2
    num_workers: int = 2
    cpus_per_worker: float = 0.5
    # The service's selectors: Ray actors ("ray", as deployed on a cluster) or threads in the server's process
    # ("local": a single machine's deployment, without Ray's processes on the trainer's cores).
    service_backend: str = "ray"


def plan(args: argparse.Namespace) -> FrontierConfig:
    """The protocol from ``python -m experiments.frontier`` flags; explicit flags beat the ``--quick`` preset."""
    methods = tuple(m for m in args.methods.split(",") if m)
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    if "full" not in methods:
        raise ValueError("full data sets the targets and the reference; keep 'full' in --methods")
    if args.eval not in EVALUATIONS:
        raise ValueError(f"--eval takes {' or '.join(EVALUATIONS)}, received {args.eval!r}")
    preset: dict[str, Any] = QUICK_PROTOCOL if args.quick else {}
    budgets = tuple(float(b) for b in args.budgets.split(",") if b) if args.budgets else preset.get("budgets")
    if budgets is not None and not all(0 < b <= 1 for b in budgets):
        raise ValueError(f"--budgets are fractions of E epochs in (0, 1], received {args.budgets!r}")
    crest = loader_config(args, FRONTIER_CREST_FLAGS, QUICK_CREST if args.quick else None)
    bench = BenchConfig(
        **(QUICK if args.quick else {}),  # type: ignore[arg-type]
        dataset=args.dataset,
        data_dir=args.data_dir,
        crest=crest,
        lr=args.lr,
        momentum=args.momentum,
        prune=args.prune,
    )
    given = {
        "epochs": args.epochs,
        "budgets": budgets,
        "seeds": args.seeds,
        "validation_size": args.validation_size,
    }
    return FrontierConfig(
        bench=bench,
        **{**preset, **{k: v for k, v in given.items() if v is not None}},
        methods=methods,
        first_seed=args.first_seed,
        reference=args.reference,
        e_run=not args.no_e_run,
        evaluation=args.eval,
        baseline_threads=args.baseline_threads,
        crest_threads=args.crest_threads,
        num_workers=args.num_workers,
        cpus_per_worker=args.cpus_per_worker,
        service_backend=args.service_backend,
    )


def run(args: argparse.Namespace) -> int:
    """``python -m experiments.frontier``: every seed, budget and method, the reference runs, then the report."""
    try:
        config = plan(args)
    except ValueError as exc:
        print(f"python -m experiments.frontier: {exc}", file=sys.stderr)
        return 2
    command = "python -m experiments.frontier " + shlex.join(getattr(args, "argv", None) or sys.argv[1:])
    if any(m in SELECTING for m in config.methods):
        print(f"python -m experiments.frontier: CREST with {config.bench.crest.describe()}", flush=True)
    out = Path(args.out)
    bench = config.bench
    data = load_data(bench.dataset, bench.data_dir, bench.train_limit, bench.test_limit)
    if config.evaluation == "validation":
        data = split_validation(data, config.validation_size)
    evals = EvalSets(
        curve=materialize(data.test, bench.eval_examples), test=materialize(data.test), balanced=data.balanced_score
    )
    service = (
        start_service(config.num_workers, cpus_per_worker=config.cpus_per_worker, backend=config.service_backend)
        if any(m in SELECTING for m in config.methods)
        else None
    )
    runs: list[FrontierRun] = []
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind: stop the service, keep finished seeds
    try:
        for threads in sorted({config.baseline_threads, config.crest_threads}):
            torch.set_num_threads(threads)
            warm_up(data, bench)
        if service is not None:  # one untimed region, so the first timed CREST run pays no first-round start-up
            run_one("crest", 0, replace(bench, steps=8, eval_every=8), data, evals, service.target, progress=False)
        started = time.perf_counter()
        for seed in range(config.first_seed, config.first_seed + config.seeds):
            for method, budget, role in schedule(config):
                r = measure(method, seed, budget, role, config, data, evals, service, progress=not args.no_progress)
                runs.append(r)
                print(f"[{time.perf_counter() - started:6.0f} s] {_line(r)}", flush=True)
            report(runs, config, data, out, command)
    finally:
        if service is not None:
            service.stop()
    table = report(runs, config, data, out, command)
    print()
    print(table)
    written = [str(out), str(out.with_suffix(".md"))]
    written += [str(p) for p in plot(runs, summarize(runs), out, config.evaluation)]
    if args.summary:
        doc = _document(runs, config, data, command)
        write_json(Path(args.summary), _rounded({k: v for k, v in doc.items() if k != "runs"}))
        written.append(args.summary)
    print("wrote " + ", ".join(written))
    return 0


def schedule(config: FrontierConfig) -> list[tuple[str, float, str]]:
    """One seed's runs in order, (method, budget, role): budget by budget every method, then the reference."""
    sweep = [(m, b, SWEEP) for b in config.budgets for m in config.methods]
    refs = [1.0] if config.e_run else []
    return sweep + [("full", b, REFERENCE) for b in refs + ([2.0] if config.reference else [])]


def measure(
    method: str,
    seed: int,
    budget: float,
    role: str,
    config: FrontierConfig,
    data: BenchData,
    evals: EvalSets,
    service: ServiceProcess | None,
    progress: bool,
) -> FrontierRun:
    """Train one method for a budget and score it, with its threads, cost split and counters."""
    n = len(data.train)  # type: ignore[arg-type]
    steps = budget_steps(budget, config.epochs, n, config.bench.batch_size)
    crest = method in SELECTING
    threads = config.crest_threads if crest else config.baseline_threads
    torch.set_num_threads(threads)
    cpu_before = tree_cpu_s(service.proc.pid) if service is not None else None
    endpoint = service.target if service is not None else None
    r = run_one(method, seed, replace(config.bench, steps=steps, eval_every=steps), data, evals, endpoint, progress)
    cpu_after = tree_cpu_s(service.proc.pid) if service is not None else None
    return FrontierRun(
        method=method,
        seed=seed,
        budget=budget,
        steps=steps,
        wall_s=r.wall_s,
        accuracy=r.test_accuracy,
        role=role,
        torch_threads=threads,
        service_workers=config.num_workers if crest else 0,
        cpus_per_worker=config.cpus_per_worker if crest and config.service_backend == "ray" else 0.0,
        cost=_cost(r, None if cpu_before is None or cpu_after is None else cpu_after - cpu_before),
        counters=_counters(r),
        detail=asdict(r),
    )


def _cost(r: RunResult, service_cpu_s: float | None) -> dict[str, float | None]:
    """Seconds: the trainer's wall time by part (training is what the loader's counters leave), the service's."""
    parts = {
        "embed_s": r.loader.get("embed_s", 0.0),
        "fit_s": r.loader.get("fit_s", 0.0),
        "check_s": r.loader.get("check_s", 0.0),
        "wait_s": r.wait_s,
    }
    return {
        "train_s": r.wall_s - sum(parts.values()),
        **parts,
        "selection_s": r.selection_s,
        "service_cpu_s": service_cpu_s,
    }


def _counters(r: RunResult) -> dict[str, int]:
    names = ("checks", "reselections", "regions", "fallback_batches", "partial_rounds", "persistent_failures")
    names += ("embeddings_reused", "reused_age_steps")
    return {
        "examples_backpropagated": r.examples_backpropagated,
        "examples_embedded": r.examples_forward_only,
        "selection_calls": r.selection_calls,
        "rounds": r.rounds,
        **{name: int(r.loader.get(name, 0)) for name in names},
    }


def tree_cpu_s(pid: int) -> float | None:
    """CPU seconds (user + system) used so far by ``pid`` and its descendants, live ones and the children they
    reaped, from /proc; None where /proc cannot be read (not Linux)."""
    try:
        tick = os.sysconf("SC_CLK_TCK")
        parents: dict[int, int] = {}
        cpu: dict[int, int] = {}
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                fields = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue  # exited meanwhile
            parents[int(entry.name)] = int(fields[1])
            cpu[int(entry.name)] = sum(int(f) for f in fields[11:15])  # utime, stime, cutime, cstime
    except (OSError, ValueError):
        return None
    tree, frontier = {pid}, [pid]
    while frontier:
        parent = frontier.pop()
        children = [p for p, pp in parents.items() if pp == parent and p not in tree]
        tree.update(children)
        frontier.extend(children)
    return sum(cpu.get(p, 0) for p in tree) / tick


def _line(r: FrontierRun) -> str:
    text = (
        f"seed {r.seed} {r.method:<9} {r.budget:>4.0%} {r.role:<9} {r.steps:>5} steps  acc {r.accuracy:.4f}  "
        f"wall {r.wall_s:6.1f} s  threads {r.torch_threads}"
    )
    if r.service_workers:
        c = r.cost
        text += (
            f" + {r.service_workers} selectors  embed {c['embed_s']:.1f} s  fit {c['fit_s']:.1f} s  "
            f"wait {c['wait_s']:.2f} s  selection {c['selection_s']:.2f} s"
        )
    return text


def _rounded(value: Any, digits: int = 5) -> Any:
    """``value`` with every float rounded to ``digits`` significant digits (the committed summary stays small)."""
    if isinstance(value, float):
        return float(f"{value:.{digits}g}")
    if isinstance(value, dict):
        return {k: _rounded(v, digits) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v, digits) for v in value]
    return value


def _document(runs: list[FrontierRun], config: FrontierConfig, data: BenchData, command: str) -> dict[str, Any]:
    n = len(data.train)  # type: ignore[arg-type]
    return {
        "command": command,
        "machine": machine(),
        "dataset": data.name,
        "evaluation": config.evaluation,
        "train_examples": n,
        "eval_examples": len(data.test),  # type: ignore[arg-type]
        "protocol": {
            **{k: v for k, v in asdict(config).items() if k != "bench"},
            "steps": {f"{b:g}": budget_steps(b, config.epochs, n, config.bench.batch_size) for b in config.budgets},
            "reference_steps": budget_steps(1.0, config.epochs, n, config.bench.batch_size),
            # The shared settings; steps and eval_every are per run, torch threads per method (above).
            "bench": {k: v for k, v in asdict(config.bench).items() if k not in ("steps", "eval_every", "threads")},
            # CREST's recipe, what the command line overrode in it, and the embedding pass's dtype on this machine.
            "crest_recipe": config.bench.crest.recipe,
            "crest_overrides": config.bench.crest.overrides(),
            "crest_embed_dtype": config.bench.crest.embed_dtype_on(torch.device("cpu")),
        },
        "seeds_done": _seeds_done(runs, config),
        "runs": [asdict(r) for r in runs],
        "summary": summarize(runs),
    }


def _seeds_done(runs: list[FrontierRun], config: FrontierConfig) -> int:
    """Seeds whose runs (``schedule``) have all finished."""
    planned = {(m, b) for m, b, _ in schedule(config)}
    return sum(planned <= {(r.method, r.budget) for r in runs if r.seed == s} for s in {r.seed for r in runs})


def report(runs: list[FrontierRun], config: FrontierConfig, data: BenchData, out: Path, command: str) -> str:
    """Score the runs so far, write the JSON and the markdown tables atomically, and return the tables."""
    doc = _document(runs, config, data, command)
    b = config.bench
    crest = f"CREST: {b.crest.describe()}, the embedding pass in {doc['protocol']['crest_embed_dtype']}"
    selectors = (
        f"{config.num_workers} selector actors x {config.cpus_per_worker:g} CPU"
        if config.service_backend == "ray"
        else f"{config.num_workers} selector threads in the service's process (local backend, no Ray)"
    )
    header = (
        f"{data.name}: {doc['train_examples']:,} training examples, evaluated on the {config.evaluation} split "
        f"({doc['eval_examples']:,}); E = {config.epochs:g} epochs ({doc['protocol']['reference_steps']} steps of "
        f"{b.batch_size}, SGD lr {b.lr:g} cosine, momentum {b.momentum:g}); seeds done "
        f"{doc['seeds_done']}/{config.seeds}. Torch threads: baselines "
        f"{config.baseline_threads}, CREST {config.crest_threads} + {selectors}. {crest}.\n\n`{command}`"
    )
    table = markdown(doc["summary"], header)
    write_json(out, doc)
    write_atomic(out.with_suffix(".md"), table)
    return table


def build_parser() -> argparse.ArgumentParser:
    """The flags of ``python -m experiments.frontier``."""
    p = argparse.ArgumentParser(
        prog="python -m experiments.frontier",
        description="Train full data, uniform random batches, CREST through a local service and InfoBatch at "
        "budgets that are fractions of E epochs, each run with its cosine schedule sized to its own steps, seeds "
        "paired across methods, on the same two cores (the split recorded per run); then full data at E epochs "
        "(and 2E with --reference). Report each method's frontier against wall-clock and steps, paired "
        "differences, time to accuracy and speedups, the paper's metric against the reference, and CREST's "
        "accuracy at equal steps and time with its cost per step by part. Defaults: Fashion-MNIST, E = 10, "
        "budgets 5-50%%, 3 seeds (about an hour on 2 cores). See experiments/frontier.py.",
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
        default=",".join(DEFAULT_METHODS),
        help="comma-separated subset of full,random,crest,infobatch,balanced,crest-measure,crest-govern (balanced: "
        "uniform class-balanced batches, the control of CREST's class-balanced subsets; crest-measure/-govern: CREST "
        "with its payoff measured or governing on 500 held-out training examples); full is required (default "
        "full,random,crest,infobatch)",
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
        help="also train full data for 2E epochs (E runs unless --no-e-run) and report the gap doubling E adds",
    )
    p.add_argument(
        "--no-e-run",
        action="store_true",
        help="skip full data at E epochs after each seed's sweep (no paper's metric): for comparing the sweep's "
        "methods only",
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
    return p


def main(argv: list[str] | None = None) -> int:
    """``python -m experiments.frontier [flags]``, from the root of a checkout."""
    return run_main(build_parser, run, argv)


if __name__ == "__main__":
    sys.exit(main())
