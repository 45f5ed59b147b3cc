"""``crest demo``: start a local service (embedded Ray), train the Fashion-MNIST CNN through it over gRPC, print
what the run achieved and cost, stop the service. It trains with the ``recommended`` recipe unless ``--recipe``
or the selection flags say otherwise (``crest train``'s flags, ``trainer_client.cli``), and prints the recipe.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

from selector_service import cli as service_cli
from trainer_client import cli as trainer_cli

COMMANDS = ("demo",)


def add_commands(sub: Any) -> None:
    """Register ``demo`` on ``sub`` (an ``add_subparsers`` result)."""
    demo = sub.add_parser(
        "demo",
        help="start a local service and train against it",
        description="Start the service on localhost (embedded Ray), train the Fashion-MNIST CNN through it over "
        "gRPC with the recommended recipe (or --recipe), print the results, stop the service.",
    )
    service_cli.add_selector_flags(demo)
    trainer_cli.add_train_flags(demo)


def run(args: argparse.Namespace) -> int:
    """Run the parsed ``demo`` command."""
    from selector_service.process import spawn_service

    with spawn_service(service_cli.selector_serve_args(args), log_level=args.log_level) as service:
        logging.getLogger("crest").info("service ready at %s (pid %d)", service.target, service.proc.pid)
        return trainer_cli.run_train(args, service.target, None)
