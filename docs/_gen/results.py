"""The results pages, generated from the committed JSONs under ``benchmarks/results/`` at every docs build.

One page per family of results (``FAMILIES``: the files a glob matches), each file with its table, its machine and
its date, and one index page linking them; the raw JSONs are copied into the site beside them (``results/data/``).
Nothing here is committed as Markdown, so a page cannot drift from its JSON.

A result must be dated: by its own ``date`` field, a date in its file name (``gpu_check_h100_2026-12-07.json``), or an
entry of ``CATALOG`` (the results committed before the JSONs carried a date, dated by the research round that made
them). An undated file stops the build with its name.

Pure functions of the repository: no mkdocs import, so the tests can list the pages this module makes.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
# Where the raw JSONs land in the site, relative to docs/.
DATA = "results/data"
# The tables' minus sign (the README's research tables use it too).
MINUS = "\N{MINUS SIGN}"


@dataclass(frozen=True)
class Entry:
    """What the repository knows of a committed result that the JSON itself does not say."""

    date: str  # ISO date of the run
    research: str = ""  # the research page (under docs/) that reports the run; "" for none
    machine: str = ""  # the machine, where the JSON records too little to name it


_INTEL = "the 2-core Intel CPU of research rounds 1-9 (its JSON predates the CPU model field)"
CATALOG: dict[str, Entry] = {
    "demo_recommended_xeon_amx.json": Entry("2026-12-06"),
    "frontier_noisy_random.json": Entry("2026-12-06"),
    **{
        f"frontier_payoff_{t}.json": Entry("2026-12-06")
        for t in ("clean", "noisy", "longtail", "released", "released_equal_time")
    },
    "frontier_clean_float32_ray.json": Entry("2026-11-29", "research/03-frontier-clean.md", _INTEL),
    "frontier_longtail_float32_ray.json": Entry("2026-11-29", "research/04-frontier-long-tailed.md", _INTEL),
    "frontier_clean.json": Entry("2026-11-29", "research/05-third-round.md", _INTEL),
    "frontier_longtail.json": Entry("2026-11-29", "research/05-third-round.md", _INTEL),
    "frontier_clean_nodrop.json": Entry("2026-11-29", "research/06-fourth-round.md", _INTEL),
    "frontier_clean_window1.json": Entry("2026-11-29", "research/07-fifth-round.md", _INTEL),
    "frontier_clean_joint.json": Entry("2026-11-30", "research/09-seventh-round.md", _INTEL),
    "frontier_longtail_joint.json": Entry("2026-11-30", "research/09-seventh-round.md", _INTEL),
    "frontier_clean_reuse.json": Entry("2026-11-30", "research/10-eighth-round.md", _INTEL),
    "frontier_clean_reuse_l1000.json": Entry("2026-11-30", "research/10-eighth-round.md", _INTEL),
    "frontier_longtail_reuse.json": Entry("2026-11-30", "research/10-eighth-round.md", _INTEL),
    "frontier_clean_reuse_loss02.json": Entry("2026-11-30", "research/11-ninth-round.md", _INTEL),
    "frontier_longtail_reuse_loss02.json": Entry("2026-11-30", "research/11-ninth-round.md", _INTEL),
    "frontier_clean_reuse_loss02_epyc.json": Entry("2026-11-30", "research/12-tenth-round.md"),
    "frontier_longtail_reuse_loss02_epyc.json": Entry("2026-11-30", "research/12-tenth-round.md"),
    "integrations_epyc.json": Entry("2026-11-30", "research/integrations-overhead.md"),
    "integrations_epyc_2.json": Entry("2026-11-30", "research/integrations-overhead.md"),
}


def load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def date_of(path: Path, data: dict[str, Any]) -> str:
    """The result's date: its ``date`` field, a date in its name, or its ``CATALOG`` entry; ValueError otherwise."""
    if isinstance(data.get("date"), str):
        return data["date"]
    found = re.search(r"(\d{4}-\d{2}-\d{2})", path.stem)
    if found:
        return found.group(1)
    if path.name in CATALOG:
        return CATALOG[path.name].date
    raise ValueError(
        f"{path.relative_to(ROOT)} has no date: give it a 'date' field, a date in its name, or an entry in "
        f"CATALOG ({Path(__file__).relative_to(ROOT)})"
    )


