"""The training benchmark's pieces, in process: presets, the dataset hook, the progress line, the trend verdict."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest

from crest.cli import build_parser
from crest_bench._progress import Progress
from crest_bench.train import plan
from crest_bench.train_data import fashion_mnist, fetch, load_data, load_hook, materialize
from crest_bench.train_report import difficulty_trend, trend
from trainer_client import LoaderConfig

SYNTHETIC = str(Path(__file__).with_name("bench_synthetic.py")) + ":load"


def _args(*flags: str) -> object:
    return build_parser().parse_args(["bench", "train", *flags])


def test_presets_and_explicit_flags() -> None:
    config, methods, seeds, out = plan(_args())  # type: ignore[arg-type]
    assert (config.steps, config.train_limit, methods, seeds, out) == (
        1000,
        None,
        ("full", "random", "crest", "infobatch"),
        3,
        Path("results/train.json"),
    )
    assert config.crest == LoaderConfig()  # the recommended recipe
    config, methods, seeds, out = plan(_args("--demo"))  # type: ignore[arg-type]
    assert (config.steps, methods, seeds, out) == (1000, ("full", "crest"), 1, Path("results/demo.json"))
    assert config.crest == LoaderConfig() and config.crest.describe() == "recipe recommended"
    adaptive = plan(_args("--demo", "--crest-adaptive"))[0].crest  # type: ignore[arg-type]
    assert adaptive.region.mode == "crest" and adaptive.overrides() == {"region.mode": "crest"}
    released = plan(_args("--recipe", "released"))[0].crest  # type: ignore[arg-type]
    assert released == LoaderConfig.from_recipe("released") and not released.drop_learned
    config, methods, seeds, _ = plan(_args("--quick", "--steps", "30", "--seeds", "2", "--no-drop-learned"))  # type: ignore[arg-type]
    assert (config.steps, config.train_limit, config.crest.subset_fraction, seeds) == (30, 6000, 0.1, 2)
    assert config.crest.overrides() == {"subset_fraction": 0.1, "drop_learned": False}
    with pytest.raises(ValueError, match="keep 'full'"):
        plan(_args("--methods", "crest,random"))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown methods"):
        plan(_args("--methods", "full,craig"))  # type: ignore[arg-type]


def test_dataset_hook_by_module_and_by_file() -> None:
    assert load_hook("crest_bench.train_data:fashion_mnist") is fashion_mnist
    data = load_data(SYNTHETIC, None, train_limit=1000, test_limit=200)
    assert (len(data.train), len(data.test), data.num_classes) == (1000, 200, 3)  # type: ignore[arg-type]
    assert data.train_labels is not None and data.train_labels.dtype == np.int64
    assert [int(data.train[i][1]) for i in range(5)] == data.train_labels[:5].tolist()  # read through train[i]
    x, y = fetch(data.train, np.array([3, 1, 4]))
    assert x.shape == (3, 16) and y.tolist() == data.train_labels[[3, 1, 4]].tolist()
    tx, ty = materialize(data.test, chunk=64)
    assert tx.shape == (200, 16) and len(ty) == 200
    assert data.model()(x).shape == (3, 3)


@pytest.mark.parametrize(
    ("spec", "error"),
    [
        ("crest_bench.train_data", "MODULE:FUNCTION"),
        ("crest_bench.train_data:nothing", "no function 'nothing'"),
        ("missing_file.py:load", "no file"),
    ],
)
def test_bad_dataset_hooks_say_what_was_received(spec: str, error: str) -> None:
    with pytest.raises((ValueError, FileNotFoundError), match=error):
        load_hook(spec)


def test_progress_draws_on_a_terminal_only() -> None:
    out = io.StringIO()
    bar = Progress("seed 0 full", 10, stream=out, enabled=True, interval_s=0.0, width=10)
    for step in range(1, 11):
        bar.update(step, "acc 0.500")
    drawn = out.getvalue()
    assert drawn.count("\r") == 10 and "\n" not in drawn
    assert drawn.rsplit("\r", 1)[1].startswith("seed 0 full [##########] 10/10")
    bar.close()
    assert out.getvalue().endswith("\r") and out.getvalue().rsplit("\r", 2)[1].strip() == ""
    quiet = io.StringIO()  # not a terminal: nothing by default
    bar = Progress("seed 0 full", 10, stream=quiet)
    bar.update(10)
    bar.close()
    assert quiet.getvalue() == ""


def test_trend_and_the_difficulty_verdict() -> None:
    t = trend(
        [0, 100, 200, 300, 400, 500, 600, 700, 800, 900], [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9], 1000
    )
    assert t["slope_per_1k_steps"] == pytest.approx(1.0)
    assert t["first_third"] == pytest.approx(0.15) and t["last_third"] == pytest.approx(0.8)

    def rounds(percentiles: list[float]) -> list[dict[str, float]]:
        return [
            {"step": 100.0 * i, "selected_percentile": p, "selected_loss": 1 + p, "embedded_loss": 1.5}
            for i, p in enumerate(percentiles)
        ]

    rising = difficulty_trend(rounds([0.5, 0.52, 0.55, 0.6, 0.62, 0.66, 0.7, 0.71, 0.75, 0.8]), 1000)
    assert rising["increases"] is True and (rising["rounds"], rising["rounds_used"]) == (10, 9)
    assert rising["loss_ratio"]["last_third"] > rising["loss_ratio"]["first_third"]
    flat = difficulty_trend(rounds([0.6, 0.5] * 5), 1000)
    assert flat["increases"] is False
    # The untrained model's round (step 0) does not count: a jump from it to a flat level is no rise.
    assert difficulty_trend(rounds([0.1] + [0.7] * 9), 1000)["increases"] is False
    assert difficulty_trend(rounds([0.5, 0.6]), 1000)["increases"] is None  # one usable round: no trend
