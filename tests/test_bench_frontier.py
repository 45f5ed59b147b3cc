"""The budget frontier: its scoring on hand-made runs (fast), its flags, and ``crest bench frontier --quick`` end to
end (slow: a real service subprocess, real training on Fashion-MNIST)."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from crest_bench import cli
from crest_bench.train_methods import DEFAULT_METHODS, METHODS
from experiments.frontier import build_parser, plan, schedule
from experiments.frontier_report import (
    FrontierRun,
    accuracy_at,
    budget_steps,
    envelope,
    paired,
    summarize,
    time_to,
)
from experiments.frontier_tables import markdown
from trainer_client import LoaderConfig

ROOT = Path(__file__).resolve().parents[1]


def _args(*flags: str) -> Any:
    return build_parser().parse_args(list(flags))


# -- the scoring, on hand-made runs ------------------------------------------------------------------------------


def test_budget_steps() -> None:
    assert budget_steps(0.3, 10, 60_000, 128) == 1406  # round(1406.25)
    assert budget_steps(0.05, 10, 60_000, 128) == 234
    assert budget_steps(0.25, 2, 6000, 128) == 23
    assert budget_steps(1e-6, 1, 10, 128) == 1  # never 0 steps


def test_envelope_is_the_upper_envelope() -> None:
    points = [
        {"time_s": 3.0, "accuracy": 0.80},
        {"time_s": 1.0, "accuracy": 0.70},
        {"time_s": 2.0, "accuracy": 0.65},  # slower and worse than the 1 s point: off the envelope
        {"time_s": 4.0, "accuracy": 0.80},  # ties the 3 s point later: off
        {"time_s": 5.0, "accuracy": 0.85},
        {"time_s": 1.0, "accuracy": 0.60},  # same time, worse
    ]
    front = envelope(points)
    assert [(p["time_s"], p["accuracy"]) for p in front] == [(1.0, 0.70), (3.0, 0.80), (5.0, 0.85)]
    # Oracle: a point is on it iff no other point is at least as fast and at least as accurate (and not equal).
    oracle = [
        p
        for p in points
        if not any(q is not p and q["time_s"] <= p["time_s"] and q["accuracy"] >= p["accuracy"] for q in points)
    ]
    assert sorted((p["time_s"], p["accuracy"]) for p in oracle) == [(p["time_s"], p["accuracy"]) for p in front]
    assert envelope([]) == []
    by_steps = envelope([{"steps": 10, "accuracy": 0.5}, {"steps": 5, "accuracy": 0.6}], x="steps")
    assert by_steps == [{"steps": 5, "accuracy": 0.6}]


def test_interpolation_on_the_frontier() -> None:
    front = [{"time_s": 10.0, "accuracy": 0.80}, {"time_s": 20.0, "accuracy": 0.90}, {"time_s": 40.0, "accuracy": 0.92}]
    assert accuracy_at(front, 5.0) is None  # before the first run: nothing reached yet
    assert accuracy_at(front, 10.0) == pytest.approx(0.80)
    assert accuracy_at(front, 15.0) == pytest.approx(0.85)
    assert accuracy_at(front, 30.0) == pytest.approx(0.91)
    assert accuracy_at(front, 100.0) == pytest.approx(0.92)  # the best reached at or before
    assert time_to(front, 0.70) == 10.0  # the first run already does
    assert time_to(front, 0.85) == pytest.approx(15.0)
    assert time_to(front, 0.91) == pytest.approx(30.0)
    assert time_to(front, 0.93) is None  # never
    for target in (0.8, 0.83, 0.9, 0.915, 0.92):
        t = time_to(front, target)
        assert t is not None and accuracy_at(front, t) == pytest.approx(target)
    assert accuracy_at([], 1.0) is None and time_to([], 0.5) is None


def test_paired_differences_use_matching_seeds() -> None:
    p = paired({0: 0.91, 1: 0.92, 2: 0.93, 5: 0.5}, {0: 0.90, 1: 0.90, 2: 0.90, 7: 0.1})
    assert p["seeds"] == [0, 1, 2] and p["n"] == 3
    assert p["diffs"] == pytest.approx([0.01, 0.02, 0.03])
    assert p["mean"] == pytest.approx(0.02) and p["sd"] == pytest.approx(0.01)
    assert p["verdict"] == "above"
    assert paired({0: 0.1, 1: 0.3}, {0: 0.2, 1: 0.2})["verdict"] == "within"  # diffs -0.1, +0.1
    assert paired({0: 0.80, 1: 0.81}, {0: 0.90, 1: 0.90})["verdict"] == "below"
    one = paired({0: 0.9}, {0: 0.8})
    assert one["sd"] is None and one["verdict"] is None and one["mean"] == pytest.approx(0.1)


def _hand_made() -> list[FrontierRun]:
    """3 seeds x budgets 0.2 / 0.5 of full, random and crest, and the reference at E and 2E."""
    acc = {"full": (0.80, 0.86), "random": (0.79, 0.85), "crest": (0.82, 0.87)}
    wall = {"full": (10.0, 25.0), "random": (10.0, 25.0), "crest": (15.0, 35.0)}
    runs = []
    for seed, (method, accs), i in itertools.product(range(3), acc.items(), range(2)):
        jitter = 0.001 * seed * (1 if method == "crest" else -1)
        runs.append(
            FrontierRun(
                method=method,
                seed=seed,
                budget=(0.2, 0.5)[i],
                steps=(100, 250)[i],
                wall_s=wall[method][i],
                accuracy=accs[i] + jitter,
                torch_threads=1 if method == "crest" else 2,
                cost={"train_s": wall[method][i] * 0.8, "embed_s": wall[method][i] * 0.2}
                if method == "crest"
                else {"train_s": wall[method][i]},
                counters={"examples_backpropagated": 128 * (100, 250)[i], "examples_embedded": 600 * (100, 250)[i]}
                if method == "crest"
                else {"examples_backpropagated": 128 * (100, 250)[i]},
            )
        )
    for seed, budget in itertools.product(range(3), (1.0, 2.0)):
        runs.append(
            FrontierRun(
                method="full",
                seed=seed,
                budget=budget,
                steps=int(500 * budget),
                wall_s=50.0 * budget,
                accuracy=0.88 + 0.002 * budget,
                role="reference",
            )
        )
    return runs


def test_payoff_comparisons_stop_at_the_other_methods_longest_run() -> None:
    """A measuring run longer than any CREST or full-data run of its seed has no equal-time difference, and its
    sign check at that budget waits for one, instead of reading the other method's last accuracy."""
    walls = {"full": (10.0, 25.0), "crest": (12.0, 30.0), "crest-measure": (13.0, 33.0)}
    accs = {"full": (0.80, 0.86), "crest": (0.82, 0.87), "crest-measure": (0.81, 0.865)}
    runs = [
        FrontierRun(
            method=m,
            seed=seed,
            budget=b,
            steps=(100, 250)[i],
            wall_s=walls[m][i],
            accuracy=accs[m][i] + 0.001 * seed,
            detail={"loader": {"payoff_per_second": 1.3}, "payoff": "selection paid"} if m == "crest-measure" else {},
        )
        for seed, m, (i, b) in itertools.product(range(2), walls, enumerate((0.2, 0.5)))
    ]
    s = summarize(runs)
    early, late = (s["selection"]["crest"][k]["full"] for k in ("0.2", "0.5"))
    assert early["equal_time_beyond"] == [] and early["equal_time"]["n"] == 2
    assert late["equal_time_beyond"] == [0, 1] and late["equal_time"]["mean"] is None
    signs = s["payoff"]["sign_agreement"]
    assert signs["0.2"]["agree"] == {"0": True, "1": True} and signs["0.2"]["crest_minus_full_equal_time"] > 0
    assert signs["0.5"]["agree"] == {"0": None, "1": None} and signs["0.5"]["crest_minus_full_equal_time"] is None
    against_crest = s["payoff"]["vs_crest"]["crest-measure"]["0.5"]["crest"]
    assert against_crest["equal_time_beyond"] == [0, 1] and against_crest["equal_steps"]["n"] == 2
    assert "seeds 0, 1 past full's runs" in markdown(s, "hand-made")