def machine_of(path: Path, data: dict[str, Any]) -> str:
    """The machine in words: GPU, CPU model, cores, vector extensions, then the platform string."""
    m = data.get("machine") or data  # the integrations benchmark keeps these keys at the top level
    parts = []
    if m.get("gpu"):
        parts.append(f"{m.get('gpus', 1)} x {m['gpu']}")
    entry = CATALOG.get(path.name)
    model = m.get("cpu_model") or (entry.machine if entry and entry.machine else "CPU model not recorded")
    parts.append(f"{model}, {m.get('cpus', '?')} cores")
    if m.get("cpu_flags"):
        parts.append("with " + ", ".join(m["cpu_flags"]))
    if m.get("platform"):
        parts.append(f"`{m['platform']}`")
    return "; ".join(parts)


def _f(x: float | None, digits: int = 4) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _pm(stat: dict[str, Any] | None, digits: int = 4, sign: str = "") -> str:
    """mean ± sd of a summary's {mean, sd, n} (``sign="+"`` for a difference)."""
    if not stat or stat.get("mean") is None:  # no run to compare (one run's time outside the other's frontier)
        return "-"
    sd = stat.get("sd")
    mean = f"{stat['mean']:{sign}.{digits}f}".replace("-", MINUS)
    return mean + ("" if sd is None or stat.get("n", 0) < 2 else f" ± {sd:.{digits}f}")


def _equal_time(s: dict[str, Any], row: dict[str, Any], method: str, base: str, key: str) -> str:
    """An equal-time difference's cell, or "past <base>'s runs" where the method's runs outlast the baseline's
    longest (its frontier stops there). Summaries written before ``equal_time_beyond`` existed took the baseline's
    last accuracy there, which is an equal-step number; for them this is judged by the two methods' mean times."""
    past = f"past {LABELS.get(base, base)}'s runs"
    beyond = row.get("equal_time_beyond")
    if beyond is None:  # an older summary
        mine, theirs = s["points"].get(method, {}).get(key), s["points"].get(base, {})
        if mine and theirs and mine["wall_s"]["mean"] > max(q["wall_s"]["mean"] for q in theirs.values()):
            return past
        beyond = []
    cell = _pm(row.get("equal_time"), sign="+")
    if not beyond:
        return cell
    if not row.get("equal_time", {}).get("n"):
        return past
    return f"{cell} ({len(beyond)} seed{'s' if len(beyond) > 1 else ''} {past})"


def _x(x: float | None) -> str:
    return "never" if x is None else f"{x:.2f}x"


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    return [_row(head), _row(["---"] * len(head)), *(_row(r) for r in rows), ""]


def _budget(b: str, steps: int | None) -> str:
    return f"{float(b) * 100:g}%" + (f" ({steps:,})" if steps else "")


# --- the budget frontier --------------------------------------------------------------------------------------------


# The methods' names in the tables.
LABELS = {"full": "full data", "random": "random", "crest": "CREST", "infobatch": "InfoBatch", "balanced": "balanced"}
LABELS |= {"crest-measure": "CREST, measuring", "crest-govern": "CREST, governed"}


def _time_to(s: dict[str, Any], t: dict[str, Any], method: str) -> str:
    """A method's time to a target, with its speedup against full data where full data gets there. Where a
    frontier's first run is already above the target, its time is only a bound ("≤"): the method may have got there
    sooner, and a speedup with such a time is not given."""
    time = t["time_s"].get(method)
    if time is None:
        return "never"
    if _bounded(s, t, method):
        return f"≤ {time:.1f} s"
    speedup = None if _bounded(s, t, "full") else t["speedup_vs_full"].get(method)
    return f"{time:.1f} s" + ("" if speedup is None else f" ({speedup:.2f}x)")


