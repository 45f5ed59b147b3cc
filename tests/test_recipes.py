"""The named recipes against the committed results they come from, the settings surface derived from the config
dataclasses, and the ``crest`` composition root."""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import pytest

from crest.cli import build_parser
from experiments import frontier
from experiments.frontier import FRONTIER_CREST_FLAGS
from trainer_client import LoaderConfig, RegionConfig
from trainer_client import cli as trainer_cli
from trainer_client.flags import add_flags, config_flags, given, with_overrides
from trainer_client.loader_config import EVIDENCE, RECIPES, cpu_has_bfloat16, embed_dtype_for

ROOT = Path(__file__).resolve().parents[1]

# What `crest bench frontier` meant by a CREST setting its command line left out when the committed runs were made
# (the benchmark's defaults then), as overrides of the released recipe. Each committed summary records the
# resolved settings too (protocol.bench), which _recorded() reads.
FRONTIER_DEFAULTS_THEN = {
    "region": RegionConfig(mode="fixed", steps_per_round=50),
    "drop_learned": True,
    "lookahead_steps": 4,
}


def _summary(recipe: str) -> dict:
    return json.loads((ROOT / EVIDENCE[recipe]).read_text())


def _frontier_args(command: str) -> argparse.Namespace:
    words = shlex.split(command)
    # Committed before the harness moved to experiments/, its command lines name ``crest bench frontier``.
    start = (
        3
        if words[:3] == ["crest", "bench", "frontier"]
        else 3
        if words[:3] == ["python", "-m", "experiments.frontier"]
        else None
    )
    assert start is not None, command
    return frontier.build_parser().parse_args(words[start:])


def _recorded(bench: dict, embed_dtype: str) -> LoaderConfig:
    """The CREST settings a summary's protocol.bench records, as a LoaderConfig (0 meant the wire's default)."""
    defaults = LoaderConfig()
    steps = bench["steps_per_round"]
    return LoaderConfig.from_recipe(
        "released",
        batch_size=bench["batch_size"],
        subset_fraction=bench["subset_fraction"],
        num_subsets=bench["num_subsets"],
        region=RegionConfig(mode="fixed", steps_per_round=steps) if steps else RegionConfig(),
        lookahead_steps=4,
        fit_examples=bench["fit_examples"],
        coreset_weights=bench["crest_weights"],
        drop_learned=bench["drop_learned"],
        drop_threshold=bench["drop_threshold"] or defaults.drop_threshold,
        drop_window=bench["drop_window"] or defaults.drop_window,
        min_pool_fraction=bench["min_pool_fraction"] or defaults.min_pool_fraction,
        joint_selection=bench["crest_joint_selection"],
        embed_dtype=embed_dtype,
        embedding=bench["crest_embedding"],
        embedding_dim=bench["crest_embedding_dim"],
        embedding_max_age=bench["crest_embedding_max_age"],
        learned_embedding_max_age=bench["crest_learned_embedding_max_age"],
        learned_embedding_loss=bench["crest_learned_embedding_loss"],
        training_logits=bench.get("crest_training_logits", False),
    )


@pytest.mark.parametrize("name", ["recommended", "long-tail"])
def test_a_tuned_recipe_holds_exactly_the_settings_of_its_committed_frontier(name: str) -> None:
    summary = _summary(name)
    recipe = RECIPES[name]
    # "auto" chose what the committed runs used on their CPU: bfloat16 on a CPU with bfloat16 instructions.
    assert recipe.embed_dtype == "auto" and summary["protocol"]["bench"]["crest_embed_dtype"] == "bfloat16"
    flags = summary["machine"].get("cpu_flags")
    if flags is not None:  # recorded since the tenth round
        assert {"avx512_bf16", "amx_bf16"} & set(flags)
    as_run = replace(recipe, embed_dtype="bfloat16")
    # The command line, read with today's parser over the benchmark's defaults of the day ...
    args = _frontier_args(summary["command"])
    then = LoaderConfig.from_recipe("released", **FRONTIER_DEFAULTS_THEN)
    from_command = trainer_cli.loader_config(
        argparse.Namespace(**{**vars(args), "recipe": "released"}), FRONTIER_CREST_FLAGS
    )
    rebuilt = with_overrides(then, from_command.overrides())
    assert replace(rebuilt, recipe=name) == as_run
    # ... and the resolved settings the summary recorded.
    assert replace(_recorded(summary["protocol"]["bench"], "bfloat16"), recipe=name) == as_run
    # The same command read over the recipe itself changes nothing: every setting it names is the recipe's.
    assert trainer_cli.loader_config(argparse.Namespace(**{**vars(args), "recipe": name}), FRONTIER_CREST_FLAGS) == (
        replace(recipe, embed_dtype="bfloat16")
    )
    # The other summary of the same settings (the second CPU) agrees.
    twin = json.loads((ROOT / EVIDENCE[name].replace(".json", "_epyc.json")).read_text())
    assert replace(_recorded(twin["protocol"]["bench"], "bfloat16"), recipe=name) == as_run


