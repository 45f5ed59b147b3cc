"""The budget frontier's markdown tables and PNG plots, from ``frontier_report.summarize``'s output."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from crest_bench.train_report import COLOURS
from experiments.frontier_report import BASELINES, REFERENCE, SERVICE_PARTS, SWEEP, WALL_PARTS, FrontierRun, key


def _pm(s: dict[str, Any] | None, fmt: str, none: str = "-") -> str:
    if s is None or s.get("mean") is None:
        return none
    return format(s["mean"], fmt) + (f" ± {format(s['sd'], fmt)}" if s.get("sd") else "")


def _pair(p: dict[str, Any] | None) -> str:
    if p is None or p["mean"] is None:
        return "-"
    return _pm(p, "+.4f") + (f" ({p['verdict']})" if p["verdict"] else "") + f" n={p['n']}"


def _equal_time(row: dict[str, Any], base: str) -> str:
    """The equal-time pair, and the seeds whose runs outlast the baseline's longest (no comparison there)."""
    beyond = row.get("equal_time_beyond") or []
    cell = _pair(row["equal_time"])
    if not beyond:
        return cell
    past = f"seeds {', '.join(map(str, beyond))} past {base}'s runs"
    return past if cell == "-" else f"{cell}; {past}"


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def markdown(summary: dict[str, Any], header: str) -> str:
    """Every table of the report; ``header`` says what ran (data, E, split, threads, command)."""
    methods, budgets = summary["methods"], summary["budgets"]
    lines = [header, "", "**Accuracy (mean ± sd over seeds) and wall-clock, s, at each budget** (fraction of E epochs)"]
    lines += ["", "| budget | steps | " + " | ".join(methods) + " |", "|---|---|" + "---|" * len(methods)]
    for b in budgets:
        cells = []
        for m in methods:
            p = summary["points"][m].get(key(b))
            cells.append("-" if p is None else f"{_pm(p['accuracy'], '.4f')} ({_pm(p['wall_s'], '.1f')} s)")
        steps = next((summary["points"][m][key(b)]["steps"] for m in methods if key(b) in summary["points"][m]), "-")
        lines.append(f"| {b:.0%} | {steps} | " + " | ".join(cells) + " |")

    pair_names = list(dict.fromkeys(name for row in summary["paired"].values() for name in row))
    if pair_names:
        lines += ["", "**Paired differences at equal budget** (same seed, same steps; verdict against one sd)", ""]
        lines += ["| budget | " + " | ".join(n.replace("-", " - ") for n in pair_names) + " |"]
        lines += ["|---|" + "---|" * len(pair_names)]
        for b in budgets:
            lines.append(
                f"| {b:.0%} | " + " | ".join(_pair(summary["paired"][key(b)].get(n)) for n in pair_names) + " |"
            )

    lines += ["", "**Time to accuracy on each frontier** (s; speedup = full's or random's time / the method's)", ""]
    lines += ["| target | accuracy | " + " | ".join(methods) + " |", "|---|---|" + "---|" * len(methods)]
    for t in summary["targets"]:
        cells = [
            "never"
            if t["time_s"][m] is None
            else f"{t['time_s'][m]:.1f} ({_x(t['speedup_vs_full'][m])} full, {_x(t['speedup_vs_random'][m])} random)"
            for m in methods
        ]
        lines.append(f"| {t['name']} | {t['accuracy']:.4f} | " + " | ".join(cells) + " |")

    ref = summary["reference"]
    if ref is not None:
        lines += ["", "**Reference runs** (full data, schedule sized to E and 2E epochs)", ""]
        lines += ["| run | steps | accuracy | wall s |", "|---|---|---|---|"]
        for name in ("1", "2"):
            if name in ref:
                r = ref[name]
                lines.append(f"| {name} x E | {r['steps']} | {_pm(r['accuracy'], '.4f')} | {_pm(r['wall_s'], '.1f')} |")
        gap = ref["doubling_gap"]
        if gap is not None:
            verdict = "under" if gap["under_0.3_points"] else "not under"
            lines += [
                "",
                f"Doubling E adds {_pm(gap, '+.4f')} (n={gap['n']}): {verdict} the 0.3 points the protocol asks.",
            ]

    paper = summary["paper"]
    if paper is not None:
        lines += ["", f"**The paper's metric** (against the converged reference: {paper['reference']}; relative error"]
        lines += ["= (reference - accuracy) / reference, speedup = reference wall / run wall, paired by seed)", ""]
        lines += ["| budget | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
        for b in budgets:
            cells = []
            for m in methods:
                c = paper["methods"][m].get(key(b))
                cells.append("-" if c is None else f"{_pm(c['relative_error'], '.2%')}, {_pm(c['speedup'], '.2f')}x")
            lines.append(f"| {b:.0%} | " + " | ".join(cells) + " |")

    if summary["selection"]:
        lines += ["", "**Per-step quality and per-second cost** (each selection run against its seed's baselines:"]
        lines += [
            "equal steps = the same budget; equal time = the baseline's per-seed frontier at the run's wall time)"
        ]
        bases = [b for b in BASELINES if b in methods]
        lines += [
            "",
            "| method | budget | " + " | ".join(f"vs {b}: equal steps | equal time | wall ratio" for b in bases),
        ]
        lines[-1] += " |"
        lines += ["|---|---|" + "---|---|---|" * len(bases)]
        for m, rows in summary["selection"].items():
            for b in budgets:
                row = rows[key(b)]
                cells = [
                    f"{_pair(row[base]['equal_steps'])} | {_equal_time(row[base], base)} "
                    f"| {_pm(row[base]['time_per_step_ratio'], '.2f')}"
                    for base in bases
                ]
                lines.append(f"| {m} | {b:.0%} | " + " | ".join(cells) + " |")

    parts = ("wall_s", *WALL_PARTS, *SERVICE_PARTS)
    lines += ["", "**Cost per step, ms** (the trainer's wall = train + embed + fit + check + wait; then the service's"]
    lines += [
        "selection time, each selector call once, and its process tree's CPU, neither on the trainer's clock)",
        "",
    ]
    lines += [
        "| method | budget | threads | " + " | ".join(p.removesuffix("_s") for p in parts) + " | embedded/trained |"
    ]
    lines += ["|---|---|---|" + "---|" * (len(parts) + 1)]
    for m, rows in summary["cost"].items():
        for b in budgets:
            c = rows.get(key(b))
            if c is None:
                continue
            threads = "/".join(map(str, c["torch_threads"])) + (
                f" + {'/'.join(map(str, c['service_workers']))} selectors" if any(c["service_workers"]) else ""
            )
            cells = [_pm(c["ms_per_step"][p], ".1f") for p in parts]
            lines.append(
                f"| {m} | {b:.0%} | {threads} | " + " | ".join(cells) + f" | {_pm(c['embedded_per_trained'], '.2f')} |"
            )
    return "\n".join(lines) + "\n"


def plot_paths(out: Path) -> dict[str, Path]:
    """Where ``plot`` writes each figure, next to the JSON ``out``."""
    return {name: out.parent / f"{out.stem}_{name}.png" for name in ("accuracy_vs_time", "accuracy_vs_steps")}


def plot(runs: Sequence[FrontierRun], summary: dict[str, Any], out: Path, evaluation: str) -> list[Path]:
    """Accuracy against wall-clock (every run, and each method's frontier of seed means) and against steps (mean
    ± sd per budget); [] when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    paths = plot_paths(out)
    ylabel = f"{evaluation} accuracy"
    refs = [r for r in runs if r.role == REFERENCE]
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for m in summary["methods"]:
        colour = COLOURS.get(m, "tab:green")
        mine = [r for r in runs if r.role == SWEEP and r.method == m]
        ax.scatter([r.wall_s for r in mine], [r.accuracy for r in mine], color=colour, alpha=0.35, s=14)
        front = summary["frontier"][m]["time"]
        ax.plot([p["time_s"] for p in front], [p["accuracy"] for p in front], color=colour, marker="o", label=m)
    for r in refs:
        ax.scatter([r.wall_s], [r.accuracy], color="black", marker="x")
    if refs:
        ax.scatter([], [], color="black", marker="x", label="reference (full, E / 2E epochs)")
    ax.set(xlabel="wall-clock, s (evaluation excluded)", ylabel=ylabel, title="budget frontier (mean over seeds)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(paths["accuracy_vs_time"], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for m in summary["methods"]:
        pts = sorted(summary["points"][m].values(), key=lambda p: p["steps"])
        ax.errorbar(
            [p["steps"] for p in pts],
            [p["accuracy"]["mean"] for p in pts],
            yerr=[p["accuracy"]["sd"] or 0.0 for p in pts],
            color=COLOURS.get(m, "tab:green"),
            marker="o",
            capsize=3,
            label=m,
        )
    ax.set(xlabel="optimizer steps (schedule sized to them)", ylabel=ylabel, title="accuracy at equal steps")
    ax.legend()
    fig.tight_layout()
    fig.savefig(paths["accuracy_vs_steps"], dpi=120)
    plt.close(fig)
    return list(paths.values())