def test_summary_of_hand_made_runs() -> None:
    s = summarize(_hand_made())
    assert s["methods"] == ["full", "random", "crest"] and s["budgets"] == [0.2, 0.5]
    assert s["points"]["crest"]["0.5"]["accuracy"]["mean"] == pytest.approx(0.871)
    assert [p["budget"] for p in s["frontier"]["full"]["time"]] == [0.2, 0.5]
    crest_full = s["paired"]["0.2"]["crest-full"]
    assert crest_full["diffs"] == pytest.approx([0.02, 0.022, 0.024]) and crest_full["verdict"] == "above"
    assert "infobatch-full" not in s["paired"]["0.2"]  # a method that did not run is not paired
    # Targets: full at the budget nearest 30% (20%) and at 50%, minus 0.5 points, and the reference minus 1 point.
    names = [t["name"] for t in s["targets"]]
    assert names == ["full@20% - 0.5 pt", "full@50% - 0.5 pt", "reference (full, E epochs) - 1 pt"]
    t = s["targets"][1]
    assert t["accuracy"] == pytest.approx(0.86 - 0.001 - 0.005)
    assert t["time_s"]["full"] == pytest.approx(10 + 15 * (0.854 - 0.799) / (0.859 - 0.799))
    assert t["speedup_vs_full"]["crest"] == pytest.approx(t["time_s"]["full"] / t["time_s"]["crest"])
    assert t["time_s"]["random"] is None and t["speedup_vs_random"]["crest"] is None  # random never gets there
    first = s["targets"][0]  # 0.794: random reaches it a twelfth of the way from its 20% to its 50% point
    assert first["time_s"]["random"] == pytest.approx(10 + 15 * (0.794 - 0.789) / 0.06)
    assert first["speedup_vs_random"]["full"] == pytest.approx(first["time_s"]["random"] / 10.0)
    assert s["targets"][2]["time_s"]["full"] is None  # 0.872 is above every sweep point
    # The reference: doubling E adds 0.002 in every seed; the paper's metric uses the 2E runs.
    gap = s["reference"]["doubling_gap"]
    assert gap["mean"] == pytest.approx(0.002) and gap["under_0.3_points"] is True
    paper = s["paper"]["methods"]["crest"]["0.5"]
    assert paper["speedup"]["mean"] == pytest.approx(100 / 35)
    assert paper["relative_error"]["mean"] == pytest.approx((0.884 - 0.871) / 0.884)
    # CREST at equal time: at 15 s, full's seed-0 frontier is a third of the way from its 20% point to its 50%
    # point. CREST's 50% runs (35 s) outlast full's longest (25 s): no equal-time comparison, not full's 0.86.
    row = s["selection"]["crest"]["0.5"]["full"]
    assert row["equal_time"]["n"] == 0 and row["equal_time"]["mean"] is None
    assert row["equal_time_beyond"] == [0, 1, 2] and row["equal_steps"]["n"] == 3
    early = s["selection"]["crest"]["0.2"]["full"]
    assert early["equal_time"]["diffs"][0] == pytest.approx(0.82 - (0.80 + 0.06 * 5 / 15))
    assert early["equal_time_beyond"] == []
    assert row["time_per_step_ratio"]["mean"] == pytest.approx(35 / 25)
    cost = s["cost"]["crest"]["0.5"]
    assert cost["ms_per_step"]["wall_s"]["mean"] == pytest.approx(140.0)
    assert cost["ms_per_step"]["embed_s"]["mean"] == pytest.approx(28.0)
    assert cost["ms_per_step"]["fit_s"]["mean"] is None  # not recorded: not made up
    assert cost["embedded_per_trained"]["mean"] == pytest.approx(600 / 128)
    table = markdown(s, "hand-made")
    for title in ("Paired differences", "Time to accuracy", "The paper's metric", "Cost per step", "equal time"):
        assert title in table
    assert "| 50% | 250 |" in table


