"""DDP: two real gloo processes train one model through the loader against a real server started here. Both ranks
take the same region decisions (the Taylor check is all-reduced), rank 0 alone talks to the service, and no id
reaches both ranks in one round."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from selector_service.backends import LocalBackend
from selector_service.server import ServerConfig, start_server
from trainer_client.distributed import DistContext, needs_cpu_group, owners

WORLD = 2
STEPS = 24
BATCH = 32

WORKER = textwrap.dedent(
    """
    import json, logging, os, sys
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    from trainer_client.client import SelectionClient
    from trainer_client.data import FashionMNIST
    from trainer_client.embeddings import weighted_loss
    from trainer_client.loader import CoresetLoader, LoaderConfig
    from trainer_client.models import SmallCNN

    target, out, steps, batch, kill_at = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    phase, ckpt, first = sys.argv[6], sys.argv[7], int(sys.argv[8])  # full run, or the two halves of a resume
    torch.set_num_threads(1)
    # RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT from the environment. "cuda:gloo" is a default group with no CPU
    # backend, as an NCCL job's: the model's DDP then runs on a gloo group of its own, as it would on NCCL.
    backend = os.environ.get("DDP_TEST_BACKEND", "gloo")
    dist.init_process_group(backend)
    ddp_group = None if backend == "gloo" else dist.new_group(backend="gloo")
    rank = dist.get_rank()
    server = None
    if kill_at >= 0:  # rank 0 hosts a server it can stop at a given step; the other ranks only need its address
        if rank == 0:
            from selector_service.backends import LocalBackend
            from selector_service.server import ServerConfig, start_server
            server = start_server(ServerConfig(port=0, backend="local"), backend=LocalBackend(num_workers=1))
        box = [server.target if server else None]
        dist.broadcast_object_list(box, src=0)
        target = box[0]

    DECISIONS = ("-> reselect", "-> keep", ": region ", "quadratic model", "requested", "fixed length")
    decisions = []

    class Keep(logging.Handler):
        def emit(self, record):
            message = record.getMessage()
            if any(d in message for d in DECISIONS):
                decisions.append(message)

    logging.getLogger("trainer_client").addHandler(Keep())
    logging.getLogger("trainer_client").setLevel(logging.INFO)

    torch.manual_seed(0)
    fmnist = FashionMNIST("train", limit=1000)

    class Indexed(torch.utils.data.Dataset):  # (image, label, id): the batch says which examples were read
        def __len__(self):
            return len(fmnist)

        def __getitem__(self, i):
            return (*fmnist[i], i)

    data = Indexed()
    workers = int(os.environ.get("DDP_TEST_WORKERS", "0"))  # DataLoader worker processes per rank
    model = DistributedDataParallel(SmallCNN(), process_group=ddp_group)
    fit_sizes = []  # the batches of the quadratic model's fit: eval mode with gradients on
    model.module.register_forward_pre_hook(
        lambda m, args: fit_sizes.append(len(args[0])) if not m.training and torch.is_grad_enabled() else None
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    # embedding_max_age: the ranks' caches must stay the same, or their sharded embedding passes would differ;
    # training_logits: each rank stores its share's training rows, which every rank must then hold
    config = LoaderConfig.from_recipe("released", batch_size=batch, subset_fraction=0.05, num_subsets=2,
                          check_examples=128, lookahead_steps=2, deadline_s=60.0, reconnect_initial_s=0.05,
                          reconnect_max_s=0.2, embedding_max_age=12, training_logits=True)
    probe = None
    if os.environ.get("DDP_TEST_PAYOFF"):  # governed, where a selection step embeds its share of 100 examples afresh
        from trainer_client.region import RegionConfig
        config = LoaderConfig(batch_size=batch, subset_fraction=0.1, num_subsets=2, lookahead_steps=1,
                              region=RegionConfig(mode="fixed", steps_per_round=2), embedding_max_age=0,
                              learned_embedding_max_age=0, embed_dtype="float32", deadline_s=60.0,
                              payoff="govern", payoff_segment_steps=3, payoff_every=4, payoff_window=2,
                              payoff_control_scale=0)
        held = FashionMNIST("test", limit=101)  # an odd size: the ranks' probe shards differ
        probe = [(*held[i], -1) for i in range(len(held))]
    client = SelectionClient(target, timeout_s=60)
    loader = CoresetLoader(data, model, client, fmnist.targets.numpy(), config=config, num_workers=workers,
                           probe=probe)
    start, stop = {"full": (0, steps), "first": (0, first), "rest": (first, steps)}[phase]
    if phase == "rest":  # every rank loads rank 0's checkpoint
        state = torch.load(ckpt, weights_only=True)
        model.module.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        loader.load_state_dict(state["loader"])
    delivered = []
    for step, (x, y, ids, w) in zip(range(start, stop), loader):
        assert ids.tolist() == loader.last_ids.tolist(), (step, ids.tolist(), loader.last_ids.tolist())
        logits = model(x)
        if config.training_logits:
            loader.observe_logits(logits)
        loss = weighted_loss(logits, y, w)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        delivered.append({"round": loader.last_round, "ids": loader.last_ids.tolist(), "arm": loader.last_arm})
        if server is not None and step == kill_at:
            server.stop(grace=0)
    saved = loader.state_dict() if kill_at < 0 else None  # a collective: every rank
    if phase == "first":
        state = {"model": model.module.state_dict(), "opt": opt.state_dict(), "loader": saved}
        if rank == 0:
            torch.save(state, ckpt)
        loader.close(end_session=False)  # as if preempted: the session stays on the service
    else:
        loader.close()
    cache = None
    if saved is not None and "embedding_cache" in saved:  # the same on every rank, and after a resume as without one
        rows = saved["embedding_cache"]
        cache = [rows["ids"].tolist(), rows["steps"].tolist(), float(rows["embeddings"].double().sum())]
    digest = float(sum(p.double().sum() for p in model.parameters()))
    payoff = saved.get("payoff") if saved is not None else None
    if payoff is not None:
        payoff = {k: payoff["governor"][k] for k in ("pairs", "decisions", "scales")}
    with open(out, "w") as f:
        json.dump({"decisions": decisions, "delivered": delivered, "stats": vars(loader.stats),
                   "rounds": loader.stats.regions, "digest": digest, "cache": cache, "fit_sizes": fit_sizes,
                   "payoff": payoff},
                  f)
    dist.barrier(group=ddp_group)  # no rank tears gloo down while a peer talks to it (a SIGABRT at exit otherwise)
    dist.destroy_process_group()
    # DDP keeps gloo's threads past destroy_process_group (torch 2.13), and a rank then aborts now and then in the
    # interpreter's teardown, after its work (examples/ddp_train.py ends the same way).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
    """
)


@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_pool_is_dealt_by_id_evenly_and_the_same_way_on_every_rank(world: int) -> None:
    ids = np.random.default_rng(0).choice(500, size=256, replace=True)  # ids in two coresets appear twice
    rank = owners(ids, world, seed=3, round_=5)
    assert rank.dtype == np.int64 and rank.shape == ids.shape and set(rank.tolist()) <= set(range(world))
    np.testing.assert_array_equal(rank, owners(ids, world, seed=3, round_=5))  # pure: same on every rank
    for i in np.unique(ids):
        assert len(set(rank[ids == i].tolist())) == 1, f"id {i} dealt to two ranks"
    distinct = np.bincount(rank[np.unique(ids, return_index=True)[1]], minlength=world)
    assert distinct.max() - distinct.min() <= 1  # round-robin over the distinct ids
    if world > 1:
        assert not np.array_equal(rank, owners(ids, world, seed=3, round_=6))  # dealt afresh every round


@pytest.mark.parametrize(("n", "world"), [(0, 2), (1, 2), (7, 3), (64, 2), (100, 8)])
def test_shards_cut_like_array_split(n: int, world: int) -> None:
    cuts = [DistContext(r, world).shard_bounds(n) for r in range(world)]
    expected = np.array_split(np.arange(n), world)
    assert [hi - lo for lo, hi in cuts] == [len(e) for e in expected]
    assert all(lo == (e[0] if len(e) else lo) for (lo, _), e in zip(cuts, expected, strict=True))
    assert cuts[0][0] == 0 and cuts[-1][1] == n


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run_ranks(
    tmp_path: Path,
    target: str,
    kill_at: int = -1,
    phase: str = "full",
    first: int = 0,
    backend: str = "gloo",
    workers: int = 0,
    payoff: bool = False,
    steps: int = STEPS,
) -> list[dict]:
    """Run WORKER on WORLD ranks of a ``backend`` default group to completion, each rank's loader with ``workers``
    DataLoader workers; each rank's JSON report, in rank order."""
    tmp_path.mkdir(exist_ok=True)
    script = tmp_path / "ddp_worker.py"
    script.write_text(WORKER)
    port = str(_free_port())
    procs = []
    try:
        for rank in range(WORLD):
            env = {
                **os.environ,
                "OMP_WAIT_POLICY": "PASSIVE",
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": port,
                "RANK": str(rank),
                "LOCAL_RANK": str(rank),
                "WORLD_SIZE": str(WORLD),
                "GLOO_SOCKET_IFNAME": os.environ.get("GLOO_SOCKET_IFNAME", "lo"),
                "DDP_TEST_BACKEND": backend,
                "DDP_TEST_WORKERS": str(workers),
                "DDP_TEST_PAYOFF": "1" if payoff else "",
            }
            out = tmp_path / f"{phase}-rank{rank}.json"
            cmd = [sys.executable, str(script), target, str(out), str(steps), str(BATCH), str(kill_at)]
            cmd += [phase, str(tmp_path / "ckpt.pt"), str(first)]
            procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        logs = [p.communicate(timeout=240)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for rank, (p, log) in enumerate(zip(procs, logs, strict=True)):
        assert p.returncode == 0, f"rank {rank} exited {p.returncode}:\n{log[-4000:]}"
    return [json.loads((tmp_path / f"{phase}-rank{r}.json").read_text()) for r in range(WORLD)]


def _assert_disjoint_per_round(ranks: list[dict]) -> dict[int, set[int]]:
    """No id reaches both ranks within one round; returns rank 0's ids per round."""
    per_round: list[dict[int, set[int]]] = [defaultdict(set) for _ in ranks]
    for r, seen in zip(ranks, per_round, strict=True):
        for d in r["delivered"]:
            if d["round"] is not None:
                seen[d["round"]].update(d["ids"])
    for round_, ids in per_round[0].items():
        assert not ids & per_round[1][round_], f"round {round_}: ids {sorted(ids & per_round[1][round_])} on both"
    return per_round[0]


@pytest.mark.slow
def test_two_ranks_share_one_session_and_decide_identically(tmp_path: Path) -> None:
    """On a default group with no CPU backend ("cuda:gloo", as an NCCL job's "cuda:nccl"), so the loader's
    collectives run on the gloo group it creates (the kill and resume tests run on a plain gloo default group)."""
    server = start_server(ServerConfig(port=0, backend="local"), backend=LocalBackend(num_workers=2))
    try:
        ranks = _run_ranks(tmp_path, server.target, backend="cuda:gloo")
    finally:
        server.stop(grace=0)

    # Same decisions, in the same order, with the same logged numbers (all-reduced check, broadcast switches).
    assert ranks[0]["decisions"] == ranks[1]["decisions"]
    decisions = ranks[0]["decisions"]
    assert sum("-> keep" in d or "-> reselect" in d for d in decisions) >= 3
    assert sum("-> reselect" in d for d in decisions) >= 1 and ranks[0]["rounds"] >= 2
    # The quadratic model is fitted in micro-batches of this rank's share of a step, not the global batch.
    assert all(r["fit_sizes"] and max(r["fit_sizes"]) == BATCH // WORLD for r in ranks)
    # The replicas stayed identical (DDP) and every batch came from the service, none from the fallback.
    assert ranks[0]["digest"] == ranks[1]["digest"]
    for r in ranks:
        assert r["stats"]["fallback_batches"] == 0 and r["stats"]["steps"] == STEPS
    # Rank 0 alone opened the session; both ranks embedded a share of every round, and reused the same rows.
    assert ranks[0]["stats"]["sessions_opened"] == ranks[1]["stats"]["sessions_opened"] == 1
    assert all(r["stats"]["examples_embedded"] > 0 for r in ranks)
    assert ranks[0]["stats"]["embeddings_reused"] == ranks[1]["stats"]["embeddings_reused"] > 0
    # Each rank stored its share's training rows, and every rank holds both shares' (equal caches).
    assert ranks[0]["cache"] == ranks[1]["cache"] and ranks[0]["cache"][0]
    assert sum(r["stats"]["training_rows"] for r in ranks) == sum(len(d["ids"]) for r in ranks for d in r["delivered"])
    last_step: dict[int, int] = {}
    for r in ranks:
        for step, d in enumerate(r["delivered"]):
            last_step.update((i, max(step, last_step.get(i, step))) for i in d["ids"])
    cached = dict(zip(*ranks[0]["cache"][:2], strict=True))
    trained_late = [i for i, step in last_step.items() if step >= STEPS - 12]  # their rows are still usable
    assert trained_late and all(cached[i] >= last_step[i] for i in trained_late)

    # Both ranks train on the same region at every step; no id reaches both ranks within one round.
    for step, (a, b) in enumerate(zip(ranks[0]["delivered"], ranks[1]["delivered"], strict=True)):
        assert a["round"] == b["round"] is not None, f"step {step}: rank 0 in round {a['round']}, rank 1 {b['round']}"
        assert a["ids"] and b["ids"]
        # Each rank gets about half of a batch (ids present in two coresets of a round make shares uneven).
        assert abs(len(a["ids"]) - len(b["ids"])) <= 4 and len(a["ids"]) + len(b["ids"]) <= BATCH + 2
    assert len(_assert_disjoint_per_round(ranks)) >= 2


@pytest.mark.slow
def test_ranks_with_dataloader_workers_train_on_the_batches_of_ranks_without_them(tmp_path: Path) -> None:
    """Two ranks with two DataLoader workers each: every rank's batches hold exactly its share's examples (the
    worker script asserts it at every step), and every step's ids, and so the trained model, are those of the run
    without workers."""
    server = start_server(ServerConfig(port=0, backend="local"), backend=LocalBackend(num_workers=2))
    try:
        plain = _run_ranks(tmp_path / "plain", server.target)
        ahead = _run_ranks(tmp_path / "workers", server.target, workers=2)
    finally:
        server.stop(grace=0)
    for p, a in zip(plain, ahead, strict=True):
        assert a["delivered"] == p["delivered"] and a["decisions"] == p["decisions"]
        assert a["stats"]["fallback_batches"] == 0
        # Not fetched ahead: the first step, and at most the 4 batches the workers fetch ahead per region (a failed
        # check ends it 2 steps later; the other rank learns of a round when rank 0 switches to it).
        assert a["stats"]["input_misses"] <= 4 * a["stats"]["regions"]
    assert ahead[0]["digest"] == ahead[1]["digest"] == plain[0]["digest"]
    assert len(_assert_disjoint_per_round(ahead)) >= 2


@pytest.mark.slow
def test_the_governor_takes_one_decision_for_every_rank(tmp_path: Path) -> None:
    """LoaderConfig(payoff="govern") on two ranks: the probe set sharded unevenly (101 examples), its losses and
    rank 0's costs all-reduced, so both ranks scale their control segments alike, record the same measurements,
    take the same decisions at the same steps and train the same arm at every step, each on its own half of the
    control's batches."""
    server = start_server(ServerConfig(port=0, backend="local"), backend=LocalBackend(num_workers=2))
    steps = 63  # measurements of 3-step selection segments from step 3, control segments at the cost ratio
    try:
        ranks = _run_ranks(tmp_path, server.target, payoff=True, steps=steps)
    finally:
        server.stop(grace=0)
    a, b = ranks
    assert a["payoff"] == b["payoff"] and len(a["payoff"]["pairs"]) >= 3
    assert a["payoff"]["scales"] == b["payoff"]["scales"]  # the control segments' scale, from rank 0's costs
    decisions = a["payoff"]["decisions"]
    assert len(decisions) == len(a["payoff"]["pairs"])  # one per measurement, none spoiled
    arms = [d["arm"] for d in a["delivered"]]
    assert arms == [d["arm"] for d in b["delivered"]] and "control" in arms
    # Each decision holds from its step: training is on its arm outside the measurements' middle segments.
    for d, nxt in zip(decisions, [*decisions[1:], None], strict=True):
        end = steps if nxt is None else nxt["step"]
        held = arms[d["step"] : end]
        assert held[:3] == [d["arm"]] * min(3, len(held)), (d, held)
    for step, (x, y) in enumerate(zip(a["delivered"], b["delivered"], strict=True)):
        if x["arm"] == "control":  # one uniform batch, dealt between the ranks
            assert x["round"] is None and y["round"] is None
            assert not set(x["ids"]) & set(y["ids"]) and len(x["ids"]) + len(y["ids"]) == BATCH, step
    assert a["digest"] == b["digest"]
    for r in ranks:
        assert r["stats"]["fallback_batches"] == 0 and r["stats"]["payoff_spoiled"] == 0
        assert r["stats"]["control_steps"] == arms.count("control")


@pytest.mark.slow
def test_server_killed_mid_run_both_ranks_fall_back_at_the_same_steps(tmp_path: Path) -> None:
    kill_at = 6  # rank 0 stops its in-process server after this step
    ranks = _run_ranks(tmp_path, "on-rank-0", kill_at=kill_at)
    rounds = [[d["round"] for d in r["delivered"]] for r in ranks]
    assert rounds[0] == rounds[1]  # the same steps on coresets (and which region) and on uniform batches
    fallback = [step for step, r in enumerate(rounds[0]) if r is None]
    assert fallback and min(fallback) > kill_at  # coresets until the kill, uniform batches after it
    a, b = ranks
    assert a["stats"]["fallback_batches"] == b["stats"]["fallback_batches"] == len(fallback)
    assert a["stats"]["service_errors"] == b["stats"]["service_errors"] >= 1  # rank 0's, mirrored
    assert a["decisions"] == b["decisions"] and a["digest"] == b["digest"]
    for step in fallback:  # each rank its own share of the same uniform batch
        ids0, ids1 = a["delivered"][step]["ids"], b["delivered"][step]["ids"]
        assert ids0 and ids1 and not set(ids0) & set(ids1) and len(ids0) + len(ids1) == BATCH
    _assert_disjoint_per_round(ranks)


@pytest.mark.slow
def test_ddp_example_runs_under_torchrun(tmp_path: Path) -> None:
    server = start_server(ServerConfig(port=0, backend="local"), backend=LocalBackend(num_workers=2))
    example = Path(__file__).resolve().parents[1] / "examples" / "ddp_train.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={WORLD}", str(example)]
    cmd += ["--steps", "6", "--train-limit", "1000", "--batch-size", str(BATCH), "--endpoint", server.target]
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "GLOO_SOCKET_IFNAME": os.environ.get("GLOO_SOCKET_IFNAME", "lo")}
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240, check=False, cwd=tmp_path)
    finally:
        server.stop(grace=0)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    for rank in range(WORLD):
        (line,) = [line for line in out.stdout.splitlines() if line.startswith(f"rank {rank}/{WORLD}:")]
        assert ": 6 steps" in line and " 0 fallback batches" in line, line
    assert "test accuracy" in out.stdout


