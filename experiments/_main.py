"""The entry point every harness shares: ``python -m experiments.<name> [flags]``."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable


def run_main(
    build_parser: Callable[[], argparse.ArgumentParser],
    run: Callable[[argparse.Namespace], int],
    argv: list[str] | None,
) -> int:
    """Parse ``argv`` (None: the command line) with ``build_parser()``, keep it as ``args.argv`` for the results'
    record, and run."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    return run(args)
