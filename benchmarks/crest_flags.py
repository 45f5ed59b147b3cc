"""CREST's selection flags of the benchmarks: ``LoaderConfig``'s fields (``trainer_client.flags``) and ``--recipe``.

Kept apart from ``cli.py`` so that the benchmark that reads them (``frontier``) does not import the parser module
that imports it.
"""

from __future__ import annotations

import argparse

from trainer_client.flags import config_flags
from trainer_client.loader_config import RECIPES, LoaderConfig

# bench frontier's CREST flags: every LoaderConfig field as --crest-<field>, but those the benchmark sets itself (the
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


def add_recipe_flag(p: argparse.ArgumentParser, what: str) -> None:
    """``--recipe``: the selection settings CREST starts from (``trainer_client.loader_config.RECIPES``)."""
    p.add_argument(
        "--recipe",
        choices=tuple(RECIPES),
        default="recommended",
        help=f"{what}: recommended (the default, the clean task's measured best), long-tail, or released (the "
        "released CREST code's settings); the CREST flags override it",
    )