# -- the flags ---------------------------------------------------------------------------------------------------


def test_protocol_flags_and_presets() -> None:
    assert cli.METHOD_NAMES == METHODS
    c = plan(_args())
    assert (c.epochs, c.budgets, c.seeds, c.methods, c.evaluation) == (
        10.0,
        (0.05, 0.1, 0.2, 0.3, 0.5),
        3,
        DEFAULT_METHODS,
        "test",
    )
    assert (c.baseline_threads, c.crest_threads, c.num_workers, c.cpus_per_worker) == (2, 2, 2, 0.5)
    assert c.bench.crest == LoaderConfig()  # the recommended recipe
    assert schedule(c)[-1] == ("full", 1.0, "reference") and len(schedule(c)) == 21
    q = plan(_args("--quick", "--reference", "--budgets", "0.5", "--crest-steps-per-round", "0", "--no-drop-learned"))
    assert (q.epochs, q.budgets, q.seeds, q.bench.train_limit, q.bench.crest.subset_fraction) == (
        2.0,
        (0.5,),
        1,
        6000,
        0.1,
    )
    assert q.bench.crest.region.mode == "crest" and not q.bench.crest.drop_learned  # 0: the adaptive rule
    assert schedule(q)[-2:] == [("full", 1.0, "reference"), ("full", 2.0, "reference")]
    v = plan(_args("--eval", "validation", "--validation-size", "2000", "--crest-num-subsets", "3"))
    assert (v.evaluation, v.validation_size, v.bench.crest.num_subsets) == ("validation", 2000, 3)
    assert (c.first_seed, plan(_args("--first-seed", "10")).first_seed) == (0, 10)  # tuning seeds apart
    assert (c.bench.lr, c.bench.momentum) == (0.05, 0.9)
    a = plan(_args("--crest-steps-per-round", "0", "--crest-fit-examples", "256", "--crest-hessian-every", "5"))
    assert a.bench.crest.overrides() == {"region.mode": "crest", "fit_examples": 256, "region.hessian_every": 5}
    o = plan(
        _args(
            "--crest-embedding", "last_layer_gradient", "--crest-embedding-dim", "64", "--lr", "0.2", "--momentum", "0"
        )
    )
    assert (o.bench.crest.embedding, o.bench.crest.embedding_dim, o.bench.lr, o.bench.momentum) == (
        "last_layer_gradient",
        64,
        0.2,
        0.0,
    )
    # The names the flags had before they were derived reach the same fields; --recipe picks the base.
    r = plan(
        _args("--recipe", "released", "--crest-weights", "uniform", "--subset-fraction", "0.02", "--drop-window", "2")
    )
    assert r.bench.crest.recipe == "released"
    assert r.bench.crest.overrides() == {"subset_fraction": 0.02, "coreset_weights": "uniform", "drop_window": 2}
    for flags, error in (
        (
            ("--crest-embedding-max-age", "60", "--crest-learned-embedding-max-age", "30"),
            "learned_embedding_max_age must be 0 \\(off\\) or >= embedding_max_age \\(60\\) steps",
        ),
        (("--methods", "crest,random"), "keep 'full'"),
        (("--methods", "full,craig"), "unknown methods"),
        (("--budgets", "0.5,1.5"), "fractions of E"),
        (("--momentum", "1.0"), "momentum in \\[0, 1\\); received 0.05, 1.0"),
        (("--crest-embedding-dim", "-1"), "embedding_dim must be >= 0, received 4 and -1"),
        (("--crest-hessian-every", "0"), "hessian_every must be >= 1, received 0"),
    ):
        with pytest.raises(ValueError, match=error):
            plan(_args(*flags))


