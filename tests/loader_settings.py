"""The loader settings most mechanism tests were written against: the ``released`` recipe with the loader's
4-step lookahead. ``steps_per_round=N`` gives fixed N-step regions (``RegionConfig(mode="fixed")``), as the
``--steps-per-round`` flag does. Tests of the recommended defaults build ``LoaderConfig()`` themselves.
"""

from __future__ import annotations

from typing import Any

from trainer_client import LoaderConfig, RegionConfig


def loader_settings(*, steps_per_round: int | None = None, **overrides: Any) -> LoaderConfig:
    """``LoaderConfig.from_recipe("released", lookahead_steps=4, **overrides)``, with fixed regions when
    ``steps_per_round`` is given."""
    if steps_per_round is not None:
        overrides["region"] = RegionConfig(mode="fixed", steps_per_round=steps_per_round)
    return LoaderConfig.from_recipe("released", **{"lookahead_steps": 4, **overrides})
