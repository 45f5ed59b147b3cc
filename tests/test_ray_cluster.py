"""The service on a real multi-node Ray cluster on this machine: a head and a worker started with `ray start`,
the service attached with --ray-address, concurrent jobs isolated, selection on actors of both nodes, and a
selector actor killed mid-round without losing or repeating a batch."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from selector_service.process import spawn_service
from selector_service.provenance import ProvenanceLog
from trainer_client.client import SelectionClient

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
ENV = {**os.environ, "RAY_AUTH_MODE": "disabled", "OMP_WAIT_POLICY": "PASSIVE"}
# Every node and driver uses 127.0.0.2: still loopback, but Ray rewrites only 127.0.0.1/localhost to the
# machine's routable address, so with .2 no traffic leaves the loopback range.
HOST = "127.0.0.2"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _ray_start(*args: str) -> subprocess.Popen[bytes]:
    """A Ray node in the foreground (--block), so this test stops exactly the nodes it started."""
    return subprocess.Popen(
        [
            str(BIN / "ray"),
            "start",
            "--block",
            "--node-ip-address",
            HOST,
            "--num-cpus",
            "1",
            "--object-store-memory",
            str(200 * 1024**2),
            "--disable-usage-stats",
            *args,
        ],
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: the node's daemons can be stopped together
    )


def _stop_node(node: subprocess.Popen[bytes]) -> None:
    """Stop one node: `ray start --block` on SIGTERM, then anything left in its process group."""
    node.terminate()
    try:
        node.wait(timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(node.pid, signal.SIGKILL)


def _wait_for_nodes(address: str, count: int, timeout_s: float = 90.0) -> None:
    """Until `ray status` lists ``count`` active nodes (each check is a real query, bounded by a deadline)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        out = subprocess.run(
            [str(BIN / "ray"), "status", "--address", address], env=ENV, capture_output=True, text=True, check=False
        )
        if out.returncode == 0 and out.stdout.count(" node_") >= count:
            return
        time.sleep(0.5)
    raise TimeoutError(f"Ray cluster at {address} did not reach {count} nodes in {timeout_s} s")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str, Path]]:
    """(ray address, service target, state dir) of a 2-node cluster with the service attached."""
    port = _free_port()
    address = f"{HOST}:{port}"
    # Free ports for the head's fixed-port services too, so concurrent Ray heads on this machine never clash.
    nodes = [
        _ray_start(
            "--head",
            "--port",
            str(port),
            "--include-dashboard",
            "false",
            "--ray-client-server-port",
            str(_free_port()),
            "--dashboard-agent-listen-port",
            str(_free_port()),
        )
    ]
    state = tmp_path_factory.mktemp("state")
    with socket.socket() as s:  # the service's metrics, on its own (default) host
        s.bind(("127.0.0.1", 0))
        metrics_port = int(s.getsockname()[1])
    service = None
    try:
        _wait_for_nodes(address, 1)
        service = spawn_service(
            [
                "--port",
                "0",
                "--ray-address",
                address,
                "--num-workers",
                "0",
                "--cpus-per-worker",
                "0.25",
                "--state-dir",
                str(state),
                "--metrics-port",
                str(metrics_port),
            ],
            env=ENV,
        )
        # The service follows the cluster (--num-workers 0): one actor per 0.25 CPU, more when a node joins.
        SCALING["before"] = _selector_actors(address)
        nodes.append(_ray_start("--address", address))
        _wait_for_nodes(address, 2)
        deadline = time.monotonic() + 60
        while (count := _selector_actors(address)) < 2 * SCALING["before"] and time.monotonic() < deadline:
            time.sleep(0.5)
        SCALING["after"] = count
        # A new actor takes work once it has warmed up: wait until the service's pool holds them all.
        while _pool_size(metrics_port) < count and time.monotonic() < deadline:
            time.sleep(0.5)
        SCALING["pool"] = _pool_size(metrics_port)
        yield address, service.target, state
    finally:
        if service is not None:
            service.stop(timeout_s=60)
        for node in reversed(nodes):
            _stop_node(node)


SCALING: dict[str, int] = {}


