"""End to end: the real server on a free loopback port, selecting on real Ray actor processes, and real torch
training on Fashion-MNIST through the real client."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterable, Iterator
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
from loader_settings import loader_settings

from selector_service.server import RunningServer, ServerConfig, start_server
from trainer_client.client import RoundPlan, SelectionClient, WeightedBatch
from trainer_client.loader_config import LoaderConfig
from trainer_client.train import TrainConfig, train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_server() -> Iterator[RunningServer]:
    running = start_server(ServerConfig(port=0, backend="ray", num_workers=2, cpus_per_worker=0.5))
    yield running
    running.stop(grace=0)


class RecordingClient(SelectionClient):
    """The real client, keeping a copy of every plan and batch it receives."""

    def __init__(self, target: str) -> None:
        super().__init__(target, timeout_s=120)
        self.plans: dict[int, RoundPlan] = {}
        self.batches: list[WeightedBatch] = []

    def start_round(self, session_id: str, round_id: int, trainer_step: int, **kwargs: Any) -> RoundPlan:
        plan = super().start_round(session_id, round_id, trainer_step, **kwargs)
        self.plans[round_id] = plan
        return plan

    def stream_batches(self, session_id: str, round_id: int, received: Iterable[int] = ()) -> Iterator[WeightedBatch]:
        for b in super().stream_batches(session_id, round_id, received):
            self.batches.append(b)
            yield b


def test_selection_runs_on_ray_actor_processes(ray_server: RunningServer) -> None:
    labels = np.random.default_rng(0).integers(0, 10, size=5000)
    with SelectionClient(ray_server.target, timeout_s=120) as client:
        sid = client.create_session(labels, subset_fraction=0.02, num_subsets=4, batch_size=30).session_id
        plan = client.start_round(sid, 0, 0)
        emb = np.random.default_rng(1).normal(size=(len(plan.ids), 10)).astype(np.float32)
        client.submit_embeddings(sid, 0, plan.ids, emb)
        batches = list(client.stream_batches(sid, 0))
    assert sorted(b.subset_index for b in batches) == [0, 1, 2, 3]
    workers = {b.worker for b in batches}
    assert all(w.startswith("selector-") for w in workers)
    pids = {int(w.split(":", 1)[1].split("/", 1)[0]) for w in workers}
    assert os.getpid() not in pids  # other processes: Ray actors
    for b in batches:
        assert np.isin(b.ids, plan.ids).all() and (b.weights > 0).all()


def test_training_through_the_service_learns_from_valid_batches(ray_server: RunningServer) -> None:
    config = TrainConfig(
        steps=150,
        lr=0.05,
        train_limit=6000,
        test_limit=2000,
        log_every=0,
        loader=loader_settings(
            batch_size=64, subset_fraction=0.05, num_subsets=3, steps_per_round=30, lookahead_steps=5
        ),
    )
    with RecordingClient(ray_server.target) as client:
        result = train(config, client)
    assert result.steps == 150
    assert result.test_accuracy > 0.6, result  # chance is 0.1
    assert result.rounds >= 5 and len(client.batches) >= 3 * (result.rounds - 1)
    assert result.examples_backpropagated == 150 * 64
    subsets_of = {r: set(p.ids.tolist()) for r, p in client.plans.items()}
    for b in client.batches:
        assert ((b.ids >= 0) & (b.ids < 6000)).all()
        assert set(b.ids.tolist()) <= subsets_of[b.round_id]  # drawn from that round's random subsets
        assert len(np.unique(b.ids)) == len(b.ids) == 64
        assert (b.weights > 0).all() and np.isfinite(b.weights).all()


def test_crest_demo_command_runs_end_to_end() -> None:
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "RAY_AUTH_MODE": "disabled"}
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "crest_bench.cli",
            "--log-level",
            "WARNING",
            "demo",
            "--steps",
            "60",
            "--train-limit",
            "3000",
            "--test-limit",
            "1000",
            "--batch-size",
            "32",
            "--subset-fraction",
            "0.05",
            "--steps-per-round",
            "20",
            "--payoff",
            "measure",
            "--payoff-segment-steps",
            "4",
            "--payoff-every",
            "4",
            "--payoff-control-scale",
            "1",
            "--probe-examples",
            "200",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "test accuracy" in out.stdout and "examples back-propagated" in out.stdout
    assert "1,920" in out.stdout  # 60 steps x 32 examples
    accuracy = float(next(line for line in out.stdout.splitlines() if "test accuracy" in line).split()[-1])
    assert accuracy > 0.3, out.stdout
    # The payoff: measurements of 12 steps every 16 from step 4 (4 control steps each): 3 done by step 60, 1 open.
    row = {k.strip(): v.strip() for k, v in (x.rsplit("  ", 1) for x in out.stdout.splitlines() if "  " in x)}
    assert "(3 measurements" in row["payoff"] and "; probes took" in row["payoff"], out.stdout
    assert row["control steps / probe time"].startswith("16 / "), out.stdout


TUNED = [
    "--coreset-weights",
    "uniform",
    "--joint-selection",
    "--embed-dtype",
    "bfloat16",
    "--embedding-max-age",
    "20",
    "--learned-embedding-max-age",
    "100",
    "--learned-embedding-loss",
    "0.2",
    "--training-logits",
]


def _train_args(*flags: str) -> Any:
    import argparse

    from trainer_client.cli import add_train_flags

    parser = argparse.ArgumentParser()
    add_train_flags(parser)
    return parser.parse_args(list(flags), argparse.Namespace(command="train"))


def test_train_flags_reach_the_loader_config() -> None:
    from trainer_client.cli import train_config

    loader = train_config(_train_args(*TUNED)).loader
    assert (loader.coreset_weights, loader.joint_selection, loader.embed_dtype) == ("uniform", True, "bfloat16")
    assert (loader.embedding_max_age, loader.learned_embedding_max_age, loader.learned_embedding_loss) == (20, 100, 0.2)
    assert loader.training_logits and not train_config(_train_args()).loader.training_logits
    governed = train_config(_train_args("--payoff", "govern", "--payoff-window", "3", "--probe-examples", "300"))
    assert (governed.loader.payoff, governed.loader.payoff_window, governed.probe_examples) == ("govern", 3, 300)
    default = train_config(_train_args()).loader
    assert default == replace(LoaderConfig(), client_name="crest-train")  # the recommended recipe
    released = train_config(_train_args("--recipe", "released")).loader
    assert (released.coreset_weights, released.joint_selection, released.embed_dtype) == ("cluster", False, "float32")
    assert (released.embedding_max_age, released.learned_embedding_max_age) == (0, 0)
    assert released.region.mode == "crest" and released.describe() == "recipe released"
    fixed = train_config(_train_args("--recipe", "released", "--steps-per-round", "20", "--tau", "0.2")).loader
    assert fixed.overrides() == {
        "region.mode": "fixed",
        "region.tau": 0.2,
        "region.steps_per_round": 20,
    }
    with pytest.raises(ValueError, match=r"learned_embedding_max_age must be 0 \(off\) or >= embedding_max_age \(50\)"):
        train_config(_train_args("--embedding-max-age", "50", "--learned-embedding-max-age", "10"))
    # On the command line: one line naming the flag's setting and the value given, before any connection.
    cmd = [sys.executable, "-m", "trainer_client.cli", "train", "--endpoint", "127.0.0.1:1"]
    out = subprocess.run([*cmd, "--embedding-max-age", "-1"], capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert "crest train: embedding_max_age must be >= 0 steps (0: off), received -1" in out.stderr


def test_crest_train_command_with_the_tuned_settings(ray_server: RunningServer) -> None:
    """``crest train`` against a running service with joint selection, weight 1 and embedding reuse: it trains,
    and the loader reused rows (the reuse flags reached the run)."""
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    cmd = [sys.executable, "-m", "trainer_client.cli", "--log-level", "WARNING", "train"]
    cmd += ["--endpoint", ray_server.target, "--steps", "60", "--train-limit", "2000", "--test-limit", "500"]
    cmd += ["--batch-size", "32", "--subset-fraction", "0.1", "--num-subsets", "2", "--steps-per-round", "10"]
    out = subprocess.run([*cmd, *TUNED], env=env, capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "1,920" in out.stdout  # 60 steps x 32 examples
    row = {k.strip(): v.strip() for k, v in (x.rsplit("  ", 1) for x in out.stdout.splitlines() if "  " in x)}
    embedded, rounds = int(row["examples embedded (forward only)"].replace(",", "")), int(row["selection rounds"])
    assert 0 < embedded < 400 * rounds, out.stdout  # under 400 fresh candidates a round: some rows were reused
