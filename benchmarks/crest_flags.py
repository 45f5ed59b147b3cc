"""``--recipe``, the flag of the benchmarks (and of the experiments' frontier) that picks CREST's settings.

Kept apart from ``cli.py`` so that a harness that reads it does not import the parser module of ``crest bench``.
"""

from __future__ import annotations

import argparse

from trainer_client.loader_config import RECIPES


def add_recipe_flag(p: argparse.ArgumentParser, what: str) -> None:
    """``--recipe``: the selection settings CREST starts from (``trainer_client.loader_config.RECIPES``)."""
    p.add_argument(
        "--recipe",
        choices=tuple(RECIPES),
        default="recommended",
        help=f"{what}: recommended (the default, the clean task's measured best), long-tail, or released (the "
        "released CREST code's settings); the CREST flags override it",
    )