@pytest.mark.slow
def test_rank_0_checkpoint_resumes_every_rank_with_the_batches_of_an_uninterrupted_run(tmp_path: Path) -> None:
    server = start_server(ServerConfig(port=0, backend="local"), backend=LocalBackend(num_workers=2))
    first = 11
    try:
        full = _run_ranks(tmp_path, server.target)
        head = _run_ranks(tmp_path, server.target, phase="first", first=first)
        rest = _run_ranks(tmp_path, server.target, phase="rest", first=first)
    finally:
        server.stop(grace=0)
    for r in range(WORLD):
        ids = [d["ids"] for d in full[r]["delivered"]]
        assert [d["ids"] for d in head[r]["delivered"]] == ids[:first]
        assert [d["ids"] for d in rest[r]["delivered"]] == ids[first:], f"rank {r} did not continue"
        assert rest[r]["stats"]["fallback_batches"] == 0
    assert rest[0]["digest"] == rest[1]["digest"] == full[0]["digest"]
    assert rest[0]["cache"] == rest[1]["cache"] == full[0]["cache"]  # with the training rows of both ranks
    assert rest[0]["rounds"] == full[0]["rounds"] >= 3  # regions switched after the restore too


@pytest.mark.parametrize(
    ("config", "needed"),
    [
        ("cpu:gloo", False),  # init_process_group() with no backend on a CPU host
        ("cpu:gloo,cuda:nccl", False),  # with no backend on a CUDA host
        ("gloo", False),
        ("cuda:nccl", True),  # init_process_group("nccl")
        ("nccl", True),
        ("cuda:gloo", True),
    ],
)
def test_the_loader_takes_a_gloo_group_when_the_default_group_has_no_cpu_backend(config: str, needed: bool) -> None:
    assert needs_cpu_group(config) is needed