def _bounded(s: dict[str, Any], t: dict[str, Any], method: str) -> bool:
    """Whether ``method``'s time to target ``t`` is its frontier's first run, above the target already."""
    front = s.get("frontier", {}).get(method, {}).get("time") or []
    return bool(front) and front[0]["accuracy"] > t["accuracy"] and t["time_s"].get(method) == front[0]["time_s"]


def _points_row(s: dict[str, Any], p: dict[str, Any], methods: list[str], key: str) -> list[str]:
    """A budget's cells: the budget (steps), then each method's accuracy, mean ± sd (wall-clock s)."""
    cells = [_budget(key, p["steps"].get(key))]
    for m in methods:
        point = s["points"][m].get(key)
        cells.append("-" if not point else f"{_pm(point['accuracy'])} ({point['wall_s']['mean']:.1f} s)")
    return cells


def _frontier(path: Path, data: dict[str, Any]) -> list[str]:
    s, p = data["summary"], data["protocol"]
    methods = s["methods"]
    lines = [
        f"{data['dataset']}; {data['train_examples']:,} training examples, scored on the {data['evaluation']} set "
        f"({data.get('eval_examples', '?'):,} examples); seeds {p['first_seed']}-{p['first_seed'] + p['seeds'] - 1}; "
        f"E = {p['epochs']:g} epochs ({p['reference_steps']:,} steps). Accuracy, mean ± sd over seeds (wall-clock "
        f"s), and CREST {MINUS} full data, paired by seed:",
        "",
    ]
    crest = s.get("selection", {}).get("crest", {})
    head = ["budget (steps)", *(LABELS.get(m, m) for m in methods)]
    head += [f"CREST {MINUS} full: equal steps", "equal time", "CREST step / full's"]
    rows = []
    for b in s["budgets"]:
        key = str(b)
        cells = _points_row(s, p, methods, key)
        vs_full = crest.get(key, {}).get("full", {})
        cells += [
            _pm(vs_full.get("equal_steps"), sign="+"),
            _equal_time(s, vs_full, "crest", "full", key),
            _f(vs_full.get("time_per_step_ratio", {}).get("mean"), 2),
        ]
        rows.append(cells)
    lines += _table(head, rows)
    ref = (s.get("reference") or {}).get("1")
    if ref:
        lines += [
            f"Full data for all E epochs: {_pm(ref['accuracy'])} in {ref['wall_s']['mean']:.1f} s.",
            "",
        ]
    lines += ["Time to each target on the method's frontier, and its speedup against full data:", ""]
    rows = [[t["name"], _f(t["accuracy"]), *(_time_to(s, t, m) for m in methods)] for t in s["targets"]]
    lines += _table(["target", "accuracy", *(LABELS.get(m, m) for m in methods)], rows)
    lines += ["The command:", "", "```sh", data["command"], "```", ""]
    return lines


