"""The trainer side's command: ``crest train`` (the Fashion-MNIST CNN against a running service).

``add_commands`` registers it on the ``crest`` parser (``crest_bench.cli`` composes every side's commands);
``python -m trainer_client.cli train ...`` runs it without the service side installed. ``add_train_flags``,
``train_config`` and ``run_train`` are shared with ``crest demo``. Environment read here: CREST_AUTH_TOKEN
(``--token``) and CREST_DATA_DIR (``--data-dir``). Never imports faiss or Ray.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

from crest.selector.v1 import codec

COMMANDS = ("train",)


def add_train_flags(p: argparse.ArgumentParser, steps_per_round: int | None = None) -> None:
    """The training run's flags (``crest train`` and ``crest demo``); ``steps_per_round`` is the default of
    ``--steps-per-round`` (None: CREST's Taylor check)."""
    p.add_argument("--steps", type=int, default=1000, help="optimizer steps (one coreset batch each); default 1000")
    p.add_argument("--lr", type=float, default=0.05, help="peak SGD learning rate, cosine-annealed; default 0.05")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum; default 0.9")
    p.add_argument(
        "--batch-size",
        type=int,
        default=codec.DEFAULT_BATCH_SIZE,
        help=f"coreset size m = training batch size; default {codec.DEFAULT_BATCH_SIZE}",
    )
    p.add_argument(
        "--subset-fraction",
        type=float,
        default=codec.DEFAULT_SUBSET_FRACTION,
        help=f"random-subset size r as a fraction of the dataset; default {codec.DEFAULT_SUBSET_FRACTION} (CREST)",
    )
    p.add_argument(
        "--num-subsets",
        type=int,
        default=codec.DEFAULT_NUM_SUBSETS,
        help=f"random subsets (coresets) per round P; default {codec.DEFAULT_NUM_SUBSETS}",
    )
    p.add_argument(
        "--steps-per-round",
        type=int,
        default=steps_per_round,
        help="use the fixed rule: every region lasts this many steps "
        + (
            f"(default {steps_per_round}; 0: CREST's Taylor check decides)"
            if steps_per_round
            else "(default: CREST's Taylor check decides)"
        ),
    )
    p.add_argument(
        "--lookahead-steps",
        type=int,
        default=4,
        help="steps between asking for the next round and switching to it; default 4",
    )
    p.add_argument(
        "--tau",
        type=float,
        default=0.1,
        help="CREST check threshold: reselect when the quadratic model is off by more than tau x loss; default 0.1",
    )
    p.add_argument(
        "--check-examples",
        type=int,
        default=256,
        help="random-subset ids the check evaluates (a fixed sample per round; 0: all, as CREST); default 256",
    )
    p.add_argument(
        "--embedding",
        choices=sorted(codec.EMBEDDING_KINDS, key=codec.EMBEDDING_KINDS.__getitem__),
        default=codec.DEFAULT_EMBEDDING_KIND,
        help="selection feature: softmax(z) - onehot(y) (default) or its outer product with the last features",
    )
    p.add_argument(
        "--similarity",
        choices=sorted(codec.SIMILARITIES, key=codec.SIMILARITIES.__getitem__),
        default=codec.DEFAULT_SIMILARITY,
        help="facility-location kernel: exp(-dist/d) as in CREST, or max-dist minus dist as in CRAIG",
    )
    p.add_argument(
        "--coreset-weights",
        choices=("cluster", "uniform"),
        default="cluster",
        help="loss weight of a coreset example: its cluster size (default, as CREST) or 1 (the frontier's tuning)",
    )
    p.add_argument(
        "--joint-selection",
        action="store_true",
        help="select each coreset over its whole random subset instead of per class (the frontier's tuning)",
    )
    p.add_argument(
        "--embed-dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="precision of the no-grad embedding pass; bfloat16 is cheaper on CPUs with AVX512-BF16/AMX and GPUs",
    )
    p.add_argument(
        "--embedding-max-age",
        type=int,
        default=0,
        help="reuse a candidate's embedding while at most this many steps old (0: embed afresh, as CREST)",
    )
    p.add_argument(
        "--learned-embedding-max-age",
        type=int,
        default=0,
        help="a longer reuse age for the embeddings of examples the model had learned (0: none)",
    )
    p.add_argument(
        "--learned-embedding-loss",
        type=float,
        default=0.05,
        help="loss in nats at or below which an embedded example counts as learned; default 0.05",
    )
    p.add_argument(
        "--training-logits",
        action="store_true",
        help="refresh the stored embeddings of trained examples from the training steps' logits (needs a max age)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of model init, subset sampling and shuffling")
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
        default=os.environ.get("CREST_AUTH_TOKEN"),
        help="bearer token for the service (default: $CREST_AUTH_TOKEN)",
    )
    add_train_flags(train)


def train_config(args: argparse.Namespace) -> Any:
    """The ``TrainConfig`` of parsed ``add_train_flags`` flags."""
    from trainer_client import LoaderConfig, RegionConfig
    from trainer_client.train import TrainConfig

    loader = LoaderConfig(
        batch_size=args.batch_size,
        subset_fraction=args.subset_fraction,
        num_subsets=args.num_subsets,
        similarity=args.similarity,
        seed=args.seed,
        steps_per_round=args.steps_per_round or None,
        lookahead_steps=args.lookahead_steps,
        region=RegionConfig(tau=args.tau),
        check_examples=args.check_examples,
        embedding=args.embedding,
        coreset_weights=args.coreset_weights,
        joint_selection=args.joint_selection,
        embed_dtype=args.embed_dtype,
        embedding_max_age=args.embedding_max_age,
        learned_embedding_max_age=args.learned_embedding_max_age,
        learned_embedding_loss=args.learned_embedding_loss,
        training_logits=args.training_logits,
        client_name=f"crest-{args.command}",
    )
    return TrainConfig(
        steps=args.steps,
        lr=args.lr,
        momentum=args.momentum,
        loader=loader,
        seed=args.seed,
        data_dir=args.data_dir,
        train_limit=args.train_limit,
        test_limit=args.test_limit,
        threads=args.threads,
        log_every=args.log_every,
    )


def run_train(args: argparse.Namespace, endpoint: str, token: str | None) -> int:
    """Train against the service at ``endpoint`` and print what the run achieved and cost."""
    from trainer_client import SelectionClient
    from trainer_client.train import train

    try:
        config = train_config(args)
    except ValueError as exc:  # a flag value the loader's settings refuse; the message names it and what was given
        raise SystemExit(f"crest {args.command}: {exc}") from None
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
    width = max(len(k) for k, _ in rows)
    print(f"\nCREST on Fashion-MNIST via {endpoint}")
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
    parser.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="logging verbosity"
    )
    add_commands(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
