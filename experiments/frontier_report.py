"""The budget frontier's scoring (pure functions of the runs; ``benchmarks/frontier.py`` runs them).

A run is one method, seed and budget: its final accuracy on the evaluation split and its wall-clock (evaluation
excluded). Runs with their LR schedule sized to a smaller budget are the only honest way to trade time for
accuracy, so a method's frontier is built from whole runs, never from the middle of a longer one:

- ``envelope``: the upper envelope of (time, accuracy) points, the best accuracy reached at or before each time
  (the points no faster point matches), increasing in both;
- ``accuracy_at`` / ``time_to``: linear interpolation between the envelope's points (before its first point: None;
  after its last: the last accuracy; above its best accuracy: never, None). An equal-time comparison reads a
  baseline's frontier only up to its longest run, since past it the last accuracy is what the baseline reached
  sooner (``equal_time_beyond``);
- ``paired``: differences between two methods over the seeds both ran (same seed, same initial weights).

The paper's metric, against the converged reference (full data at E or 2E epochs), is kept apart and labelled
as such: its "relative error" here is (reference accuracy - accuracy) / reference accuracy, its speedup the
reference's wall time over the run's.
"""

from __future__ import annotations

import itertools
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

SWEEP, REFERENCE = "sweep", "reference"
BASELINES = ("full", "random")
# Methods compared against the baselines (paired, equal steps and time).
SELECTORS = ("crest", "infobatch", "crest-measure", "crest-govern")
# The target: full data at 30% of the budget, minus 0.5 points.
TARGET_BUDGET, TARGET_DROP = 0.3, 0.005
# Cost of a run, seconds: the trainer's wall time cut by what it spent on (training is the rest), then the
# service's side (not on the trainer's clock: its selector actors run on the other core).
WALL_PARTS = ("train_s", "embed_s", "fit_s", "check_s", "wait_s")
SERVICE_PARTS = ("selection_s", "service_cpu_s")


@dataclass(kw_only=True)
class FrontierRun:
    """One point: a method trained from scratch for ``steps`` steps with its cosine schedule sized to them."""

    method: str
    seed: int
    budget: float  # fraction of the reference's E epochs (a reference run: 1.0 or 2.0)
    steps: int  # round(budget * E * N / batch_size)
    wall_s: float  # benchmark clock: building the model to the last step, evaluations excluded
    accuracy: float  # final, on the whole evaluation split (test or validation: the JSON says which)
    role: str = SWEEP  # SWEEP: a point of the frontier; REFERENCE: full data at E or 2E epochs
    torch_threads: int = 1  # intra-op threads of the trainer for this run
    service_workers: int = 0  # CREST: the service's selector actors or threads (0: the run did not use it)
    cpus_per_worker: float = 0.0  # CREST: CPUs each actor reserved in Ray (0 with the local backend)
    # Seconds: WALL_PARTS sum to wall_s; SERVICE_PARTS are the service's (selection: each selector call once;
    # service_cpu_s: CPU of the whole service process tree during the run, None where it cannot be read).
    cost: dict[str, float | None] = field(default_factory=dict)
    # Counts: examples_backpropagated, examples_embedded, selection_calls, rounds, regions, checks, reselections,
    # fallback_batches, partial_rounds, persistent_failures.
    counters: dict[str, int] = field(default_factory=dict)
    detail: dict[str, Any] = field(default_factory=dict)  # the run's crest_bench.train_methods.RunResult


def budget_steps(budget: float, epochs: float, n: int, batch_size: int) -> int:
    """Optimizer steps of a budget: round(budget x epochs x n / batch_size), at least 1."""
    return max(1, round(budget * epochs * n / batch_size))


def key(budget: float) -> str:
    """A budget as a JSON key: 0.05 -> "0.05"."""
    return f"{budget:g}"


def mean_sd(values: Sequence[float]) -> dict[str, Any]:
    """{"mean", "sd", "n"}: sd is the sample standard deviation, None with fewer than two values."""
    vals = [float(v) for v in values]
    return {
        "mean": statistics.fmean(vals) if vals else None,
        "sd": statistics.stdev(vals) if len(vals) > 1 else None,
        "n": len(vals),
    }


# -- the frontier -----------------------------------------------------------------------------------------------


def envelope(points: Iterable[Mapping[str, float]], x: str = "time_s") -> list[dict[str, float]]:
    """The upper envelope of points {x, "accuracy", ...} (x: "time_s" or "steps"): sorted by x, each kept only when
    its accuracy beats every point at or before its x. x and accuracy both increase strictly along it."""
    out: list[dict[str, float]] = []
    for p in sorted(points, key=lambda p: (p[x], -p["accuracy"])):
        if not out or p["accuracy"] > out[-1]["accuracy"]:
            out.append(dict(p))
    return out