def _payoff_frontier(path: Path, data: dict[str, Any]) -> list[str]:
    """The payoff's frontier: the four methods, the issue's targets as paired differences, and each run's payoff."""
    s, p = data["summary"], data["protocol"]
    methods, pay = s["methods"], s.get("payoff") or {}
    seeds = f"{p['first_seed']}-{p['first_seed'] + p['seeds'] - 1}" if p["seeds"] > 1 else str(p["first_seed"])
    lines = [
        f"{data['dataset']}; {data['train_examples']:,} training examples, scored on the {data['evaluation']} set; "
        f"seeds {seeds}; CREST's recipe `{p.get('crest_recipe', '?')}`. Accuracy, mean ± sd over seeds "
        "(wall-clock s):",
        "",
    ]
    rows = [_points_row(s, p, methods, str(b)) for b in s["budgets"]]
    lines += _table(["budget (steps)", *(LABELS.get(m, m) for m in methods)], rows)
    vs_crest, vs_full = pay.get("vs_crest", {}), s.get("selection", {})
    lines += ["Paired differences at equal wall-clock (each run against the other method's frontier of its seed):", ""]
    head = ["budget", f"governed {MINUS} CREST", f"measuring {MINUS} CREST", f"governed {MINUS} full data"]
    head += [f"CREST {MINUS} full data"]
    rows = []
    for b in s["budgets"]:
        key = str(b)
        rows.append(
            [
                _budget(key, None),
                *(
                    _equal_time(s, table.get(m, {}).get(key, {}).get(base, {}), m, base, key)
                    for table, m, base in (
                        (vs_crest, "crest-govern", "crest"),
                        (vs_crest, "crest-measure", "crest"),
                        (vs_full, "crest-govern", "full"),
                        (vs_full, "crest", "full"),
                    )
                ),
            ]
        )
    lines += _table(head, rows)
    lines += ["What each run printed at its end (the measuring run; where the governed run moved to the control):", ""]
    rows = []
    runs = pay.get("runs", {})
    for b in s["budgets"]:
        key = str(b)
        measured, governed = runs.get("crest-measure", {}).get(key, {}), runs.get("crest-govern", {}).get(key, {})
        agree = pay.get("sign_agreement", {}).get(key, {}).get("agree", {})
        for seed, row in measured.items():
            g = governed.get(seed, {})
            moved = g.get("moved_to_control_at")
            where = "stayed on selection" if moved is None else f"step {moved}, ended on {g.get('arm')}"
            if g.get("control_steps") is not None:
                where += f" ({g['control_steps']:,} of {p['steps'][key]:,} steps on the control)"
            rows.append(
                [
                    _budget(key, None),
                    seed,
                    row["line"].split("; probes")[0],
                    f"{row.get('probe_share') or 0:.1%}",
                    {True: "yes", False: "no", None: "-"}[agree.get(seed)],
                    where,
                ]
            )
    head = ["budget", "seed", "measuring run's payoff", "probes", "sign agrees", "governed run moved"]
    lines += _table(head, rows)
    lines += ["The command:", "", "```sh", data["command"], "```", ""]
    return lines


def _frontier_overview(files: list[tuple[Path, dict[str, Any]]]) -> list[str]:
    rows = []
    for path, data in files:
        s = data["summary"]
        best = ", ".join(_x(t["speedup_vs_full"].get("crest")) for t in s["targets"])
        info = ", ".join(_x(t["speedup_vs_full"].get("infobatch")) for t in s["targets"])
        rows.append([f"[{path.name}](#{path.stem})", date_of(path, data), _cpu(path, data), best, info])
    head = ["result", "date", "CPU", "CREST's speedup vs full data at the 3 targets", "InfoBatch's"]
    return _table(head, rows)


def _cpu(path: Path, data: dict[str, Any]) -> str:
    m = data.get("machine") or data
    return m.get("cpu_model") or ("Intel" if path.name in CATALOG and CATALOG[path.name].machine else "?")


# --- the demo, the examples, the integrations -----------------------------------------------------------------------


def _demo(path: Path, data: dict[str, Any]) -> list[str]:
    s = data["summary"]
    lines = [
        f"{data['dataset']}, {data['train_examples']:,} training examples; {data['config']['steps']:,} steps of "
        f"{data['config']['batch_size']}; CREST recipe `{data.get('crest_recipe', '?')}`; {data['seeds_done']} "
        "seed(s). The target is full data's final accuracy minus 1%.",
        "",
    ]
    head = [
        "method",
        "test accuracy",
        "wall s",
        "time to target s",
        "speedup vs full",
        "back-propagated",
        "forward-only",
        "trainer wait s",
    ]
    rows = []
    for method, m in s.items():
        rows.append(
            [
                method,
                _pm(m["test_accuracy"]),
                _pm(m["wall_s"], 1),
                _pm(m["time_to_target_s"], 1),
                _pm(m["speedup"], 2),
                f"{m['examples_backpropagated']['mean']:,.0f}",
                f"{m['examples_forward_only']['mean']:,.0f}",
                _pm(m["wait_s"], 2),
            ]
        )
    return lines + _table(head, rows)


