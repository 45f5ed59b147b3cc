"""Kubernetes files, validated without a cluster, and what compose would run, run as processes.

- The Kubernetes manifests with kubernetes-validate, the RayCluster against deploy/kuberay/raycluster.schema.json
  and ``ray start``; each validator is also shown to reject a broken copy; the KubeRay frontend has the compose
  configuration.
- The slow test runs what compose would run, as processes on this machine (loopback only).
"""

from __future__ import annotations

import contextlib
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml
from deploy_files import (
    BIN,
    COMPOSE_CPU,
    COMPOSE_ENV,
    DEPLOY,
    K8S_MANIFESTS,
    RAYCLUSTER,
    RAYCLUSTER_SCHEMA,
    ROOT,
    env_problems,
    load_compose,
    load_yaml,
    parse_crest,
    parse_ray_start,
    run_tool,
    tool,
)

# ---------------------------------------------------------------- Kubernetes


def kuberay_flags(params: Mapping[str, str]) -> list[str]:
    """``rayStartParams`` as the KubeRay operator turns them into ``ray start`` flags: "true" alone is a bare
    boolean flag and "false" drops it, except for the two options whose value is itself true/false/auto."""
    flags = []
    for key, value in params.items():
        if value.lower() in ("true", "false") and key not in ("include-dashboard", "log-color"):
            flags += [f"--{key}"] if value.lower() == "true" else []
        else:
            flags.append(f"--{key}={value}")
    return flags


def pod_templates(raycluster: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    yield "head", raycluster["spec"]["headGroupSpec"]["template"]
    for group in raycluster["spec"].get("workerGroupSpecs", []):
        yield group["groupName"], group["template"]


def as_pod_templates(raycluster: dict[str, Any]) -> str:
    """The RayCluster's pod templates as core PodTemplate objects, which kubernetes-validate knows."""
    docs = [
        {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"crest-{name}"}, "template": template}
        for name, template in pod_templates(raycluster)
    ]
    return yaml.safe_dump_all(docs)


def test_kubernetes_manifests_validate(tmp_path: Path) -> None:
    templates = tmp_path / "raycluster-pods.yaml"
    templates.write_text(as_pod_templates(load_yaml(RAYCLUSTER)))
    out = run_tool(tool("kubernetes-validate"), "--strict", *K8S_MANIFESTS, templates)
    assert out.returncode == 0, out.stdout + out.stderr
    kinds = {d["kind"] for p in K8S_MANIFESTS for d in yaml.safe_load_all(p.read_text())}
    assert kinds == {"Deployment", "Service", "PersistentVolumeClaim"}
    assert out.stdout.count("passed") == 3 + len(list(pod_templates(load_yaml(RAYCLUSTER))))


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("replicas", "one", "spec.replicas: 'one' is not of type 'integer'"),
        ("strategy", {"type": "Recreate", "rollingUpdat": {}}, "'rollingUpdat' was unexpected"),  # --strict
    ],
)
def test_kubernetes_validate_rejects_a_broken_copy(tmp_path: Path, field: str, value: Any, expected: str) -> None:
    docs = list(yaml.safe_load_all((DEPLOY / "kuberay" / "selector.yaml").read_text()))
    next(d for d in docs if d["kind"] == "Deployment")["spec"][field] = value
    path = tmp_path / "selector.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    out = run_tool(tool("kubernetes-validate"), "--strict", path)
    assert out.returncode == 1, out.stdout + out.stderr
    assert expected in out.stdout + out.stderr, out.stdout + out.stderr


def test_raycluster_matches_its_schema_and_ray_start() -> None:
    check = tool("check-jsonschema")
    meta = run_tool(check, "--check-metaschema", RAYCLUSTER_SCHEMA)
    assert meta.returncode == 0, meta.stdout + meta.stderr
    out = run_tool(check, "--schemafile", RAYCLUSTER_SCHEMA, RAYCLUSTER)
    assert out.returncode == 0, out.stdout + out.stderr

    import tomllib

    from packaging.requirements import Requirement

    cluster = load_yaml(RAYCLUSTER)
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["selector"]
    ray_req = next(Requirement(d) for d in deps if Requirement(d).name == "ray")
    assert ray_req.specifier.contains(cluster["spec"]["rayVersion"]), (ray_req, cluster["spec"]["rayVersion"])
    groups = cluster["spec"]["workerGroupSpecs"]
    assert {g["groupName"] for g in groups} == {"cpu", "gpu"}
    cpu = next(g for g in groups if g["groupName"] == "cpu")
    assert cpu["minReplicas"] < cpu["maxReplicas"] and cluster["spec"]["enableInTreeAutoscaling"]
    for g in groups:
        assert g["minReplicas"] <= g.get("replicas", g["minReplicas"]) <= g["maxReplicas"], g["groupName"]
    gpu_limits = next(g for g in groups if g["groupName"] == "gpu")["template"]["spec"]["containers"][0]["resources"]
    assert gpu_limits["limits"]["nvidia.com/gpu"] == "1"
    # rayStartParams become `ray start` flags: Ray's own parser must accept them.
    specs = [(["--head"], cluster["spec"]["headGroupSpec"]["rayStartParams"])]
    specs += [(["--address=crest-head-svc:6379"], g["rayStartParams"]) for g in groups]
    for extra, params in specs:
        parse_ray_start(["ray", "start", *extra, *kuberay_flags(params)])  # raises ValueError naming the flag
    for name, template in pod_templates(cluster):
        env = {e["name"]: e.get("value") for e in template["spec"]["containers"][0]["env"]}
        assert env_problems(name, env) == []


