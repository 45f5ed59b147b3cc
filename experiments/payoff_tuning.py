"""How the payoff's schedule and decision window were chosen (``LoaderConfig.payoff_burst``, ``payoff_window``).

Input: frontier runs of ``crest-measure`` with a measurement every 4 segments, the densest schedule (on the
validation split, seeds other than the reported ones), e.g.::

    python -m experiments.frontier --eval validation --first-seed 3 --seeds 1 --no-e-run --budgets 0.3 \\
        --methods full,crest-measure --service-backend local --crest-payoff-every 4 --out dense_clean.json
    python -m experiments.payoff_tuning dense_clean.json dense_noisy.json ... --out payoff_tuning.json

Every sparser schedule is a subsequence of the dense one: the first ``burst`` measurements, then every ``stride``-th
(a measurement every ``4 x stride`` segments). For each schedule and window (the last ``w`` measurements, or all of
them: ``0``) this replays the governor's reading after each measurement, ``trainer_client.payoff.estimate`` on the
measured pairs and the run's own costs, and writes the verdicts as a string: ``P`` pays, ``L`` loses, ``.``
undetermined. A schedule that never says ``L`` on a task where selection pays, and says it early where it loses, is
the one to keep. (A sparser schedule trains fewer control steps than the dense run did; the replay ignores that.)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from trainer_client.payoff import ArmCosts, Pair, estimate

BURSTS = (2, 3, 4)
STRIDES = (2, 3)
WINDOWS = (2, 3, 4, 0)
CODE = {"pays": "P", "loses": "L", "undetermined": "."}


def replay(pairs: list[Pair], costs: ArmCosts, burst: int, stride: int, window: int) -> tuple[list[int], str]:
    """(the dense measurements kept, the verdict after each kept measurement from the second on)."""
    kept = list(range(min(burst, len(pairs)))) + list(range(burst - 1 + stride, len(pairs), stride))
    sub = [pairs[i] for i in kept]
    verdicts = ""
    for k in range(2, len(sub) + 1):
        e = estimate(sub[max(0, k - window) : k] if window else sub[:k], costs)
        verdicts += "." if e is None else CODE[e.verdict()]
    return kept, verdicts


def task(path: Path) -> dict[str, Any]:
    """One dense frontier file: its runs' accuracies and measurements, and every schedule's replayed verdicts."""
    doc = json.loads(path.read_text())
    (run,) = [r for r in doc["runs"] if r["detail"].get("payoff_state")]
    governor = run["detail"]["payoff_state"]["governor"]
    pairs = [Pair(*p) for p in governor["pairs"]]
    costs = ArmCosts(**governor["costs"])
    schedules = {}
    for burst in BURSTS:
        for stride in STRIDES:
            for window in WINDOWS:
                kept, verdicts = replay(pairs, costs, burst, stride, window)
                schedules[f"burst {burst}, every {4 * stride} segments, window {window or 'all'}"] = {
                    "measurements": kept,
                    "verdicts": verdicts,
                }
    return {
        "command": doc["command"],
        "dataset": doc["dataset"],
        "evaluation": doc["evaluation"],
        "accuracy": {r["method"]: r["accuracy"] for r in doc["runs"]},
        "wall_s": {r["method"]: r["wall_s"] for r in doc["runs"]},
        "payoff": run["detail"]["payoff"],
        "pairs_per_step_e3": [[round(p.selection * 1e3, 3), round(p.control * 1e3, 3)] for p in pairs],
        "seconds_per_step": costs.per_step(),
        "schedules": schedules,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.payoff_tuning", description=__doc__.split("\n\n")[0])
    p.add_argument("dense", nargs="+", type=Path, help="frontier --out JSONs of dense crest-measure runs")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--date", required=True, help="the runs' date (ISO), recorded in the JSON")
    args = p.parse_args(argv)
    doc = {
        "command": "python -m experiments.payoff_tuning " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": args.date,
        "tasks": {path.stem: task(path) for path in args.dense},
    }
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