def accuracy_at(front: Sequence[Mapping[str, float]], time_s: float) -> float | None:
    """Accuracy of the envelope ``front`` at ``time_s``, interpolated linearly between its points; None before its
    first point, its last accuracy after its last."""
    if not front or time_s < front[0]["time_s"]:
        return None
    return _between(front, "time_s", "accuracy", time_s)


def time_to(front: Sequence[Mapping[str, float]], accuracy: float) -> float | None:
    """Time at which the envelope ``front`` reaches ``accuracy``, interpolated linearly between its points; its
    first time when its first point already does, None when it never does."""
    if not front or accuracy > front[-1]["accuracy"]:
        return None
    if accuracy <= front[0]["accuracy"]:
        return front[0]["time_s"]
    return _between(front, "accuracy", "time_s", accuracy)


def _between(front: Sequence[Mapping[str, float]], x: str, y: str, at: float) -> float:
    """y at x = ``at`` on the polyline ``front`` (x increasing); its last y past its end."""
    for a, b in itertools.pairwise(front):
        if at <= b[x]:
            return a[y] + (b[y] - a[y]) * (at - a[x]) / (b[x] - a[x])
    return front[-1][y]


def paired(a: Mapping[int, float], b: Mapping[int, float]) -> dict[str, Any]:
    """a - b over the seeds in both: {"mean", "sd", "n", "seeds", "diffs", "verdict"}; verdict "above" when the
    mean exceeds one sd, "below" when it is under minus one sd, "within" otherwise, None with fewer than 2 seeds."""
    seeds = sorted(a.keys() & b.keys())
    diffs = [a[s] - b[s] for s in seeds]
    stats = mean_sd(diffs)
    m, sd = stats["mean"], stats["sd"]
    verdict = None if sd is None else "above" if m > sd else "below" if m < -sd else "within"
    return {**stats, "seeds": seeds, "diffs": diffs, "verdict": verdict}


# -- the report -------------------------------------------------------------------------------------------------


def _by(runs: Iterable[FrontierRun], method: str, budget: float) -> dict[int, FrontierRun]:
    return {r.seed: r for r in runs if r.method == method and r.budget == budget}


def _ratio(num: float | None, den: float | None) -> float | None:
    return num / den if num is not None and den else None


def summarize(runs: Sequence[FrontierRun]) -> dict[str, Any]:
    """Every table of the frontier report, as JSON-ready data (docs/results/methods.md, "The budget frontier")."""
    sweep = [r for r in runs if r.role == SWEEP]
    methods = list(dict.fromkeys(r.method for r in sweep))
    budgets = sorted({r.budget for r in sweep})
    points: dict[str, dict[str, Any]] = {}
    fronts: dict[str, dict[str, list[dict[str, float]]]] = {}
    for m in methods:
        points[m] = {}
        for b in budgets:
            mine = list(_by(sweep, m, b).values())
            if mine:
                points[m][key(b)] = {
                    "budget": b,
                    "steps": mine[0].steps,
                    "seeds": sorted(r.seed for r in mine),
                    "accuracy": mean_sd([r.accuracy for r in mine]),
                    "wall_s": mean_sd([r.wall_s for r in mine]),
                }
        means = [
            {
                "budget": p["budget"],
                "steps": p["steps"],
                "time_s": p["wall_s"]["mean"],
                "accuracy": p["accuracy"]["mean"],
            }
            for p in points[m].values()
        ]
        fronts[m] = {"time": envelope(means), "steps": envelope(means, x="steps")}
    pairs = {
        key(b): {
            f"{a}-{base}": paired(
                {s: r.accuracy for s, r in _by(sweep, a, b).items()},
                {s: r.accuracy for s, r in _by(sweep, base, b).items()},
            )
            for a in SELECTORS
            for base in BASELINES
            if a in methods and base in methods
        }
        for b in budgets
    }
    reference = _reference(runs)
    selection = _equal_steps_and_time(sweep, methods, budgets)
    return {
        "budgets": budgets,
        "methods": methods,
        "points": points,
        "frontier": fronts,
        "paired": pairs,
        "targets": _targets(points, fronts, reference),
        "reference": reference,
        "paper": _paper(sweep, methods, budgets, runs),
        "selection": selection,
        "cost": _cost(sweep, methods, budgets),
        "payoff": _payoff(sweep, methods, budgets, selection),
    }