def test_raycluster_schema_rejects_a_broken_copy(tmp_path: Path) -> None:
    broken = load_yaml(RAYCLUSTER)
    broken["spec"]["workerGroupSpecs"][0]["rayStartParams"]["num-cpus"] = 2  # KubeRay needs strings
    del broken["spec"]["workerGroupSpecs"][1]["maxReplicas"]
    broken["spec"]["headGroupSpec"]["rayStartParms"] = {}
    path = tmp_path / "raycluster.yaml"
    path.write_text(yaml.safe_dump(broken))
    out = run_tool(tool("check-jsonschema"), "--schemafile", RAYCLUSTER_SCHEMA, path)
    assert out.returncode == 1, out.stdout + out.stderr
    for expected in ("2 is not of type 'string'", "'maxReplicas' is a required property", "rayStartParms"):
        assert expected in out.stdout, out.stdout


def test_kuberay_selector_has_the_compose_configuration() -> None:
    compose = load_compose()["services"]["selector"]
    docs = list(yaml.safe_load_all((DEPLOY / "kuberay" / "selector.yaml").read_text()))
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    service = next(d for d in docs if d["kind"] == "Service")
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    k8s_args, compose_args = vars(parse_crest(container["args"])), vars(parse_crest(compose["command"]))
    differ = {k: (compose_args[k], k8s_args[k]) for k in k8s_args if k8s_args[k] != compose_args[k]}
    head = f"{load_yaml(RAYCLUSTER)['metadata']['name']}-head-svc:6379"
    assert differ == {"ray_address": ("ray-head:6379", head), "num_workers": (0, 8)}
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}
    assert set(env) == set(compose["environment"])
    assert env_problems("kuberay selector", env) == []
    assert env["RAY_JOIN_ADDRESS"] == head
    assert env["CREST_AUTH_TOKEN"] == {"secretKeyRef": {"name": "crest-auth", "key": "token"}}
    ports = {p["containerPort"] for p in container["ports"]}
    assert ports == {k8s_args["port"], k8s_args["metrics_port"]}
    assert {p["port"] for p in service["spec"]["ports"]} == ports
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == k8s_args["port"]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    claim = next(v for v in pod["volumes"] if v["name"] == mounts[k8s_args["state_dir"]])
    assert claim["persistentVolumeClaim"]["claimName"] == "crest-state"
    assert pod["securityContext"]["runAsNonRoot"] is True


# ---------------------------------------------------------------- what compose would run, as processes

# Ray nodes on 127.0.0.2: loopback, and Ray leaves it alone (it rewrites only 127.0.0.1/localhost to the machine's
# routable address), so nothing leaves the loopback range (as in test_ray_cluster.py).
RAY_HOST = "127.0.0.2"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def with_flag(argv: list[str], flag: str, value: object) -> list[str]:
    """``argv`` with ``flag``'s value replaced (``--f=v`` or ``--f v``); the flag must be there already."""
    out = list(argv)
    for i, a in enumerate(out):
        if a.startswith(flag + "="):
            out[i] = f"{flag}={value}"
            return out
        if a == flag:
            out[i + 1] = str(value)
            return out
    raise AssertionError(f"{flag} is not in {argv}: the compose file changed, update this test")


