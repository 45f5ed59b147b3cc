"""The trainer side's command: ``crest train`` (the Fashion-MNIST CNN against a running service).

``add_commands`` registers it on the ``crest`` parser (``crest.cli``, the composition root, loads this module alone
for it);
``python -m trainer_client.cli train ...`` runs it without the service side installed. ``add_train_flags``,
``train_config`` and ``run_train`` are shared with ``crest demo``. Environment read here: CREST_DATA_DIR
(``--data-dir``); the client reads CREST_AUTH_TOKEN (``--token``'s default) and CREST_TLS_* (``SelectionClient``).
Never imports faiss or Ray.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace
from typing import Any

from crest.cli import add_log_level, setup_logging
from trainer_client.flags import Flag, add_flags, config_flags, given, with_overrides
from trainer_client.loader_config import RECIPES, LoaderConfig

COMMANDS = ("train",)


# The selection settings' flags: every LoaderConfig field (trainer_client.flags), besides those the command sets.
# --steps-per-round and --tau keep their names from before the flags were derived.
SELECTION_FLAGS = config_flags(
    LoaderConfig,
    aliases={"region.steps_per_round": ("--steps-per-round",), "region.tau": ("--tau",)},
    skip=("recipe", "client_name", "weights_key", "region.seed"),
    extra_help={"region.steps_per_round": "0: CREST's Taylor check ends regions (region mode crest)."},
)


def add_train_flags(p: argparse.ArgumentParser) -> None:
    """The training run's flags (``crest train`` and ``crest demo``): ``--recipe``, one flag per selection setting
    (``LoaderConfig``'s fields, overriding the recipe's value when given), and the run's own."""
    p.add_argument(
        "--recipe",
        choices=tuple(RECIPES),
        default="recommended",
        help="the selection settings to start from (trainer_client.loader_config.RECIPES): recommended (the default, "
        "the clean task's measured best), long-tail, or released (the released CREST code's); the flags below "
        "override it",
    )
    p.add_argument("--steps", type=int, default=1000, help="optimizer steps (one coreset batch each); default 1000")
    p.add_argument("--lr", type=float, default=0.05, help="peak SGD learning rate, cosine-annealed; default 0.05")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum; default 0.9")
    add_flags(p, SELECTION_FLAGS, recipes=RECIPES)
    p.add_argument(
        "--data-dir",
        default=os.environ.get("CREST_DATA_DIR"),
        help="directory with the four Fashion-MNIST .gz files (default: $CREST_DATA_DIR, then "
        "/usr/share/datasets/fashion-mnist)",
    )
    p.add_argument("--train-limit", type=int, default=None, help="use only the first N training examples")
    p.add_argument("--test-limit", type=int, default=None, help="evaluate on only the first N test examples")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the trainer; default 1")
    p.add_argument("--log-every", type=int, default=100, help="log progress every N steps (0: never)")
    p.add_argument(
        "--device", default="auto", help="where the model trains: auto (cuda when available), cpu, cuda or cuda:N"
    )
    p.add_argument(
        "--dataloader-workers",
        type=int,
        default=0,
        help="DataLoader worker processes reading the batches (0: the training thread reads them); default 0",
    )
    p.add_argument(
        "--probe-examples",
        type=int,
        default=500,
        help="training examples held out as the probe set of --payoff measure/govern (not trained on); default 500",
    )


def loader_config(
    args: argparse.Namespace, flags: list[Flag], presets: dict[str, Any] | None = None, **fixed: Any
) -> LoaderConfig:
    """The ``LoaderConfig`` of ``args.recipe``, then ``presets`` ({dotted path: value}, a mode's own defaults such
    as a benchmark's ``--quick``), then the derived ``flags`` the command line gave, then ``fixed``.

    A region length of 0 (``--steps-per-round 0``) asks for CREST's Taylor check. Raises ``ValueError`` (the
    field's own validation) for a refused value.
    """
    overrides = {**(presets or {}), **given(args, flags)}
    steps = overrides.pop("region.steps_per_round", None)
    if steps is not None:
        overrides["region.mode"] = "crest" if steps == 0 else "fixed"
        if steps:
            overrides["region.steps_per_round"] = steps
    base = LoaderConfig.from_recipe(args.recipe)
    return replace(with_overrides(base, overrides), **fixed)