# -- end to end ----------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_frontier_quick_end_to_end(tmp_path: Path) -> None:
    out, summary_path = tmp_path / "frontier.json", tmp_path / "summary" / "frontier.json"
    flags = ["--quick", "--recipe", "released", "--reference", "--no-progress", "--out", str(out)]
    run = subprocess.run(
        [sys.executable, "-m", "experiments.frontier", *flags, "--summary", str(summary_path)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        cwd=ROOT,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    doc = json.loads(out.read_text())
    protocol, runs, s = doc["protocol"], doc["runs"], doc["summary"]
    assert doc["evaluation"] == "test" and doc["train_examples"] == 6000 and doc["eval_examples"] == 1000
    assert (protocol["epochs"], protocol["budgets"], protocol["seeds"]) == (2.0, [0.25, 0.5], 1)
    sweep = [r for r in runs if r["role"] == "sweep"]
    # Every method x budget x seed once, and the reference at E and 2E for every seed.
    assert sorted((r["method"], r["budget"], r["seed"]) for r in sweep) == sorted(
        itertools.product(DEFAULT_METHODS, (0.25, 0.5), [0])
    )
    refs = sorted((r["method"], r["budget"], r["seed"]) for r in runs if r["role"] == "reference")
    assert refs == [("full", 1.0, 0), ("full", 2.0, 0)]
    for r in runs:
        assert r["steps"] == budget_steps(r["budget"], 2.0, 6000, 128) == r["detail"]["steps"]
        assert 0.3 < r["accuracy"] <= 1 and r["wall_s"] > 0  # trained, above chance (0.1)
        parts = sum(r["cost"][k] for k in ("train_s", "embed_s", "fit_s", "check_s", "wait_s"))
        assert parts == pytest.approx(r["wall_s"])
        if r["method"] == "crest":
            assert (r["torch_threads"], r["service_workers"], r["cpus_per_worker"]) == (2, 2, 0.5)
            assert r["counters"]["examples_embedded"] > 0 and r["counters"]["selection_calls"] >= 1
            assert r["cost"]["selection_s"] > 0 and r["counters"]["rounds"] >= 1
        else:
            assert (r["torch_threads"], r["service_workers"], r["cost"]["selection_s"]) == (2, 0, 0.0)
    assert protocol["steps"] == {"0.25": 23, "0.5": 47} and protocol["reference_steps"] == 94
    acc = {(r["method"], r["budget"], r["seed"]): r["accuracy"] for r in sweep}
    for m in DEFAULT_METHODS:
        for axis, x in (("time", "time_s"), ("steps", "steps")):
            front = s["frontier"][m][axis]
            assert front and all(b[x] > a[x] and b["accuracy"] > a["accuracy"] for a, b in itertools.pairwise(front))
        assert s["frontier"][m]["time"][-1]["accuracy"] == max(acc[m, b, 0] for b in (0.25, 0.5))
    for b in ("0.25", "0.5"):
        for name, p in s["paired"][b].items():
            a, base = name.split("-")
            assert p["seeds"] == [0] and p["diffs"] == pytest.approx([acc[a, float(b), 0] - acc[base, float(b), 0]])
    assert len(s["targets"]) == 3 and s["targets"][0]["name"] == "full@25% - 0.5 pt"
    for t in s["targets"]:
        for m in DEFAULT_METHODS:
            time_s, front = t["time_s"][m], s["frontier"][m]["time"]
            assert (time_s is None) == (t["accuracy"] > front[-1]["accuracy"])
            if time_s is not None:
                assert accuracy_at(front, time_s) >= t["accuracy"] - 1e-9
            for base in ("full", "random"):
                ratio, base_t = t[f"speedup_vs_{base}"][m], t["time_s"][base]
                expected = base_t / time_s if base_t is not None and time_s else None
                assert ratio == (pytest.approx(expected) if expected is not None else None)
    gap = s["reference"]["doubling_gap"]
    assert gap["diffs"] == pytest.approx([runs[-1]["accuracy"] - runs[-2]["accuracy"]])
    assert s["paper"]["reference"].startswith("full data, 2 x E") and set(s["selection"]) == {"crest", "infobatch"}
    assert s["cost"]["crest"]["0.5"]["ms_per_step"]["embed_s"]["mean"] > 0
    summary = json.loads(summary_path.read_text())
    assert "runs" not in summary and set(summary["summary"]) == set(s)
    assert summary["command"] == "python -m experiments.frontier " + " ".join([*flags, "--summary", str(summary_path)])
    table = out.with_suffix(".md").read_text()
    assert "Paired differences" in table and "| crest | 50% |" in table and "Paired differences" in run.stdout
    # The recipe and what the command line (here --quick's subsets) overrode in it, named in the table and the JSON.
    assert "CREST: recipe released (overrides: subset_fraction=0.1), the embedding pass in float32" in table
    assert (protocol["crest_recipe"], protocol["crest_overrides"]) == ("released", {"subset_fraction": 0.1})
    assert "CREST with recipe released (overrides: subset_fraction=0.1)" in run.stdout
    for name in ("accuracy_vs_time", "accuracy_vs_steps"):
        assert (tmp_path / f"frontier_{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_payoff_methods_hold_out_their_probe_set_and_run(tmp_path: Path) -> None:
    """crest-measure and crest-govern: CREST with LoaderConfig.payoff, on a probe set held out of its training set
    (seeded, disjoint, every id once); a short run through ``run_one`` against a real service reports its payoff."""
    from crest_bench.train import start_service
    from crest_bench.train_data import load_data, materialize
    from crest_bench.train_methods import BenchConfig, EvalSets, held_out, run_one

    keep, probe = held_out(1000, 50, seed=3)
    assert len(probe) == 50 and np.array_equal(np.sort(np.concatenate([keep, probe])), np.arange(1000))
    assert np.array_equal(held_out(1000, 50, seed=3)[1], probe) and not np.array_equal(held_out(1000, 50, 4)[1], probe)
    c = plan(_args("--methods", "full,crest-measure,crest-govern"))
    assert c.methods == ("full", "crest-measure", "crest-govern")
    data = load_data(BenchConfig().dataset, None, 3000, 500)
    evals = EvalSets(curve=materialize(data.test, 200), test=materialize(data.test))
    crest = LoaderConfig(batch_size=32, payoff_segment_steps=4, payoff_every=4)
    config = BenchConfig(steps=40, batch_size=32, train_limit=3000, test_limit=500, eval_every=40, crest=crest)
    service = start_service(1, backend="local")
    try:
        r = run_one("crest-govern", 0, config, data, evals, service.target, progress=False)
    finally:
        service.stop()
    assert r.loader["payoff_measurements"] == 2 and r.loader["control_steps"] == 8 and r.fallback_batches == 0
    assert "(2 measurements" in r.payoff and "; governed: training " in r.payoff
    assert r.steps == 40 and r.test_accuracy > 0.3
