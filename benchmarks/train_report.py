"""The training benchmark's scoring, summary, markdown tables and PNG plots (pure functions of the runs)."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from crest_bench.train_methods import METHODS, BenchConfig, RunResult

COLOURS = dict(
    zip(METHODS, ("black", "tab:grey", "tab:red", "tab:blue", "tab:green", "tab:orange", "tab:purple"), strict=True)
)


def score(runs: list[RunResult], drop: float) -> None:
    """Fill in each run's target, time to target and speedup against the full-data run of its seed, and CREST's
    difficulty trend."""
    full = {r.seed: r for r in runs if r.method == "full"}
    for r in runs:
        if r.difficulty:
            r.difficulty_trend = difficulty_trend(r.difficulty, r.steps)
        ref = full.get(r.seed)
        if ref is None:
            continue
        r.target_accuracy = ref.curve[-1]["accuracy"] - drop
        r.time_to_target_s = next((p["time_s"] for p in r.curve if p["accuracy"] >= r.target_accuracy), None)
        r.speedup = ref.wall_s / r.time_to_target_s if r.time_to_target_s else None


def trend(steps: Sequence[float], values: Sequence[float], total_steps: int) -> dict[str, float | None]:
    """Least-squares slope per 1,000 steps, and the means over the first and last thirds of the step budget
    (points at steps <= 1/3 and > 2/3 of it: a curve window ending at a third belongs to the one before)."""
    x, y = np.asarray(steps, dtype=np.float64), np.asarray(values, dtype=np.float64)
    first, last = y[x <= total_steps / 3], y[x > 2 * total_steps / 3]
    slope = float(np.polyfit(x, y, 1)[0]) * 1000 if len(np.unique(x)) >= 2 else None
    return {
        "slope_per_1k_steps": slope,
        "first_third": float(first.mean()) if len(first) else None,
        "last_third": float(last.mean()) if len(last) else None,
    }


def difficulty_trend(rounds: list[dict[str, float]], total_steps: int) -> dict[str, Any]:
    """Does CREST select relatively harder examples as training goes on?

    Absolute losses fall for every method, so the measure is relative to each round's own ids: the mean
    percentile of the selected examples' losses among them (0.5: as hard as a random pick) and the ratio of
    their mean loss to the round's. Rounds embedded at step 0 are left out: the untrained model's losses all
    sit near ln C, so their ranking says nothing about difficulty (and would make any later level look like a
    rise). ``increases`` is True when the percentile's slope is positive and its last-third mean exceeds its
    first-third mean (None when a third has no round).
    """
    used = [d for d in rounds if d["step"] > 0]
    steps = [d["step"] for d in used]
    percentile = trend(steps, [d["selected_percentile"] for d in used], total_steps)
    ratio = trend(steps, [d["selected_loss"] / max(d["embedded_loss"], 1e-12) for d in used], total_steps)
    slope, first, last = percentile["slope_per_1k_steps"], percentile["first_third"], percentile["last_third"]
    increases = None if slope is None or first is None or last is None else bool(slope > 0 and last > first)
    return {
        "rounds": len(rounds),
        "rounds_used": len(used),
        "percentile": percentile,
        "loss_ratio": ratio,
        "increases": increases,
    }


def mean_std(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def _present(values: list[float | None]) -> list[float]:
    return [float(v) for v in values if v is not None]


def summarize(runs: list[RunResult]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for method in dict.fromkeys(r.method for r in runs):
        mine = [r for r in runs if r.method == method]
        reached = [r for r in mine if r.time_to_target_s is not None]
        losses = [trend([p["step"] for p in r.batch_loss], [p["loss"] for p in r.batch_loss], r.steps) for r in mine]
        s: dict[str, Any] = {
            "seeds": len(mine),
            "reached_target": len(reached),
            **{
                key: mean_std([float(getattr(r, key)) for r in mine])
                for key in (
                    "test_accuracy",
                    "wall_s",
                    "examples_backpropagated",
                    "examples_forward_only",
                    "examples_forwarded",
                    "wait_s",
                    "embed_s",
                )
            },
            "time_to_target_s": mean_std([float(r.time_to_target_s) for r in reached if r.time_to_target_s]),
            "speedup": mean_std([float(r.speedup) for r in reached if r.speedup]),
            "batch_loss_first_third": mean_std(_present([t["first_third"] for t in losses])),
            "batch_loss_last_third": mean_std(_present([t["last_third"] for t in losses])),
            "excluded_final": mean_std([r.excluded[-1]["fraction"] for r in mine if r.excluded]),
            "excluded_max": mean_std([max(e["fraction"] for e in r.excluded) for r in mine if r.excluded]),
        }
        trends = [r.difficulty_trend for r in mine if r.difficulty_trend]
        if trends:
            for name in ("percentile", "loss_ratio"):
                for key in ("first_third", "last_third", "slope_per_1k_steps"):
                    s[f"selected_{name}_{key}"] = mean_std(_present([t[name][key] for t in trends]))
            s["difficulty_increases"] = sum(1 for t in trends if t["increases"])
            s["difficulty_seeds"] = len(trends)
        out[method] = s
    return out


def _pm(s: dict[str, Any] | None, fmt: str, none: str = "never") -> str:
    if s is None or s["mean"] is None:
        return none
    return format(s["mean"], fmt) + (f" ± {format(s['std'], fmt)}" if s["std"] else "")


def markdown(summary: dict[str, dict[str, Any]], config: BenchConfig, n: int, dataset: str) -> str:
    lines = [
        f"{dataset}, {n:,} training examples, {config.steps} steps of {config.batch_size}, "
        f"target = full-data accuracy - {config.target_drop:.0%}; CREST: {config.crest.describe()}",
        "",
        "| method | test accuracy | wall s | time to target s | speedup vs full | back-propagated "
        "| forward-only | trainer wait s | reached |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for method, s in summary.items():
        lines.append(
            f"| {method} | {_pm(s['test_accuracy'], '.4f')} | {_pm(s['wall_s'], '.1f')} "
            f"| {_pm(s['time_to_target_s'], '.1f')} | {_pm(s['speedup'], '.2f')} "
            f"| {s['examples_backpropagated']['mean']:,.0f} | {s['examples_forward_only']['mean']:,.0f} "
            f"| {_pm(s['wait_s'], '.2f')} | {s['reached_target']}/{s['seeds']} |"
        )
    lines += [
        "",
        "Over training, first and last third of the steps: mean loss (nats) of the trained batches; for CREST, the "
        "selected examples against their round's random subsets (embedding-pass losses: loss ratio, and the mean "
        "percentile of their losses in the round, 0.5 = a random pick); fraction of the data left out of "
        "sampling (CREST: learned examples excluded; InfoBatch: pruned in the epoch).",
        "",
        "| method | batch loss first ⅓ | batch loss last ⅓ | selected/round loss first ⅓ | last ⅓ "
        "| selected percentile first ⅓ | last ⅓ | percentile slope / 1k steps | left out at end | left out max |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for method, s in summary.items():
        lines.append(
            f"| {method} | {_pm(s['batch_loss_first_third'], '.3f', '-')} "
            f"| {_pm(s['batch_loss_last_third'], '.3f', '-')} "
            f"| {_pm(s.get('selected_loss_ratio_first_third'), '.2f', '-')} "
            f"| {_pm(s.get('selected_loss_ratio_last_third'), '.2f', '-')} "
            f"| {_pm(s.get('selected_percentile_first_third'), '.3f', '-')} "
            f"| {_pm(s.get('selected_percentile_last_third'), '.3f', '-')} "
            f"| {_pm(s.get('selected_percentile_slope_per_1k_steps'), '+.3f', '-')} "
            f"| {_pm(s['excluded_final'], '.2%', '-')} | {_pm(s['excluded_max'], '.2%', '-')} |"
        )
    crest = summary.get("crest")
    if crest and "difficulty_seeds" in crest:
        k, seeds = crest["difficulty_increases"], crest["difficulty_seeds"]
        verdict = "rises" if 2 * k > seeds else "does not rise"
        lines += [
            "",
            f"Relative difficulty of CREST's selections over training: {verdict} ({k}/{seeds} seeds with a positive "
            "percentile slope and a higher last third than first).",
        ]
    return "\n".join(lines) + "\n"


# -- plots ------------------------------------------------------------------------------------------------------


def plot_paths(out: Path) -> dict[str, Path]:
    """Where ``plot`` writes each figure, next to the JSON ``out``."""
    names = ("accuracy_vs_time", "accuracy_vs_examples", "difficulty", "excluded")
    return {name: out.parent / f"{out.stem}_{name}.png" for name in names}


def plot(runs: list[RunResult], out: Path) -> list[Path]:
    """Write the four PNGs of ``plot_paths``; returns them, or [] when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    paths = plot_paths(out)
    first_seed = runs[0].seed if runs else 0

    def label(r: RunResult, text: str | None = None) -> str | None:
        return (text or r.method) if r.seed == first_seed else None

    targets = {r.target_accuracy for r in runs if r.target_accuracy is not None}
    for name, key, xlabel in (
        ("accuracy_vs_time", "time_s", "wall time, s (evaluation excluded)"),
        ("accuracy_vs_examples", "examples", "examples back-propagated"),
    ):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for r in runs:
            ax.plot(
                [p[key] for p in r.curve],
                [p["accuracy"] for p in r.curve],
                color=COLOURS.get(r.method, "tab:green"),
                label=label(r),
                alpha=0.8,
            )
        for t in targets:
            ax.axhline(t, color="black", linestyle=":", linewidth=0.8)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test accuracy (eval subset)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(paths[name], dpi=120)
        plt.close(fig)

    fig, (loss_ax, sel_ax, pct_ax) = plt.subplots(1, 3, figsize=(15, 4.5))
    for r in runs:
        colour = COLOURS.get(r.method, "tab:green")
        loss_ax.plot([p["step"] for p in r.batch_loss], [p["loss"] for p in r.batch_loss], color=colour, label=label(r))
        if r.difficulty:
            steps = [d["step"] for d in r.difficulty]
            sel_ax.plot(steps, [d["selected_loss"] for d in r.difficulty], color=colour, label=label(r, "selected"))
            sel_ax.plot(
                steps,
                [d["embedded_loss"] for d in r.difficulty],
                color=colour,
                linestyle="--",
                label=label(r, "round's random subsets"),
            )
            pct_ax.plot(steps, [d["selected_percentile"] for d in r.difficulty], color=colour, marker=".")
    loss_ax.set(xlabel="step", ylabel="mean loss of trained batches, nats", title="trained batches")
    sel_ax.set(xlabel="step (embedding pass)", ylabel="mean loss, nats", title="CREST: selected vs round")
    pct_ax.axhline(0.5, color="black", linestyle=":", linewidth=0.8)
    pct_ax.set(
        xlabel="step (embedding pass)",
        ylabel="mean percentile of selected losses in round",
        title="CREST: relative difficulty (0.5 = random)",
        ylim=(0, 1),
    )
    for ax in (loss_ax, sel_ax):
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.tight_layout()
    fig.savefig(paths["difficulty"], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in runs:
        if r.excluded:
            ax.plot(
                [e["step"] for e in r.excluded],
                [e["fraction"] for e in r.excluded],
                color=COLOURS.get(r.method, "tab:green"),
                drawstyle="steps-post",
                marker=".",
                label=label(r, "crest: excluded as learned" if r.method == "crest" else f"{r.method}: pruned"),
            )
    ax.set(xlabel="step", ylabel="fraction of the training data left out", ylim=(0, None))
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    fig.savefig(paths["excluded"], dpi=120)
    plt.close(fig)
    return list(paths.values())