def start_node(argv: list[str], env: Mapping[str, str]) -> subprocess.Popen[bytes]:
    # The compose command, plus what several nodes on one machine next to other tests need: a loopback address,
    # a small object store, and free ports where Ray's defaults are fixed.
    extra = ["--node-ip-address", RAY_HOST, "--object-store-memory", str(200 * 1024**2)]
    if "--head" in argv:
        extra += ["--ray-client-server-port", str(free_port(RAY_HOST)), "--dashboard-port", str(free_port())]
    return subprocess.Popen(
        [str(BIN / argv[0]), *argv[1:], *extra],
        env=dict(env),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: the node's daemons are stopped together, and only them
    )


def stop_node(node: subprocess.Popen[bytes]) -> None:
    node.terminate()  # `ray start --block` stops its daemons on SIGTERM
    try:
        node.wait(timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(node.pid, signal.SIGKILL)


def wait_for_nodes(address: str, count: int, env: Mapping[str, str], timeout_s: float = 90.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        out = subprocess.run(
            [str(BIN / "ray"), "status", "--address", address],
            env=dict(env),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if out.returncode == 0 and out.stdout.count(" node_") >= count:
            return
        time.sleep(0.5)
    raise TimeoutError(f"Ray at {address} did not reach {count} nodes in {timeout_s} s")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_what_compose_runs_trains_as_processes(tmp_path: Path) -> None:
    """ray-head, ray-worker, selector and the CPU trainer (two gloo ranks) with the compose files' own command
    lines and environment; only addresses, ports and the state directory are replaced, and CREST_STEPS is set.

    The selector binds loopback here but keeps the compose token, which the trainer ranks send."""
    knobs = {**COMPOSE_ENV, "CREST_STEPS": "20"}
    services = load_compose(env=knobs)["services"]
    trainer = load_compose(COMPOSE_CPU, env=knobs)["services"]["trainer-cpu"]
    base_env = {**os.environ, **services["selector"]["environment"]}
    base_env.pop("RAY_JOIN_ADDRESS")  # the Ray node is already local
    gcs = f"{RAY_HOST}:{free_port(RAY_HOST)}"
    nodes = [start_node(with_flag(services["ray-head"]["command"], "--port", gcs.split(":")[1]), base_env)]
    selector = None
    try:
        wait_for_nodes(gcs, 1, base_env)
        nodes.append(start_node(with_flag(services["ray-worker"]["command"], "--address", gcs), base_env))
        wait_for_nodes(gcs, 2, base_env)

        port, metrics_port = free_port(), free_port()
        argv = services["selector"]["command"]
        for flag, value in (
            ("--host", "127.0.0.1"),
            ("--port", port),
            ("--metrics-port", metrics_port),
            ("--ray-address", gcs),
            ("--state-dir", tmp_path / "state"),
        ):
            argv = with_flag(argv, flag, value)
        selector = subprocess.Popen([str(BIN / argv[0]), *argv[1:]], env=base_env, stdout=subprocess.PIPE, text=True)
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: [lines.put(x) for x in selector.stdout or []], daemon=True).start()
        assert lines.get(timeout=120) == f"READY 127.0.0.1:{port}\n"
        health = services["selector"]["healthcheck"]["test"][1:]  # ["python", "/app/healthcheck.py", target]
        probe = subprocess.run(
            [sys.executable, str(DEPLOY / Path(health[1]).name), f"127.0.0.1:{port}"], timeout=60, check=False
        )
        assert probe.returncode == 0

        cmd = with_flag(trainer["command"], "--endpoint", f"127.0.0.1:{port}")
        cmd[1:1] = ["--master-addr=127.0.0.1", f"--master-port={free_port()}"]  # torchrun's default port is fixed
        trainer_env = {**os.environ, **trainer["environment"]}
        run = subprocess.run(
            [str(BIN / cmd[0]), *cmd[1:]],
            cwd=ROOT,
            env=trainer_env,
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        ranks = re.findall(r"rank (\d)/2: (\d+) steps, (\d+) regions.*?(\d+) fallback batches", run.stdout)
        assert sorted(r[0] for r in ranks) == ["0", "1"], run.stdout
        for _, steps, regions, fallback in ranks:
            # Trained the compose step count on coresets from the service, not on uniform fallback batches.
            assert int(steps) == 20 and int(regions) >= 1 and int(fallback) < int(steps), run.stdout
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
        # --num-workers 0 follows the cluster: one actor per 0.5 CPU of the head's 1 and the worker's 2.
        assert re.search(r"^crest_selector_workers 6\.0$", metrics, re.M), metrics
        selections = re.search(r"^crest_selection_seconds_count (\S+)$", metrics, re.M)
        assert selections and float(selections[1]) > 0, metrics
    finally:
        if selector is not None:
            selector.terminate()
            selector.wait(timeout=60)
        for node in reversed(nodes):
            stop_node(node)
