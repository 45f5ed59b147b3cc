"""Embedding off the trainer's critical path: what the second core buys CREST on this machine (issue 15, point 4).

    python -m experiments.offload          # the clean frontier's round: 3,000 candidates every 20 steps, 5 repetitions
    python -m experiments.offload --quick  # the test suite's: 2,000 examples, batches of 32, one repetition

CREST's step is a training step plus its share of the round's no-grad embedding pass. On a machine whose cores
the trainer already uses, the pass can either run on the training thread (``inline``, what the loader does) or on
a second thread with a snapshot of the weights, while the trainer trains on the cores that are left
(``offloaded``: an embedding worker on the spare core). The second wins only if the trainer loses less by giving
up a core than the pass costs on the critical path. Each repetition runs, in a rotating order, on the same model,
data and batch assembly (``train_data.fetch``):

- ``baseline``: training steps alone on ``threads`` intra-op threads (what full data and random batches do);
- ``baseline, 1 thread``: the same on one thread (what the trainer keeps when a core embeds);
- ``inline``: every round, the embedding pass over the round's candidates (``LoaderConfig.embed_dtype``'s
  bfloat16 autocast, 256 a batch, the logit-gradient embedding and the per-example loss), then
  ``steps_per_round`` training steps, all on ``threads`` threads;
- ``offloaded``: one intra-op thread for each of two Python threads (torch's kernels release the GIL, so they
  run on two cores): at the start of each round the worker copies the weights and embeds the next round's
  candidates while the trainer trains the round's steps; the trainer waits at the round's end for any of them
  still missing (the service needs them to select the next coresets). The snapshot is ``steps_per_round`` steps
  old when its coresets start training;
- ``offloaded, shared``: the same with ``threads`` intra-op threads for each (the worker's kernels compete with
  the trainer's for every core, as an embedding worker does that nobody pinned).

Prints the median ms per step of each and its ratio to ``baseline``, and writes JSON.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import copy
import itertools
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from crest_bench.report import machine, write_json
from crest_bench.train_data import DEFAULT_HOOK, BenchData, fetch, load_data
from crest_bench.train_methods import BenchConfig, full_batches
from experiments._main import run_main
from trainer_client.batches import Embedder, default_forward
from trainer_client.embeddings import per_example_loss


@dataclass(frozen=True, kw_only=True)
class OffloadConfig:
    """One measurement."""

    # Dataset hook (benchmarks/train_data.py), its --data-dir, and the first N training examples (None: all).
    dataset: str = DEFAULT_HOOK
    data_dir: str | None = None
    train_limit: int | None = None
    # A round as the clean frontier's CREST draws it: 10 subsets of r = 0.5% of 60,000, every 20 steps
    # (1.17 candidates embedded per trained example).
    candidates: int = 3000
    steps_per_round: int = 20
    rounds: int = 8
    repetitions: int = 5
    # crest bench train's batch and SGD; the embedding pass's batch (LoaderConfig.embed_batch_size).
    batch_size: int = BenchConfig.batch_size
    lr: float = BenchConfig.lr
    momentum: float = BenchConfig.momentum
    weight_decay: float = BenchConfig.weight_decay
    embed_batch_size: int = 256
    # Intra-op threads of the baseline and inline runs: every core of this machine.
    threads: int = 2
    seed: int = 0


QUICK = {
    "train_limit": 2000,
    "candidates": 200,
    "steps_per_round": 4,
    "rounds": 2,
    "repetitions": 1,
    "batch_size": 32,
    "embed_batch_size": 64,
}


class _Run:
    """A model, its optimizer and the two streams of ids (training batches, round candidates) of one timed run."""

    def __init__(self, config: OffloadConfig, data: BenchData) -> None:
        self.config, self.data = config, data
        torch.manual_seed(config.seed)
        self.model = data.model()
        self.opt = torch.optim.SGD(
            self.model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
        )
        n = len(data.train)  # type: ignore[arg-type]
        self.batches = full_batches(n, config.batch_size, config.seed)
        self.candidates: Iterator[np.ndarray] = (
            np.random.default_rng([config.seed, 11, r]).choice(n, config.candidates, replace=False)
            for r in itertools.count()
        )

    def train(self, steps: int) -> None:
        for _ in range(steps):
            ids, _ = next(self.batches)
            x, y = fetch(self.data.train, ids)
            loss = F.cross_entropy(self.model(x), y)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()

    def passes(self, model: torch.nn.Module) -> _EmbeddingPass:
        """The embedding pass on ``model`` (the one being trained, or a snapshot of it), in bfloat16,
        ``embed_batch_size`` a batch."""
        return _EmbeddingPass(model, self.data, self.config.embed_batch_size)


class _EmbeddingPass:
    """The loader's round embedding pass as this study timed it (2026-11-30), from the client's public parts: the
    model in eval mode under no_grad, the forward under bfloat16 autocast with float32 logits, the logit-gradient
    embedding and the per-example loss, one copy to the host at the end."""

    def __init__(self, model: torch.nn.Module, data: BenchData, batch_size: int) -> None:
        self.model, self.data, self.batch_size = model, data, batch_size
        self.embedder = Embedder("logit_gradient")
        self.rows: tuple[np.ndarray, np.ndarray] | None = None

    def _forward(self, model: torch.nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits, targets = default_forward(model, batch)
        return logits.float(), targets

    @torch.no_grad()
    def embed_round(self, ids: np.ndarray) -> int:
        """Embed ``ids`` (int64 (n,)); returns how many were embedded."""
        was_training = self.model.training
        self.model.eval()
        embs, losses = [], []
        try:
            for lo in range(0, len(ids), self.batch_size):
                batch = fetch(self.data.train, ids[lo : lo + self.batch_size])
                emb, y, logits = self.embedder(self.model, batch, self._forward)
                embs.append(emb.float())
                losses.append(per_example_loss(logits, y))
        finally:
            self.model.train(was_training)
        self.rows = (torch.cat(embs).numpy(), torch.cat(losses).numpy())  # the copy to the host, as the loader's
        return len(ids)


def _baseline(run: _Run) -> dict[str, float]:
    run.train(run.config.rounds * run.config.steps_per_round)
    return {}


def _inline(run: _Run) -> dict[str, float]:
    passes = run.passes(run.model)
    for _ in range(run.config.rounds):
        passes.embed_round(next(run.candidates))
        run.train(run.config.steps_per_round)
    return {}


def _offloaded(run: _Run) -> dict[str, float]:
    """Trainer on this thread, the embedding worker on another; returns the trainer's wait per round (ms)."""
    jobs: queue.Queue[dict[str, torch.Tensor] | None] = queue.Queue()
    done: queue.Queue[int | BaseException] = queue.Queue()
    snapshot = copy.deepcopy(run.model)
    passes = run.passes(snapshot)

    def worker() -> None:
        try:
            while (weights := jobs.get()) is not None:
                snapshot.load_state_dict(weights)
                done.put(passes.embed_round(next(run.candidates)))
        except BaseException as e:  # re-raised on the trainer's thread
            done.put(e)

    thread = threading.Thread(target=worker, name="embedding-worker", daemon=True)
    thread.start()
    waited = 0.0
    try:
        for _ in range(run.config.rounds):
            jobs.put({k: v.detach().clone() for k, v in run.model.state_dict().items()})
            run.train(run.config.steps_per_round)
            t = time.perf_counter()
            result = done.get()
            waited += time.perf_counter() - t
            if isinstance(result, BaseException):
                raise result
    finally:
        jobs.put(None)
        thread.join()
    return {"wait_ms_per_round": waited / run.config.rounds * 1e3}