def _examples(path: Path, data: dict[str, Any]) -> list[str]:
    lines = [data.get("protocol", ""), ""]
    head = ["example @ steps", "plain train s", "CREST train s", "ratio per repeat", "ratio of means", "accuracy"]
    rows = []
    for name, r in data["summary"].items():
        rows.append(
            [
                f"`{name}`",
                ", ".join(f"{x:.1f}" for x in r["plain_train_s"]),
                ", ".join(f"{x:.1f}" for x in r["crest_train_s"]),
                ", ".join(f"{x:.2f}" for x in r["ratio_per_repeat"]),
                f"{r['ratio_of_means']:.2f}",
                f"{r['crest_accuracy']:.4f} (plain {r['plain_accuracy']:.4f})",
            ]
        )
    return lines + _table(head, rows)


def _integrations(path: Path, data: dict[str, Any]) -> list[str]:
    c = data["config"]
    lines = [
        f"`crest {' '.join(data['argv'])}`: {c['blocks']} rotations of {c['steps']}-step blocks, batch "
        f"{c['batch_size']}, {c['train_limit']:,} examples, {c['threads']} torch thread(s), CREST's regions "
        f"{c['steps_per_round']} steps. Ratios against the framework's own loop; paired: the median over rotations "
        "[range].",
        "",
    ]
    head = ["framework", "way", "ms/step", "paired ratio", "without embedding, paired", "a round's fixed cost"]
    rows = []
    for framework, ways in data["results"].items():
        for way, r in ways.items():
            p = r["paired_ratio_to_plain"]
            q = r.get("paired_ratio_to_plain_without_embedding")
            cost = r.get("round_cost", {}).get("round_extra_ms")
            rows.append(
                [
                    framework,
                    way,
                    f"{r['ms_per_step']:.1f}",
                    f"{p['median']:.3f} [{p['min']:.3f}, {p['max']:.3f}]",
                    "-" if not q else f"{q['median']:.3f} [{q['min']:.3f}, {q['max']:.3f}]",
                    "-" if cost is None else f"{cost:.2f} ms",
                ]
            )
    return lines + _table(head, rows)


def _dataloading(path: Path, data: dict[str, Any]) -> list[str]:
    c = data["config"]
    lines = [
        f"`crest {' '.join(data['argv'] or ['bench', 'dataloading'])}`: {c['repeats']} interleaved round(s) of "
        f"{c['warmup']} untimed + {c['steps']} timed steps per run, batch {c['batch_size']}, "
        f"{c['train_limit'] or 60_000:,} examples; the transform {data['transform_ms_per_example']:.3f} ms per "
        f"example before the runs ({', '.join(f'{ms:.3f}' for ms in data['transform_ms_per_example_by_round'])} "
        f"before each round), the model's step {data['model_step_ms']:.1f} ms; CREST's service: {data['service']}. "
        "Medians over the rounds; the input wait share is the training thread's time getting batches over the step, "
        "CREST's model passes excluded.",
        "",
    ]
    head = ["arm", "W", "batches/s", "input wait share", "input misses", "passes fetched ahead", "fallback batches"]
    head.append("CREST passes s")
    rows = []
    for arm, by_workers in data["medians"].items():
        for w, m in by_workers.items():
            passes = m["embed_s"] + m["fit_s"] + m["check_s"]
            rows.append(
                [
                    arm,
                    w,
                    f"{m['batches_per_s']:.2f}",
                    f"{100 * m['input_wait_share']:.1f}%",
                    f"{m['input_misses']:.0f}",
                    "-" if arm != "crest" or "passes_ahead" not in m else f"{m['passes_ahead']:.0f}",
                    f"{m['fallback_batches']:.0f}",
                    "-" if arm != "crest" else f"{passes:.2f}",
                ]
            )
    lines += _table(head, rows)
    ratios = data["uniform_to_plain_batches_per_s"]
    lines += _table(
        ["W", "uniform / plain batches/s (ratio of medians)", "median of the per-round ratios"],
        [[w, f"{r['ratio_of_medians']:.3f}", f"{r['median_paired']:.3f}"] for w, r in ratios.items()],
    )
    for t in data["targets"].values():
        lines.append(f"- {t['target']}: **{'met' if t['met'] else 'not met'}**")
    return [*lines, ""]