def test_the_default_is_the_recommended_recipe_and_recipes_take_overrides() -> None:
    assert LoaderConfig() == RECIPES["recommended"] and LoaderConfig().describe() == "recipe recommended"
    released = LoaderConfig.from_recipe("released", batch_size=256)
    assert (released.recipe, released.batch_size, released.region.mode) == ("released", 256, "crest")
    assert released.describe() == "recipe released (overrides: batch_size=256)"
    tau = LoaderConfig.from_recipe("released", region=RegionConfig(tau=0.2))
    assert tau.overrides() == {"region.tau": 0.2}
    with pytest.raises(ValueError, match="unknown recipe 'fast'; the recipes are recommended, long-tail, released"):
        LoaderConfig.from_recipe("fast")
    with pytest.raises(ValueError, match=r"LoaderConfig has no settings \['steps_per_round'\]"):
        LoaderConfig.from_recipe("recommended", steps_per_round=20)
    with pytest.raises(ValueError, match="coreset_weights must be one of cluster, uniform, received 'equal'"):
        LoaderConfig.from_recipe("recommended", coreset_weights="equal")


def test_the_embedding_dtype_rule() -> None:
    import torch

    expected = "bfloat16" if cpu_has_bfloat16() else "float32"
    assert embed_dtype_for(torch.device("cpu")) == expected
    assert embed_dtype_for(torch.device("meta")) == "float32"


# -- the derivation -------------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class _Inner:
    # How far, in steps.
    reach: int = 3


@dataclass(frozen=True, kw_only=True)
class _Settings:
    # The first setting, in percent: 5% of it.
    alpha: float = 0.5
    # A switch.
    on: bool = False
    # One of two kinds.
    kind: Literal["a", "b"] = "a"
    inner: _Inner = field(default_factory=_Inner)


def test_a_field_becomes_a_flag_with_its_comment_as_help_and_no_other_edit() -> None:
    flags = config_flags(_Settings, prefix="x-", aliases={"inner.reach": ("--reach",)})
    assert [(f.path, f.names) for f in flags] == [
        ("alpha", ("--x-alpha",)),
        ("on", ("--x-on",)),
        ("kind", ("--x-kind",)),
        ("inner.reach", ("--x-inner-reach", "--reach")),
    ]
    parser = argparse.ArgumentParser()
    add_flags(parser, flags)
    text = parser.format_help()
    assert "The first setting, in percent: 5% of it." in text and "A switch." in text and "How far, in steps." in text
    args = parser.parse_args(["--x-alpha", "0.25", "--no-x-on", "--reach", "7"])
    overrides = given(args, flags)
    assert overrides == {"alpha": 0.25, "on": False, "inner.reach": 7}  # what is not given stays out
    assert with_overrides(_Settings(), overrides) == _Settings(alpha=0.25, inner=_Inner(reach=7))
    with pytest.raises(SystemExit):
        parser.parse_args(["--x-kind", "c"])


def test_loader_config_fields_reach_every_parser_with_their_help() -> None:
    """Every LoaderConfig and RegionConfig field is a flag of crest train, crest demo and the frontier."""
    import dataclasses

    paths = {f.name for f in dataclasses.fields(LoaderConfig)} - {"region", "recipe", "client_name", "weights_key"}
    paths |= {f"region.{f.name}" for f in dataclasses.fields(RegionConfig)} - {"region.seed"}
    assert {f.path for f in trainer_cli.SELECTION_FLAGS} == paths
    assert {f.path for f in FRONTIER_CREST_FLAGS} == paths - {"batch_size", "seed"}
    root = build_parser()
    sub = next(a for a in root._actions if isinstance(a, argparse._SubParsersAction)).choices
    for command in ("train", "demo"):
        text = sub[command].format_help()
        assert "--embedding-max-age" in text and "Reuse a candidate's embedding" in text
        assert "[recommended 60, long-tail 0, released 0]" in " ".join(text.split())


def test_a_refused_flag_value_stops_with_one_line(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "crest.cli", "train", "--endpoint", "127.0.0.1:1", "--subset-fraction", "2"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode != 0
    assert run.stderr.strip().splitlines()[-1] == "crest train: subset_fraction must be in (0, 1], received 2.0"


# -- the composition root -------------------------------------------------------------------------------------------


def test_crest_serve_loads_the_service_side_alone() -> None:
    code = (
        "import sys; from crest import cli; p = cli.build_parser(('serve',)); p.parse_args(['serve', '--port', '0']); "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'crest_bench', 'trainer_client'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]"


def test_every_command_names_a_module_that_registers_and_runs_it() -> None:
    import importlib

    from crest.cli import COMMANDS

    for command, (module_name, _) in COMMANDS.items():
        module = importlib.import_module(module_name)
        assert callable(module.add_commands) and callable(module.run), module_name
        assert command in module.COMMANDS, (command, module_name)


def test_the_wire_settings_are_one_type_with_the_contracts_defaults() -> None:
    from crest.selector.v1 import selector_pb2 as pb
    from crest.selector.v1.settings import SelectionSettings
    from selector_service.session import SessionConfig

    assert SelectionSettings.from_proto(pb.CrestConfig()) == SelectionSettings()  # a zero field: the default
    assert SessionConfig().settings() == SelectionSettings()  # the service's defaults are the wire's
    sent = LoaderConfig().wire_settings(embedding_dim=10)
    assert (sent.subset_fraction, sent.num_subsets, sent.drop_learned, sent.joint_selection) == (0.005, 10, True, True)
    assert SelectionSettings.from_proto(sent.to_proto()) == sent
    assert SessionConfig.from_settings(sent).settings() == sent