# Each mode's timed body; "baseline, 1 thread" and "offloaded" run on one intra-op thread (``_timed``).
MODES: dict[str, Callable[[_Run], dict[str, float]]] = {
    "baseline": _baseline,
    "baseline, 1 thread": _baseline,
    "inline": _inline,
    "offloaded": _offloaded,
    "offloaded, shared": _offloaded,
}


def _timed(config: OffloadConfig, data: BenchData, mode: str) -> dict[str, float]:
    """One run of ``mode`` after a short warm-up of both passes; ms per training step and the mode's extras."""
    threads = 1 if mode in ("baseline, 1 thread", "offloaded") else config.threads
    torch.set_num_threads(threads)
    run = _Run(config, data)
    run.train(3)
    run.passes(run.model).embed_round(next(run.candidates)[: config.embed_batch_size])
    t = time.perf_counter()
    extra = MODES[mode](run)
    ms = (time.perf_counter() - t) / (config.rounds * config.steps_per_round) * 1e3
    return {"ms_per_step": ms, "threads": threads, **extra}


def measure(config: OffloadConfig) -> dict[str, Any]:
    """Every mode once per repetition, the order rotated; medians over the repetitions."""
    data = load_data(config.dataset, config.data_dir, config.train_limit, None)
    n = len(data.train)  # type: ignore[arg-type]
    if config.candidates > n:
        raise SystemExit(f"--candidates {config.candidates} is more than the {n} training examples")
    runs: dict[str, list[dict[str, float]]] = {m: [] for m in MODES}
    for rep in range(config.repetitions):
        names = list(MODES)
        for mode in names[rep % len(names) :] + names[: rep % len(names)]:
            runs[mode].append(_timed(config, data, mode))
    median = {m: float(np.median([r["ms_per_step"] for r in runs[m]])) for m in MODES}
    base = median["baseline"]
    summary: dict[str, Any] = {m: {"ms_per_step": median[m], "over_baseline": median[m] / base} for m in MODES}
    for m in ("offloaded", "offloaded, shared"):
        summary[m]["wait_ms_per_round"] = float(np.median([r["wait_ms_per_round"] for r in runs[m]]))
    summary["second_thread_speedup"] = median["baseline, 1 thread"] / base
    summary["embedding_ms_per_step_inline"] = median["inline"] - base
    return {"config": asdict(config), "runs": runs, "summary": summary}