def _reference(runs: Sequence[FrontierRun]) -> dict[str, Any] | None:
    """Full data at E epochs (and 2E), and the gap that doubling E adds (paired over seeds)."""
    refs = [r for r in runs if r.role == REFERENCE]
    if not refs:
        return None
    by_budget = {b: {r.seed: r for r in refs if r.budget == b} for b in sorted({r.budget for r in refs})}
    out: dict[str, Any] = {
        key(b): {
            "steps": next(iter(rs.values())).steps,
            "accuracy": mean_sd([r.accuracy for r in rs.values()]),
            "wall_s": mean_sd([r.wall_s for r in rs.values()]),
        }
        for b, rs in by_budget.items()
    }
    one, two = by_budget.get(1.0), by_budget.get(2.0)
    out["doubling_gap"] = None
    if one and two:
        gap = paired({s: r.accuracy for s, r in two.items()}, {s: r.accuracy for s, r in one.items()})
        gap["under_0.3_points"] = gap["mean"] is not None and gap["mean"] < 0.003
        out["doubling_gap"] = gap
    out["used"] = key(2.0 if two else 1.0)  # the paper's metric's reference: the longest run
    return out


def _targets(points: dict[str, Any], fronts: dict[str, Any], reference: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Time to accuracy on each method's frontier for 2-3 targets, and speedups against full data and random."""
    full = points.get("full", {})
    targets: list[tuple[str, float]] = []
    if full:
        near = min(full.values(), key=lambda p: (abs(p["budget"] - TARGET_BUDGET), p["budget"]))
        targets.append((f"full@{near['budget']:.0%} - 0.5 pt", near["accuracy"]["mean"] - TARGET_DROP))
        top = max(full.values(), key=lambda p: p["budget"])
        if top is not near:
            targets.append((f"full@{top['budget']:.0%} - 0.5 pt", top["accuracy"]["mean"] - TARGET_DROP))
    if reference is not None and "1" in reference:
        targets.append(("reference (full, E epochs) - 1 pt", reference["1"]["accuracy"]["mean"] - 0.01))
    out = []
    for name, accuracy in targets:
        times = {m: time_to(front["time"], accuracy) for m, front in fronts.items()}
        out.append(
            {
                "name": name,
                "accuracy": accuracy,
                "time_s": times,
                **{
                    f"speedup_vs_{base}": {m: _ratio(times.get(base), t) for m, t in times.items()}
                    for base in BASELINES
                },
            }
        )
    return out


def _paper(
    sweep: list[FrontierRun], methods: list[str], budgets: list[float], runs: Sequence[FrontierRun]
) -> dict[str, Any] | None:
    """The paper's metric: relative error and speedup of each run against the reference run of its seed."""
    longest = max((r.budget for r in runs if r.role == REFERENCE), default=None)
    if longest is None:
        return None
    ref = {r.seed: r for r in runs if r.role == REFERENCE and r.budget == longest}
    table: dict[str, Any] = {}
    for m in methods:
        table[m] = {}
        for b in budgets:
            mine = [r for r in _by(sweep, m, b).values() if r.seed in ref]
            if mine:
                table[m][key(b)] = {
                    "relative_error": mean_sd(
                        [(ref[r.seed].accuracy - r.accuracy) / ref[r.seed].accuracy for r in mine]
                    ),
                    "speedup": mean_sd([ref[r.seed].wall_s / r.wall_s for r in mine]),
                }
    return {"reference": f"full data, {longest:g} x E epochs", "methods": table}


def _equal_steps_and_time(
    sweep: list[FrontierRun],
    methods: list[str],
    budgets: list[float],
    selectors: Sequence[str] = SELECTORS,
    bases: Sequence[str] = BASELINES,
) -> dict[str, Any]:
    """Each selection run against the baselines of its seed: at equal steps (the same budget) and at equal
    wall-clock (the baseline's per-seed frontier at the run's wall time). A run that outlasts the baseline's longest
    run of its seed has no equal-time comparison: the baseline's frontier stops there, and its last accuracy is
    what it reached in less time, not what it would reach in the run's; such seeds are listed in
    ``equal_time_beyond``."""
    out: dict[str, Any] = {}
    for m in (m for m in selectors if m in methods):
        out[m] = {}
        for b in budgets:
            mine = _by(sweep, m, b)
            row: dict[str, Any] = {}
            for base in (x for x in bases if x in methods):
                same = _by(sweep, base, b)
                at_time, beyond = {}, []
                for s, r in mine.items():
                    theirs = [x for x in sweep if x.method == base and x.seed == s]
                    if theirs and r.wall_s > max(x.wall_s for x in theirs):
                        beyond.append(s)
                        continue
                    acc = accuracy_at(envelope({"time_s": x.wall_s, "accuracy": x.accuracy} for x in theirs), r.wall_s)
                    if acc is not None:
                        at_time[s] = acc
                row[base] = {
                    "equal_steps": paired(
                        {s: r.accuracy for s, r in mine.items()}, {s: x.accuracy for s, x in same.items()}
                    ),
                    "equal_time": paired({s: r.accuracy for s, r in mine.items()}, at_time),
                    "equal_time_beyond": sorted(beyond),
                    "time_per_step_ratio": mean_sd(
                        [r.wall_s / same[s].wall_s for s, r in mine.items() if s in same and same[s].wall_s > 0]
                    ),
                }
            out[m][key(b)] = row
    return out


def _payoff(
    sweep: list[FrontierRun], methods: list[str], budgets: list[float], selection: dict[str, Any]
) -> dict[str, Any] | None:
    """The payoff each measuring or governed run printed (LoaderConfig.payoff), per seed, and the sign check: does
    the measuring run's speedup per second lie on the same side of 1 as CREST's paired equal-time difference with
    full data at that budget?"""
    payoff_methods = [m for m in ("crest-measure", "crest-govern") if m in methods]
    if not payoff_methods:
        return None
    runs: dict[str, Any] = {}
    for m in payoff_methods:
        runs[m] = {}
        for b in budgets:
            rows = {}
            for seed, r in sorted(_by(sweep, m, b).items()):
                stats = r.detail.get("loader", {})
                state = r.detail.get("payoff_state") or {}
                decisions = state.get("governor", {}).get("decisions", [])
                rows[str(seed)] = {
                    "line": r.detail.get("payoff", ""),
                    **{k: stats.get(f"payoff_{k}") for k in ("per_second", "per_second_lo", "per_second_hi")},
                    "measurements": stats.get("payoff_measurements"),
                    "control_steps": stats.get("control_steps"),
                    "probe_share": stats.get("probe_s", 0.0) / r.wall_s if r.wall_s > 0 else None,
                    "arm": stats.get("payoff_arm"),
                    "moved_to_control_at": next((d["step"] for d in decisions if d["arm"] == "control"), None),
                }
            runs[m][key(b)] = rows
    signs: dict[str, Any] = {}
    if "crest-measure" in methods and "crest" in methods:
        for b in budgets:
            crest = selection["crest"][key(b)]["full"]["equal_time"]
            measured = runs["crest-measure"][key(b)]
            verdicts = {seed: _side(row) for seed, row in measured.items()}
            frontier = crest.get("mean")
            signs[key(b)] = {
                "crest_minus_full_equal_time": frontier,
                "payoff_side": verdicts,
                "agree": {
                    seed: None if side is None or frontier is None else (side == "above 1") == (frontier > 0)
                    for seed, side in verdicts.items()
                },
            }
    # The targets: the measuring and governed runs against plain CREST (equal steps and equal time).
    against_crest = _equal_steps_and_time(sweep, methods, budgets, selectors=payoff_methods, bases=("crest",))
    return {"runs": runs, "sign_agreement": signs, "vs_crest": against_crest}


def _side(row: dict[str, Any]) -> str | None:
    """Where a run's payoff per second lies against 1: "above 1" / "below 1" (its estimate), None if not measured."""
    value = row.get("per_second")
    if value is None or value != value:
        return None
    return "above 1" if value > 1 else "below 1"


def _cost(sweep: list[FrontierRun], methods: list[str], budgets: list[float]) -> dict[str, Any]:
    """Milliseconds per optimizer step, by part, and candidates embedded per trained example."""
    out: dict[str, Any] = {}
    for m in methods:
        out[m] = {}
        for b in budgets:
            mine = list(_by(sweep, m, b).values())
            if not mine:
                continue
            per_step = {
                part: mean_sd([v for r in mine if (v := _ms_per_step(r, part)) is not None])
                for part in ("wall_s", *WALL_PARTS, *SERVICE_PARTS)
            }
            trained = [r.counters.get("examples_backpropagated", 0) for r in mine]
            out[m][key(b)] = {
                "ms_per_step": per_step,
                "embedded_per_trained": mean_sd(
                    [r.counters.get("examples_embedded", 0) / t for r, t in zip(mine, trained, strict=True) if t]
                ),
                "selection_calls": mean_sd([r.counters.get("selection_calls", 0) for r in mine]),
                "torch_threads": sorted({r.torch_threads for r in mine}),
                "service_workers": sorted({r.service_workers for r in mine}),
            }
    return out


def _ms_per_step(r: FrontierRun, part: str) -> float | None:
    v = r.wall_s if part == "wall_s" else r.cost.get(part)
    return None if v is None else 1e3 * v / r.steps
