"""How the payoff's schedule and decision window were chosen (``LoaderConfig.payoff_burst``, ``payoff_window``).

Input: frontier runs of ``crest-measure`` with a measurement every 4 segments, the densest schedule (on the
validation split, seeds other than the reported ones), e.g.::

    python -m experiments.frontier --eval validation --first-seed 3 --seeds 1 --no-e-run --budgets 0.3 \\
        --methods full,crest-measure --service-backend local --crest-payoff-every 4 --out dense_clean.json
    python -m experiments.payoff_tuning dense_clean.json dense_noisy.json ... --out payoff_tuning.json

Every sparser schedule is a subsequence of the dense one. Two kinds are replayed:

- *fixed*: the first ``burst`` measurements, then every ``stride``-th (a measurement every ``4 x stride``
  segments), for each decision window (the last ``w`` measurements, or all of them: ``0``);
- *adaptive* (the loader's since version 4 of the governor's state): the next measurement is the next dense one
  while fewer than 2 are kept or the kept ones lean toward a move (``trainer_client.payoff.lean`` below 0), at
  most ``burst`` times; otherwise the ``stride``-th; the window is all of them.

For each it replays the governor's reading after each kept measurement, ``trainer_client.payoff.estimate`` on the
measured pairs and the run's own costs, and writes the verdicts as a string (``P`` pays, ``L`` loses, ``.``
undetermined, ``-`` before 2 measurements), the step of the first ``L`` (a dense measurement ``i`` ends at step
``(4 i + 4) L``, ``L`` the run's segment length), and how many kept measurements end by step 480 (the control's
share of a short run). A schedule that never says ``L`` on a task where selection pays, says it early where it
loses, and keeps few measurements where it pays is the one to keep. (A sparser schedule trains fewer control steps
than the dense run did, and the adaptive replay reads the run's final costs; the replay ignores both.)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from trainer_client.payoff import ArmCosts, Pair, estimate, lean

BURSTS = (2, 3, 4)
STRIDES = (2, 3)
WINDOWS = (2, 3, 4, 0)
ADAPTIVE_BURSTS = (2, 3, 4, 5)
CODE = {"pays": "P", "loses": "L", "undetermined": "."}
DENSE_SEGMENTS = 4


def verdicts(pairs: list[Pair], costs: ArmCosts, kept: list[int], window: int) -> str:
    """The verdict after each kept measurement (``-`` before the second)."""
    out = "-"
    for k in range(2, len(kept) + 1):
        sub = [pairs[i] for i in kept[:k]]
        e = estimate(sub[-window:] if window else sub, costs)
        out += "." if e is None else CODE[e.verdict()]
    return out


def fixed(n: int, burst: int, stride: int) -> list[int]:
    """The dense measurements a fixed schedule keeps."""
    return list(range(min(burst, n))) + list(range(burst - 1 + stride, n, stride))


def adaptive(pairs: list[Pair], costs: ArmCosts, burst: int, stride: int) -> list[int]:
    """The dense measurements the adaptive schedule keeps (read before any move: the replay does not move)."""
    kept, dense = [0], 0
    while True:
        close = dense < burst and (len(kept) < 2 or lean([pairs[i] for i in kept], costs) < 0)
        dense += close
        nxt = kept[-1] + (1 if close else stride)
        if nxt >= len(pairs):
            return kept
        kept.append(nxt)


def summary(pairs: list[Pair], costs: ArmCosts, kept: list[int], window: int, segment_steps: int) -> dict[str, Any]:
    v = verdicts(pairs, costs, kept, window)
    end = [segment_steps * (DENSE_SEGMENTS * i + 4) for i in kept]  # a kept measurement's last step
    first_loss = next((end[k] for k, c in enumerate(v) if c == "L"), None)
    return {
        "measurements": kept,
        "verdicts": v,
        "first_loses_at_step": first_loss,
        "measurements_by_step_480": sum(1 for e in end if e <= 480),
    }


def run_schedules(pairs: list[Pair], costs: ArmCosts, segment_steps: int) -> dict[str, Any]:
    schedules = {}
    for burst in BURSTS:
        for stride in STRIDES:
            for window in WINDOWS:
                name = f"fixed: burst {burst}, every {DENSE_SEGMENTS * stride} segments, window {window or 'all'}"
                schedules[name] = summary(pairs, costs, fixed(len(pairs), burst, stride), window, segment_steps)
    for burst in ADAPTIVE_BURSTS:
        for stride in STRIDES:
            name = f"adaptive: burst {burst}, every {DENSE_SEGMENTS * stride} segments, window all"
            schedules[name] = summary(pairs, costs, adaptive(pairs, costs, burst, stride), 0, segment_steps)
    return schedules


def task(path: Path) -> dict[str, Any]:
    """One dense frontier file: each seed's accuracies, measurements, and every schedule's replayed verdicts."""
    doc = json.loads(path.read_text())
    seeds = {}
    for run in doc["runs"]:
        state = run["detail"].get("payoff_state")
        if not state:
            continue
        governor = state["governor"]
        pairs = [Pair(*p) for p in governor["pairs"]]
        costs = ArmCosts(**governor["costs"])
        length = int(governor["settings"][1])  # the run's L (settings: mode, segment_steps, every, ...)
        seeds[str(run["seed"])] = {
            "accuracy": {r["method"]: r["accuracy"] for r in doc["runs"] if r["seed"] == run["seed"]},
            "payoff": run["detail"]["payoff"],
            "pairs_per_step_e3": [[round(p.selection * 1e3, 3), round(p.control * 1e3, 3)] for p in pairs],
            "seconds_per_step": costs.per_step(),
            "segment_steps": length,
            "schedules": run_schedules(pairs, costs, length),
        }
    if not seeds:
        raise ValueError(f"{path} has no run with a payoff state (crest-measure with payoff on)")
    return {"commands": [doc["command"]], "dataset": doc["dataset"], "evaluation": doc["evaluation"], "seeds": seeds}


def merged(paths: list[Path]) -> dict[str, Any]:
    """The tasks of ``paths``, one per file name (``dense_noisy``): files of one name (other seeds) merged."""
    tasks: dict[str, Any] = {}
    for path in paths:
        one = task(path)
        if path.stem not in tasks:
            tasks[path.stem] = one
            continue
        into = tasks[path.stem]
        if into["dataset"] != one["dataset"] or set(into["seeds"]) & set(one["seeds"]):
            raise ValueError(f"{path} is another task than the {path.stem} before it, or repeats a seed of it")
        into["commands"] += one["commands"]
        into["seeds"] |= one["seeds"]
    return tasks


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.payoff_tuning", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "dense", nargs="+", type=Path, help="frontier --out JSONs of dense crest-measure runs (one name per task)"
    )
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--date", required=True, help="the runs' date (ISO), recorded in the JSON")
    args = p.parse_args(argv)
    doc = {
        "command": "python -m experiments.payoff_tuning " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": args.date,
        "tasks": merged(args.dense),
    }
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