def _generic(path: Path, data: dict[str, Any]) -> list[str]:
    keys = ", ".join(f"`{k}`" for k in data)
    return [f"No table for this family yet; its top-level fields: {keys}.", ""]


# --- the families and their pages -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Family:
    slug: str  # the page: results/<slug>.md
    title: str
    pattern: str  # glob under benchmarks/results/
    about: str  # what it measures and how to run it
    render: Callable[[Path, dict[str, Any]], list[str]]
    overview: Callable[[list[tuple[Path, dict[str, Any]]]], list[str]] | None = None


_FRONTIER_ABOUT = (
    "Every method trained from scratch at budgets of 5-50% of a 10-epoch run, each with its cosine schedule sized "
    "to its own steps, on the same two cores, seeds paired (the protocol: [how results are measured]"
    "(methods.md#the-budget-frontier)). Run from a checkout with `python -m experiments.frontier`; the command of "
    "each file is below its tables."
)
FAMILIES = [
    Family(
        "payoff",
        "Does selection pay? The payoff on the frontier",
        "frontier_payoff_*.json",
        "Full data, CREST, CREST measuring its payoff and CREST governed by it (`LoaderConfig.payoff`, "
        "[the concept](../concepts/payoff.md)) on the budget frontier's protocol, without the E-epoch run "
        "(`python -m experiments.frontier --no-e-run --methods full,crest,crest-measure,crest-govern`).",
        _payoff_frontier,
    ),
    Family(
        "frontier-clean",
        "Budget frontier: Fashion-MNIST",
        "frontier_clean*.json",
        _FRONTIER_ABOUT,
        _frontier,
        _frontier_overview,
    ),
    Family(
        "frontier-long-tailed",
        "Budget frontier: long-tailed Fashion-MNIST",
        "frontier_longtail*.json",
        _FRONTIER_ABOUT + " Scored by the mean per-class accuracy on the balanced test set.",
        _frontier,
        _frontier_overview,
    ),
    Family(
        "demo",
        "The demo",
        "demo_*.json",
        "`make demo` (`crest bench train --demo`): full data and CREST for 1,000 steps, one seed.",
        _demo,
    ),
    Family(
        "examples",
        "The examples at their defaults",
        "examples_*.json",
        "The Hugging Face and Lightning examples against their plain versions (`examples/`), train time per run.",
        _examples,
    ),
    Family(
        "integrations",
        "Integration overhead",
        "integrations_*.json",
        "`crest bench integrations`: each framework's own loop, the integration on uniform batches and on CREST "
        "coresets, in interleaved blocks ([the guide's summary](../guides/lightning.md#overhead)).",
        _integrations,
    ),
    Family(
        "dataloading",
        "Input pipeline",
        "dataloading_*.json",
        "`crest bench dataloading`: a plain `DataLoader`, `CoresetLoader` on uniform batches and `CoresetLoader` with "
        "CREST, at 0, 1 and 2 DataLoader workers, on Fashion-MNIST behind a CPU-heavy per-example transform "
        "(`benchmarks/dataloading.py`).",
        _dataloading,
    ),
    Family(
        "gpu-check",
        "GPU check",
        "gpu_check_*.json",
        "`python -m crest_bench.gpu_check` on a GPU machine ([the GPU guide](../guides/gpu.md)).",
        _generic,
    ),
]


def families() -> list[tuple[Family, list[Path]]]:
    """Each family with its files (sorted), the families with none left out; files no family claims go to an
    "other" family, so every committed result is published."""
    claimed: set[Path] = set()
    out = []
    for fam in FAMILIES:
        files = [p for p in sorted(RESULTS.glob(fam.pattern)) if p not in claimed]
        claimed.update(files)
        if files:
            out.append((fam, files))
    rest = [p for p in sorted(RESULTS.glob("*.json")) if p not in claimed]
    if rest:
        out.append((Family("other", "Other results", "*.json", "Results no family above claims.", _generic), rest))
    return out