def add_commands(sub: Any) -> None:
    """Register ``train`` on ``sub`` (an ``add_subparsers`` result)."""
    train = sub.add_parser(
        "train",
        help="train the Fashion-MNIST CNN against a running service",
        description="Train a small CNN on Fashion-MNIST with CREST coresets from the service "
        "at --endpoint, then print test accuracy and cost.",
    )
    train.add_argument("--endpoint", default="127.0.0.1:50051", help="service address HOST:PORT")
    train.add_argument(
        "--token",
        default=None,
        help="bearer token for the service (default: $CREST_AUTH_TOKEN, read by the client)",
    )
    add_train_flags(train)


def train_config(args: argparse.Namespace) -> Any:
    """The ``TrainConfig`` of parsed ``add_train_flags`` flags."""
    from trainer_client.train import TrainConfig

    loader = loader_config(args, SELECTION_FLAGS, client_name=f"crest-{args.command}")
    return TrainConfig(
        steps=args.steps,
        lr=args.lr,
        momentum=args.momentum,
        loader=loader,
        seed=loader.seed,
        data_dir=args.data_dir,
        train_limit=args.train_limit,
        test_limit=args.test_limit,
        threads=args.threads,
        log_every=args.log_every,
        device=args.device,
        dataloader_workers=args.dataloader_workers,
        probe_examples=args.probe_examples,
    )


def run_train(args: argparse.Namespace, endpoint: str, token: str | None) -> int:
    """Train against the service at ``endpoint`` and print what the run achieved and cost."""
    from trainer_client import SelectionClient
    from trainer_client.train import train

    try:
        config = train_config(args)
    except ValueError as exc:  # a flag value the loader's settings refuse; the message names it and what was given
        raise SystemExit(f"crest {args.command}: {exc}") from None
    print(f"crest {args.command}: {config.loader.describe()}", flush=True)
    with SelectionClient(endpoint, token=token) as client:
        client.wait_ready(timeout_s=60)
        result = train(config, client)
    n = config.train_limit or 60000
    rows = [
        ("test accuracy", f"{result.test_accuracy:.4f}"),
        ("wall time", f"{result.wall_s:.1f} s"),
        ("optimizer steps", f"{result.steps}"),
        (
            "examples back-propagated",
            f"{result.examples_backpropagated:,} ({result.examples_backpropagated / n:.2f} epochs)",
        ),
        ("examples embedded (forward only)", f"{result.examples_embedded:,}"),
        ("selection rounds", f"{result.rounds}"),
        ("trainer wait for coresets", f"{result.wait_s:.2f} s ({100 * result.wait_s / result.wall_s:.1f}% of wall)"),
        ("embedding time", f"{result.embed_s:.2f} s"),
        ("Taylor checks / reselections", f"{result.checks} / {result.reselections}"),
        ("check time / quadratic-model time", f"{result.check_s:.2f} s / {result.fit_s:.2f} s"),
        ("uniform fallback batches (late rounds)", f"{result.fallback_batches} ({result.late_steps})"),
        ("service errors ridden out", f"{result.service_errors}"),
        ("of them on the service's side / partial rounds", f"{result.persistent_failures} / {result.partial_rounds}"),
    ]
    if result.payoff:
        rows += [
            ("payoff", result.payoff),
            ("control steps / probe time", f"{result.control_steps} / {result.probe_s:.2f} s"),
        ]
    width = max(len(k) for k, _ in rows)
    print(f"\nCREST on Fashion-MNIST via {endpoint}, {config.loader.describe()}")
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")
    return 0


def run(args: argparse.Namespace) -> int:
    """Run the parsed ``train`` command."""
    return run_train(args, args.endpoint, args.token)


def main(argv: list[str] | None = None) -> int:
    """``python -m trainer_client.cli train ...``: the trainer side alone."""
    # Before torch loads: OpenMP spin-waiting slows torch 10-70x next to other busy processes.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    parser = argparse.ArgumentParser(prog="crest", description="CREST trainer client: train against a service.")
    add_log_level(parser)
    add_commands(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    args = parser.parse_args(argv)
    setup_logging(args)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