def table(result: dict[str, Any]) -> str:
    s, c = result["summary"], result["config"]
    per_trained = c["candidates"] / (c["steps_per_round"] * c["batch_size"])
    lines = [
        f"{c['candidates']} candidates every {c['steps_per_round']} steps ({per_trained:.2f} per trained example), "
        f"median of {c['repetitions']}",
        "| run | ms per step | over baseline |",
        "|---|---|---|",
    ]
    for m in MODES:
        lines.append(f"| {m} | {s[m]['ms_per_step']:.1f} | {s[m]['over_baseline']:.3f} |")
    lines.append(
        f"the second thread speeds training {s['second_thread_speedup']:.2f}x; inline embedding costs "
        f"{s['embedding_ms_per_step_inline']:.1f} ms a step; offloaded, the trainer waits "
        f"{s['offloaded']['wait_ms_per_round']:.1f} ms a round "
        f"(shared: {s['offloaded, shared']['wait_ms_per_round']:.1f})"
    )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """``python -m experiments.offload``: measure, print the table, write JSON."""
    config = OffloadConfig(**QUICK) if args.quick else OffloadConfig()  # type: ignore[arg-type]
    given = {
        "dataset": args.dataset,
        "data_dir": args.data_dir,
        "candidates": args.candidates,
        "steps_per_round": args.steps_per_round,
        "rounds": args.rounds,
        "repetitions": args.repetitions,
    }
    config = replace(config, **{k: v for k, v in given.items() if v is not None})
    if min(config.candidates, config.steps_per_round, config.rounds, config.repetitions) < 1:
        raise SystemExit(
            "--candidates, --steps-per-round, --rounds and --repetitions must be >= 1; received "
            f"{config.candidates}, {config.steps_per_round}, {config.rounds}, {config.repetitions}"
        )
    result = {**machine(), "argv": getattr(args, "argv", None), **measure(config)}
    print(table(result))
    out = Path(args.out)
    write_json(out, result)
    print(f"wrote {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The flags of ``python -m experiments.offload``."""
    p = argparse.ArgumentParser(
        prog="python -m experiments.offload",
        description="Time training steps alone (on every core and on one), CREST's step with the round's "
        "embedding pass on the training thread, and the same with the pass on a second thread using a snapshot "
        "of the weights while the trainer keeps one core. See experiments/offload.py.",
    )
    p.add_argument("--quick", action="store_true", help="2,000 examples, batches of 32, one repetition")
    p.add_argument("--candidates", type=int, default=None, help="candidates embedded per round (default 3000)")
    p.add_argument("--steps-per-round", type=int, default=None, help="training steps per round (default 20)")
    p.add_argument("--rounds", type=int, default=None, help="rounds per timed run (default 8)")
    p.add_argument("--repetitions", type=int, default=None, help="runs of each mode, order rotated (default 5)")
    p.add_argument("--dataset", default=None, help="dataset hook MODULE:FUNCTION (default Fashion-MNIST)")
    p.add_argument("--data-dir", default=None, help="directory with the Fashion-MNIST files")
    p.add_argument("--out", default="results/offload.json", help="JSON output path")
    return p


def main(argv: list[str] | None = None) -> int:
    """``python -m experiments.offload [flags]``, from the root of a checkout."""
    return run_main(build_parser, run, argv)


if __name__ == "__main__":
    sys.exit(main())
