"""Frozen public surface: package exports, the CLI's commands and flags, and what each package imports."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

import selector_service
import trainer_client
from crest.cli import build_parser
from experiments import frontier, offload, staleness
from experiments.frontier import FRONTIER_CREST_FLAGS
from trainer_client import cli as trainer_cli
from trainer_client.flags import Flag

# The training flags `crest train` and `crest demo` had before the selection flags were derived from LoaderConfig's
# fields: each keeps its name (test_flags_from_before_the_derivation_keep_their_names).
TRAIN_FLAGS_BEFORE = [
    "--steps",
    "--lr",
    "--momentum",
    "--batch-size",
    "--subset-fraction",
    "--num-subsets",
    "--steps-per-round",
    "--lookahead-steps",
    "--tau",
    "--check-examples",
    "--embedding",
    "--similarity",
    "--coreset-weights",
    "--joint-selection",
    "--embed-dtype",
    "--embedding-max-age",
    "--learned-embedding-max-age",
    "--learned-embedding-loss",
    "--training-logits",
    "--seed",
    "--data-dir",
    "--train-limit",
    "--test-limit",
    "--threads",
    "--log-every",
]
FRONTIER_CREST_FLAGS_BEFORE = [
    "--crest-steps-per-round",
    "--crest-num-subsets",
    "--subset-fraction",
    "--drop-learned",
    "--no-drop-learned",
    "--drop-threshold",
    "--drop-window",
    "--min-pool-fraction",
    "--crest-weights",
    "--crest-joint-selection",
    "--crest-embed-dtype",
    "--crest-embedding",
    "--crest-embedding-dim",
    "--crest-embedding-max-age",
    "--crest-learned-embedding-max-age",
    "--crest-learned-embedding-loss",
    "--crest-training-logits",
    "--crest-fit-examples",
    "--crest-hessian-every",
]


def _derived(flags: list[Flag]) -> list[str]:
    """The option strings of derived flags, as argparse lists them (a bool's --no- form after each of its names)."""
    return [o for f in flags for n in f.names for o in ((n, f"--no-{n[2:]}") if f.kind is bool else (n,))]


# The training flags `crest train` and `crest demo` share (trainer_client.cli.add_train_flags), in parser order.
TRAIN_FLAGS = [
    "--recipe",
    "--steps",
    "--lr",
    "--momentum",
    *_derived(trainer_cli.SELECTION_FLAGS),
    "--data-dir",
    "--train-limit",
    "--test-limit",
    "--threads",
    "--log-every",
    "--device",
    "--dataloader-workers",
    "--probe-examples",
]

CLI_FLAGS = {
    "bench train": [
        "--quick",
        "--demo",
        "--seeds",
        "--steps",
        "--methods",
        "--recipe",
        "--crest-adaptive",
        "--drop-learned",
        "--no-drop-learned",
        "--prune",
        "--num-workers",
        "--dataset",
        "--data-dir",
        "--out",
        "--no-progress",
    ],
    "experiments.frontier": [
        "--quick",
        "--epochs",
        "--budgets",
        "--methods",
        "--seeds",
        "--first-seed",
        "--reference",
        "--no-e-run",
        "--baseline-threads",
        "--crest-threads",
        "--num-workers",
        "--cpus-per-worker",
        "--service-backend",
        "--eval",
        "--validation-size",
        "--prune",
        "--recipe",
        *_derived(FRONTIER_CREST_FLAGS),
        "--lr",
        "--momentum",
        "--dataset",
        "--data-dir",
        "--out",
        "--summary",
        "--no-progress",
    ],
    "bench facility-location": ["--quick", "--libraries", "--timeout", "--out", "--sizes", "--crest-repeats"],
    "bench workload": ["--repeats", "--timeout"],
    "bench service": ["--quick", "--rounds", "--out"],
    "bench integrations": ["--quick", "--steps", "--blocks", "--frameworks", "--out"],
    "bench dataloading": ["--quick", "--repeats", "--steps", "--workers", "--out"],
    "experiments.staleness": [
        "--quick",
        "--ages",
        "--steps",
        "--every",
        "--subset-fraction",
        "--dataset",
        "--data-dir",
        "--out",
    ],
    "experiments.offload": [
        "--quick",
        "--candidates",
        "--steps-per-round",
        "--rounds",
        "--repetitions",
        "--dataset",
        "--data-dir",
        "--out",
    ],
    "inspect": ["--state-dir", "--session", "--step", "--export"],
    "serve": [
        "--host",
        "--port",
        "--grpc-threads",
        "--auth-token",
        "--tls-cert",
        "--tls-key",
        "--tls-client-ca",
        "--metrics-port",
        "--state-dir",
        "--backend",
        "--ray-address",
        "--num-workers",
        "--cpus-per-worker",
        "--gpus-per-worker",
    ],
    "train": ["--endpoint", "--token", *TRAIN_FLAGS],
    "demo": ["--backend", "--ray-address", "--num-workers", "--cpus-per-worker", "--gpus-per-worker", *TRAIN_FLAGS],
}


def test_package_exports_are_frozen() -> None:
    assert sorted(selector_service.__all__) == [
        "AlreadyExists",
        "Coreset",
        "FailedPrecondition",
        "InProcessSelection",
        "InvalidArgument",
        "MinibatchCoreset",
        "MissingExtra",
        "NotFound",
        "ResourceExhausted",
        "SelectionError",
        "SelectorFailure",
        "facility_location",
        "minibatch_coreset",
        "minibatch_coresets",
        "select_coreset",
        "select_coresets",
    ]
    assert sorted(trainer_client.__all__) == [
        "CheckResult",
        "CoresetLoader",
        "Embedder",
        "LoaderConfig",
        "LoaderStats",
        "QuadraticFit",
        "RegionConfig",
        "RegionController",
        "RoundDifficulty",
        "RoundPlan",
        "SelectionClient",
        "SelectionService",
        "SelectionUnavailable",
        "SessionInfo",
        "WeightedBatch",
        "default_forward",
        "last_layer_gradient",
        "logit_gradient",
        "per_example_loss",
        "random_projection",
        "weighted_loss",
    ]


def _commands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


# The research harnesses (experiments/, not installed): their flags are frozen too, since committed results record
# their command lines.
EXPERIMENTS = {"experiments.frontier": frontier, "experiments.staleness": staleness, "experiments.offload": offload}


def _subparser(path: str) -> argparse.ArgumentParser:
    """The parser of ``crest PATH`` ("serve", "bench train", ...), or of an experiment ("experiments.frontier")."""
    if path in EXPERIMENTS:
        return EXPERIMENTS[path].build_parser()
    parser = build_parser()
    for name in path.split():
        parser = _commands(parser)[name]
    return parser


def test_cli_commands_are_frozen() -> None:
    assert sorted(_commands(build_parser())) == ["bench", "demo", "inspect", "serve", "train"]
    assert sorted(_commands(_subparser("bench"))) == [
        "dataloading",
        "facility-location",
        "integrations",
        "service",
        "train",
        "workload",
    ]


@pytest.mark.parametrize("command", sorted(CLI_FLAGS))
def test_cli_flags_are_frozen_and_documented(command: str) -> None:
    sub = _subparser(command)
    flags = [opt for a in sub._actions for opt in a.option_strings if opt.startswith("--") and opt != "--help"]
    assert flags == CLI_FLAGS[command]
    assert all(a.help for a in sub._actions), "every flag needs help text"


@pytest.mark.parametrize(
    ("command", "before"),
    [
        ("train", TRAIN_FLAGS_BEFORE),
        ("demo", TRAIN_FLAGS_BEFORE),
        ("experiments.frontier", FRONTIER_CREST_FLAGS_BEFORE),
    ],
)
def test_flags_from_before_the_derivation_keep_their_names(command: str, before: list[str]) -> None:
    assert set(before) <= set(CLI_FLAGS[command])


def test_cli_help_runs() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "selector_service.cli", "serve", "--help"], capture_output=True, text=True, check=True
    )
    assert "--ray-address" in out.stdout
    bench = subprocess.run(
        [sys.executable, "-m", "crest_bench.cli", "bench", "train", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "--dataset" in bench.stdout


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        ("trainer_client", ["faiss", "ray"]),
        ("selector_service", ["ray", "torch", "grpc", "faiss"]),
    ],
)
def test_imports_stay_light(package: str, forbidden: list[str]) -> None:
    code = f"import sys, {package}; print([m for m in {forbidden!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", f"importing {package} loaded {out.stdout.strip()}"