def family_page(fam: Family, files: list[Path]) -> str:
    loaded = [(p, load(p)) for p in files]
    lines = [
        f"# {fam.title}",
        "",
        "<!-- Generated by docs/_gen/results.py from benchmarks/results/ at build time. -->",
        "",
        fam.about,
        "",
    ]
    if fam.overview:
        lines += fam.overview(loaded)
    for path, data in loaded:
        entry = CATALOG.get(path.name)
        lines += [
            f"## {path.name} {{#{path.stem}}}",
            "",
            f"- **Date**: {date_of(path, data)}",
            f"- **Machine**: {machine_of(path, data)}",
            f"- **Raw JSON**: [{path.name}](data/{path.name}) (`benchmarks/results/{path.name}`)",
        ]
        if entry and entry.research:
            lines.append(f"- **Reported in**: [{entry.research}](../{entry.research})")
        lines.append("")
        lines += fam.render(path, data)
    return "\n".join(lines) + "\n"


def index_page(found: list[tuple[Family, list[Path]]]) -> str:
    lines = [
        "# Results",
        "",
        "<!-- Generated by docs/_gen/results.py from benchmarks/results/ at build time. -->",
        "",
        "Every committed measurement, one page per family, built from the JSON files under `benchmarks/results/` "
        "when the site builds. Each file gives its machine and date. What they mean for adopting CREST: "
        "[when it helps](../when-it-helps.md); how they are measured: [methods](methods.md). Two benchmarks whose "
        "runs were not committed as JSON are narrated on their own pages: [the selection engine against its "
        "peers](facility-location.md) and [the service's overhead](service-overhead.md).",
        "",
    ]
    rows = []
    for fam, files in found:
        dates = sorted(date_of(p, load(p)) for p in files)
        span = dates[0] if dates[0] == dates[-1] else f"{dates[0]} to {dates[-1]}"
        rows.append([f"[{fam.title}]({fam.slug}.md)", str(len(files)), span])
    lines += _table(["family", "files", "dates"], rows)
    return "\n".join(lines) + "\n"


def pages() -> dict[str, str]:
    """{path under docs/: Markdown} of every results page."""
    found = families()
    out = {"results/index.md": index_page(found)}
    for fam, files in found:
        out[f"results/{fam.slug}.md"] = family_page(fam, files)
    return out


def copies() -> dict[str, Path]:
    """{path under docs/: source file} of the raw JSONs the pages link to."""
    return {f"{DATA}/{p.name}": p for p in sorted(RESULTS.glob("*.json"))}


# --- the adoption table of docs/when-it-helps.md ---------------------------------------------------------------------

# (task, the committed frontiers it is measured by), in the table's order.
ADOPTION = [
    ("Fashion-MNIST", ["frontier_clean_reuse_loss02.json", "frontier_clean_reuse_loss02_epyc.json"]),
    ("long-tailed Fashion-MNIST", ["frontier_longtail_reuse_loss02.json", "frontier_longtail_reuse_loss02_epyc.json"]),
]


def adoption_table() -> str:
    """The table of docs/when-it-helps.md: per task, machine and target, CREST's speedup against full data and
    random batches and the other methods' against full data (a test holds the page's copy equal to this)."""
    rows = []
    for task, names in ADOPTION:
        for name in names:
            path = RESULTS / name
            data = load(path)
            cpu = _cpu(path, data)
            for t in data["summary"]["targets"]:
                full, rand = t["speedup_vs_full"], t["speedup_vs_random"]
                if full.get("full") is None:  # full data never reaches it: no speedup against it to give
                    continue
                rows.append(
                    [
                        task,
                        f"[{cpu}](results/{'frontier-clean' if 'clean' in name else 'frontier-long-tailed'}.md"
                        f"#{path.stem})",
                        f"{t['name']} ({t['accuracy']:.4f})",
                        _x(full.get("crest")),
                        _x(rand.get("crest")),
                        _x(full.get("infobatch")),
                        _x(full["balanced"]) if "balanced" in full else "-",
                    ]
                )
    head = [
        "task",
        "CPU",
        "target (accuracy)",
        "CREST vs full data",
        "CREST vs random",
        "InfoBatch vs full",
        "balanced vs full",
    ]
    return "\n".join(_table(head, rows)).rstrip() + "\n"