def _selector_actors(address: str) -> int:
    """Named selector actors alive in the cluster, counted by a short-lived driver process."""
    code = (
        f"import ray; ray.init(address={address!r}, log_to_driver=False); "
        "print(sum(a['name'].startswith('crest-selector-') for a in ray.util.list_named_actors(True)))"
    )
    out = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def _pool_size(metrics_port: int) -> int:
    """Selector actors in the service's pool (warm, taking work), from its metrics."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    (line,) = [x for x in text.splitlines() if x.startswith("crest_selector_workers ")]
    return int(float(line.split()[1]))


def test_adding_a_node_adds_selector_actors_without_a_restart(cluster: tuple[str, str, Path]) -> None:
    assert SCALING["before"] == 4  # 1 CPU / 0.25
    assert SCALING["after"] == 8  # 2 CPUs / 0.25, the same service process
    assert SCALING["pool"] == 8  # and each new actor joined the pool once warm


def _run_job(target: str, labels: np.ndarray, rounds: int, out: dict[str, object]) -> None:
    with SelectionClient(target, timeout_s=120) as client:
        sid = client.create_session(labels, subset_fraction=0.05, num_subsets=4, batch_size=20).session_id
        plans, batches = [], []
        for r in range(rounds):
            plan = client.start_round(sid, r, r)
            emb = np.random.default_rng(r).normal(size=(len(plan.ids), 10)).astype(np.float32)
            client.submit_embeddings(sid, r, plan.ids, emb)
            plans.append(set(plan.ids.tolist()))
            batches += list(client.stream_batches(sid, r))
        out.update(session=sid, plans=plans, batches=batches)


def test_concurrent_jobs_are_isolated_and_selection_runs_on_both_nodes(cluster: tuple[str, str, Path]) -> None:
    _, target, state = cluster
    jobs: list[dict[str, object]] = [{}, {}]
    sizes = (2000, 3000)
    threads = [
        threading.Thread(target=_run_job, args=(target, np.arange(n) % 10, 3, jobs[i])) for i, n in enumerate(sizes)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    nodes = set()
    for job, n in zip(jobs, sizes, strict=True):
        batches, plans = job["batches"], job["plans"]
        assert len(batches) == 12  # 3 rounds x 4 subsets, each exactly once
        assert len({(b.round_id, b.subset_index) for b in batches}) == 12
        for b in batches:
            assert set(b.ids.tolist()) <= plans[b.round_id] and b.ids.max() < n  # only this job's own ids
            nodes.add(b.worker.rsplit("/node-", 1)[1])
        logged = ProvenanceLog(state).read(job["session"])
        assert sorted((r["round_id"], r["subset_index"]) for r in logged) == sorted(
            (b.round_id, b.subset_index) for b in batches
        )
    assert len(nodes) == 2, nodes  # actors on the head and on the worker node both selected


def test_killed_selector_actor_loses_and_repeats_nothing(cluster: tuple[str, str, Path]) -> None:
    import ray

    address, target, state = cluster
    labels = np.arange(40_000) % 2  # two classes of 2,000 per subset: dense selections that take a while
    ray.init(address=address, namespace="crest", log_to_driver=False)
    try:
        names = [
            a["name"]
            for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith("crest-selector-")
        ]
        assert len(names) == 8
        with SelectionClient(target, timeout_s=180) as client:
            sid = client.create_session(labels, subset_fraction=0.1, num_subsets=4, batch_size=40).session_id
            plan = client.start_round(sid, 0, 0)
            emb = np.random.default_rng(5).normal(size=(len(plan.ids), 2)).astype(np.float32)
            client.submit_embeddings(sid, 0, plan.ids, emb)
            for name in names:  # kill every selector while the round's selections run; Ray restarts and retries
                ray.kill(ray.get_actor(name, namespace="crest"), no_restart=False)
            batches = list(client.stream_batches(sid, 0))
            assert sorted(b.subset_index for b in batches) == [0, 1, 2, 3]
            assert client.session_state(sid).rounds_completed == 1
        logged = ProvenanceLog(state).read(sid)
        assert sorted(r["subset_index"] for r in logged) == [0, 1, 2, 3]  # delivered once each
    finally:
        ray.shutdown()


def test_killed_selector_worker_processes_lose_and_repeat_nothing(cluster: tuple[str, str, Path]) -> None:
    """SIGKILL the operating-system processes of every selector actor mid-round (not ray.kill: a crash), after the
    round started and before its embeddings arrive, so that every selection of the round meets a dead process.
    (Killed after the embeddings, a share that selects in milliseconds may finish before its process dies.)"""
    import ray

    address, target, state = cluster
    labels = np.arange(40_000) % 2
    ray.init(address=address, namespace="crest", log_to_driver=False)
    try:
        actors = [
            ray.get_actor(a["name"], namespace="crest")
            for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith("crest-selector-")
        ]
        pids = ray.get([a.pid.remote() for a in actors], timeout=60)
        assert len(set(pids)) == len(actors) and os.getpid() not in pids
        with SelectionClient(target, timeout_s=180) as client:
            sid = client.create_session(labels, subset_fraction=0.1, num_subsets=4, batch_size=40).session_id
            plan = client.start_round(sid, 0, 0)
            emb = np.random.default_rng(6).normal(size=(len(plan.ids), 2)).astype(np.float32)
            for pid in pids:  # the processes the round's selections would run in
                os.kill(pid, signal.SIGKILL)
            client.submit_embeddings(sid, 0, plan.ids, emb)
            batches = list(client.stream_batches(sid, 0))
            assert sorted(b.subset_index for b in batches) == [0, 1, 2, 3]
            assert client.session_state(sid).rounds_completed == 1
            workers = {b.worker.split(":", 1)[1].split("/", 1)[0] for b in batches}
            assert not workers & {str(p) for p in pids}  # selected by restarted processes
        logged = ProvenanceLog(state).read(sid)
        assert sorted(r["subset_index"] for r in logged) == [0, 1, 2, 3]  # delivered once each
        restarted = ray.get([a.pid.remote() for a in actors], timeout=120)
        assert not set(restarted) & set(pids)  # every actor lives in a new process
    finally:
        ray.shutdown()


def test_ddp_job_and_an_independent_job_share_the_cluster(cluster: tuple[str, str, Path]) -> None:
    """Two trainer processes (one DDP job, 2 gloo ranks, under torchrun) and another job at the same time."""
    _, target, state = cluster
    known = {p.stem for p in (state / "provenance").glob("*.jsonl")}
    example = Path(__file__).resolve().parents[1] / "examples" / "ddp_train.py"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        str(example),
        "--steps",
        "30",
        "--train-limit",
        "3000",
        "--batch-size",
        "40",
        "--endpoint",
        target,
    ]
    env = {**ENV, "GLOO_SOCKET_IFNAME": "lo"}
    ddp = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    other: dict[str, object] = {}
    _run_job(target, np.arange(2500) % 10, 3, other)  # meanwhile, in this process
    out, err = ddp.communicate(timeout=300)
    assert ddp.returncode == 0, out[-2000:] + err[-3000:]
    for rank in (0, 1):
        (line,) = [x for x in out.splitlines() if x.startswith(f"rank {rank}/2:")]
        steps, fallback = int(line.split(": ", 1)[1].split()[0]), int(line.split(" fallback")[0].rsplit(" ", 1)[1])
        assert steps == 30 and fallback < steps, line  # trained on coresets from the service
    new = {p.stem for p in (state / "provenance").glob("*.jsonl")} - known - {other["session"]}
    (ddp_session,) = new  # rank 0 alone owns the job's one session
    logged = ProvenanceLog(state).read(ddp_session)
    delivered = [(r["round_id"], r["subset_index"]) for r in logged]
    assert len(delivered) == len(set(delivered)) > 0  # no batch twice
    for round_id in {r for r, _ in delivered}:  # none missing: each round's subsets are 0..P-1
        subsets = sorted(s for r, s in delivered if r == round_id)
        assert subsets == list(range(len(subsets)))
    assert all(r["ids"] and max(r["ids"]) < 3000 for r in logged)
    for b in other["batches"]:  # the independent job saw only its own ids
        assert set(b.ids.tolist()) <= other["plans"][b.round_id]
