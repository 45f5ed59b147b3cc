"""Deployment files, validated without a Docker engine or a Kubernetes cluster.

- docker-compose.yml and deploy/compose.cpu.yml against the compose specification (check-jsonschema's vendored
  schema), the Dockerfiles with hadolint, the Kubernetes manifests with kubernetes-validate, the RayCluster
  against deploy/kuberay/raycluster.schema.json; each validator is also shown to reject a broken copy.
- The commands and environment of the compose services and of the KubeRay frontend agree with the flags that
  ``crest``, ``ray start``, ``torchrun`` and the trainer script really accept, so the files cannot silently rot.
- The slow test runs what compose would run, as processes on this machine (loopback only).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator, Mapping
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from crest_bench.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_CPU = DEPLOY / "compose.cpu.yml"
DOCKERFILES = sorted(DEPLOY.glob("*.Dockerfile"))
K8S_MANIFESTS = [DEPLOY / "kuberay" / "selector.yaml"]
RAYCLUSTER = DEPLOY / "kuberay" / "raycluster.yaml"
RAYCLUSTER_SCHEMA = DEPLOY / "kuberay" / "raycluster.schema.json"
BIN = Path(sys.executable).parent
# What the compose files need from the environment to be interpolated (the token has no default on purpose).
COMPOSE_ENV = {"CREST_AUTH_TOKEN": "test-token"}
# Environment every service and pod must carry, with the same value everywhere.
SHARED_ENV = {"RAY_AUTH_MODE": "disabled", "OMP_WAIT_POLICY": "PASSIVE"}


def tool(name: str) -> str:
    """Path of a validator CLI from the dev extra; a missing one fails (validators must really run)."""
    path = BIN / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: pip install -e '.[dev]'")
    return found


def run_tool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=120, check=False)


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


# ---------------------------------------------------------------- compose interpolation (the subset we use)

_VAR = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:-|:\?)(?P<arg>[^}]*))?\}")


def interpolate(value: Any, env: Mapping[str, str]) -> Any:
    """Compose's ``${VAR}``, ``${VAR:-default}`` and ``${VAR:?error}`` over a loaded file."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(m: re.Match[str]) -> str:
        name, op, arg = m["name"], m["op"], m["arg"]
        if env.get(name):
            return env[name]
        if op == ":-":
            return arg
        if op == ":?":
            raise KeyError(f"{name}: {arg}")
        return ""

    return _VAR.sub(one, value)


def load_compose(path: Path = COMPOSE, env: Mapping[str, str] = COMPOSE_ENV) -> dict[str, Any]:
    return interpolate(load_yaml(path), env)


# ---------------------------------------------------------------- what the commands may say


def parse_crest(argv: list[str]) -> Any:
    """``crest ...`` parsed by the CLI's own parser; ValueError on an unknown flag or a bad value."""
    if not argv or argv[0] != "crest":
        raise ValueError(f"expected a `crest` command, received {argv!r}")
    try:
        return build_parser().parse_args(argv[1:])
    except SystemExit:
        raise ValueError(f"crest rejects {argv[1:]!r}") from None


def parse_ray_start(argv: list[str]) -> dict[str, Any]:
    """``ray start ...`` parsed by Ray's own click command (nothing is started)."""
    import click
    from ray.scripts.scripts import start

    if argv[:2] != ["ray", "start"]:
        raise ValueError(f"expected `ray start`, received {argv!r}")
    try:
        return dict(start.make_context("start", list(argv[2:])).params)
    except click.ClickException as exc:
        raise ValueError(f"ray start rejects {argv[2:]!r}: {exc.format_message()}") from None


def parse_torchrun(argv: list[str]) -> Any:
    from torch.distributed.run import get_args_parser

    if not argv or argv[0] != "torchrun":
        raise ValueError(f"expected `torchrun`, received {argv!r}")
    try:
        return get_args_parser().parse_args(argv[1:])
    except SystemExit:
        raise ValueError(f"torchrun rejects {argv[1:]!r}") from None


@cache
def script_flags(script: str) -> frozenset[str]:
    """The long options a training script accepts, read from its own ``--help``."""
    out = subprocess.run(
        [sys.executable, str(ROOT / script), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
        env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"},
    ).stdout
    return frozenset(re.findall(r"(--[a-z][a-z0-9-]*)", out.split("options:", 1)[-1]))


def flag_value(argv: list[str], flag: str) -> str | None:
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def trainer_problems(name: str, service: dict[str, Any], selector_port: int) -> list[str]:
    """The trainer's torchrun line, its script's flags and its endpoint."""
    cmd = [str(c) for c in service.get("command", [])]
    try:
        run = parse_torchrun(cmd)
    except ValueError as exc:
        return [f"{name}: {exc}"]
    problems = []
    script = run.training_script
    if not (ROOT / script).is_file():
        return [f"{name}: runs {script}, which is not in the repository"]
    args = list(run.training_script_args)
    unknown = [a for a in args if a.startswith("--") and a.split("=", 1)[0] not in script_flags(script)]
    if unknown:
        problems.append(f"{name}: {script} does not declare {unknown}")
    endpoint = flag_value(args, "--endpoint")
    if endpoint != f"selector:{selector_port}":
        problems.append(f"{name}: --endpoint {endpoint!r} is not the selector service (selector:{selector_port})")
    if "selector" not in service.get("depends_on", {}):
        problems.append(f"{name}: does not wait for the selector")
    return problems


def env_problems(name: str, env: Mapping[str, Any]) -> list[str]:
    return [
        f"{name}: {k}={env.get(k)!r}, every service needs {k}={v!r}"
        for k, v in SHARED_ENV.items()
        if str(env.get(k)) != v
    ]


def compose_problems(compose: dict[str, Any]) -> list[str]:
    """Everything in an interpolated docker-compose.yml that disagrees with the real CLIs or with itself."""
    services = compose.get("services", {})
    missing = {"ray-head", "ray-worker", "selector", "trainer"} - set(services)
    if missing:
        return [f"services missing: {sorted(missing)}"]
    problems: list[str] = []
    for name, svc in services.items():
        problems += env_problems(name, svc.get("environment") or {})

    try:
        head = parse_ray_start(services["ray-head"]["command"])
        worker = parse_ray_start(services["ray-worker"]["command"])
    except ValueError as exc:
        return [*problems, str(exc)]
    if not head["head"]:
        problems.append("ray-head: `ray start` without --head")
    gcs = f"ray-head:{head['port']}"
    if worker["address"] != gcs:
        problems.append(f"ray-worker: --address {worker['address']!r} is not the head ({gcs})")
    if "replicas" in (services["ray-worker"].get("deploy") or {}) or services["ray-worker"].get("container_name"):
        problems.append("ray-worker: a fixed replica count or container_name prevents --scale ray-worker=N")
    from ray.scripts.scripts import healthcheck

    for name in ("ray-head", "ray-worker"):
        test = [str(t) for t in services[name].get("healthcheck", {}).get("test", [])]
        if test[1:3] != ["ray", "health-check"]:
            problems.append(f"{name}: the healthcheck is not `ray health-check` ({test})")
        elif healthcheck.make_context("health-check", test[3:]).params["address"] not in (
            gcs,
            f"127.0.0.1:{head['port']}",
        ):
            problems.append(f"{name}: the healthcheck does not ask the head ({test})")
    if worker["block"] is not True or head["block"] is not True:
        problems.append("ray nodes must run `ray start --block` (a container ends with its main process)")

    sel = services["selector"]
    try:
        args = parse_crest(sel["command"])
    except ValueError as exc:
        return [*problems, f"selector: {exc}"]
    env = sel.get("environment") or {}
    if args.command != "serve":
        problems.append(f"selector: runs `crest {args.command}`, not `crest serve`")
        return problems
    if args.ray_address != gcs:
        problems.append(f"selector: --ray-address {args.ray_address!r} is not the head ({gcs})")
    if env.get("RAY_JOIN_ADDRESS") != args.ray_address:
        problems.append("selector: RAY_JOIN_ADDRESS must name the cluster --ray-address attaches to")
    if args.host not in ("127.0.0.1", "localhost") and not (args.auth_token or env.get("CREST_AUTH_TOKEN")):
        problems.append(f"selector: binds {args.host} without CREST_AUTH_TOKEN or --auth-token (it would refuse)")
    named = set(compose.get("volumes") or {})
    mounts = {v.split(":")[1]: v.split(":")[0] for v in sel.get("volumes", []) if isinstance(v, str)}
    if args.state_dir is None or mounts.get(args.state_dir) not in named:
        problems.append(f"selector: --state-dir {args.state_dir!r} is not on a named volume ({mounts})")
    published = {str(p).rsplit(":", 1)[-1] for p in sel.get("ports", [])}
    for flag, port in (("--port", args.port), ("--metrics-port", args.metrics_port)):
        if port is None or str(port) not in published:
            problems.append(f"selector: {flag} {port} is not published ({sorted(published)})")
    health = " ".join(sel.get("healthcheck", {}).get("test", []))
    if f":{args.port}" not in health:
        problems.append(f"selector: the healthcheck {health!r} does not probe port {args.port}")
    if "ray-head" not in sel.get("depends_on", {}):
        problems.append("selector: does not wait for ray-head")

    trainer = services["trainer"]
    problems += trainer_problems("trainer", trainer, args.port)
    devices = trainer.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
    if not any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices):
        problems.append("trainer: no NVIDIA GPU reservation")
    return problems


def cpu_override_problems(base: dict[str, Any], override: dict[str, Any]) -> list[str]:
    services = override.get("services", {})
    problems = []
    if "gpu" not in services.get("trainer", {}).get("profiles", []):
        problems.append("compose.cpu.yml: the GPU trainer stays enabled")
    cpu = services.get("trainer-cpu")
    if cpu is None:
        return [*problems, "compose.cpu.yml: no trainer-cpu service"]
    port = parse_crest(base["services"]["selector"]["command"]).port
    problems += trainer_problems("trainer-cpu", cpu, port)
    problems += env_problems("trainer-cpu", cpu.get("environment") or {})
    if cpu.get("deploy"):
        problems.append("trainer-cpu: reserves devices")
    if cpu.get("image") != base["services"]["selector"]["image"]:
        problems.append("trainer-cpu: not the selector image the compose file builds")
    return problems


def trainer_token_problems(compose: dict[str, Any]) -> list[str]:
    """The selector binds beyond loopback with a token; the trainer must send it (--token or $CREST_AUTH_TOKEN)."""
    cmd = [str(c) for c in compose["services"]["trainer"]["command"]]
    script = parse_torchrun(cmd).training_script
    if "--token" in cmd or "--token" in script_flags(script):
        return []
    return [f"trainer: {script} has no --token and the selector requires one; every call would be UNAUTHENTICATED"]


# ---------------------------------------------------------------- compose


def test_compose_files_match_the_compose_spec() -> None:
    out = run_tool(tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", COMPOSE, COMPOSE_CPU)
    assert out.returncode == 0, out.stdout + out.stderr


def test_compose_spec_check_rejects_a_broken_copy(tmp_path: Path) -> None:
    broken = load_yaml(COMPOSE)
    broken["services"]["selector"]["depends_on"]["ray-head"]["condition"] = "service_ready"
    broken["services"]["ray-worker"]["comand"] = broken["services"]["ray-worker"].pop("command")
    broken["volumes"] = ["crest-state"]
    path = tmp_path / "docker-compose.yml"
    path.write_text(yaml.safe_dump(broken))
    out = run_tool(tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", path)
    assert out.returncode == 1, out.stdout + out.stderr
    for expected in ("'service_ready' is not one of", "'comand' was unexpected", "['crest-state'] is not of type"):
        assert expected in out.stdout, out.stdout


def test_compose_commands_and_environment_agree_with_the_clis() -> None:
    compose = load_compose()
    assert compose_problems(compose) == []
    assert cpu_override_problems(compose, load_compose(COMPOSE_CPU)) == []


@pytest.mark.parametrize(
    ("service", "path", "value", "expected"),
    [
        ("selector", ("command", 3), "--ray-adress=ray-head:6379", "crest rejects"),
        ("selector", ("command", 3), "--port=50052", "--port 50052 is not published"),
        ("ray-worker", ("command", 2), "--address=ray-head:6380", "is not the head"),
        ("ray-head", ("command", 2), "--hed", "ray start rejects"),
        ("ray-worker", ("healthcheck", "test", 4), "ray-head:6380", "the healthcheck does not ask the head"),
        ("trainer", ("command", 3), "--endpoint=selector:50052", "is not the selector service"),
        ("trainer", ("command", 4), "--step=10", "does not declare ['--step=10']"),
        ("trainer", ("command", 1), "--nnodes-count=2", "torchrun rejects"),
        ("selector", ("environment", "RAY_AUTH_MODE"), "token", "every service needs RAY_AUTH_MODE='disabled'"),
        ("trainer", ("environment",), {}, "trainer: OMP_WAIT_POLICY=None"),
        ("selector", ("volumes",), [], "is not on a named volume"),
        ("trainer", ("deploy",), {}, "no NVIDIA GPU reservation"),
    ],
)
def test_cli_agreement_check_rejects_a_broken_copy(
    service: str, path: tuple[Any, ...], value: Any, expected: str
) -> None:
    compose = copy.deepcopy(load_compose())
    node = compose["services"][service]
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    problems = compose_problems(compose)
    assert any(expected in p for p in problems), problems


def test_compose_refuses_to_start_without_a_token() -> None:
    with pytest.raises(KeyError, match="CREST_AUTH_TOKEN"):
        load_compose(env={})
    compose = load_compose()
    token_free = copy.deepcopy(compose)
    del token_free["services"]["selector"]["environment"]["CREST_AUTH_TOKEN"]
    assert any("without CREST_AUTH_TOKEN" in p for p in compose_problems(token_free))


def test_selector_command_in_compose_is_the_image_default() -> None:
    """`docker run crest-selector` and compose serve the same way (apart from the cluster address)."""
    compose = load_compose()
    cmd = compose["services"]["selector"]["command"]
    for dockerfile in ("selector-cpu.Dockerfile", "selector-gpu.Dockerfile"):
        text = (DEPLOY / dockerfile).read_text()
        default = json.loads(re.search(r"^CMD (\[.*\])$", text, re.M)[1])  # type: ignore[index]
        image_args, compose_args = vars(parse_crest(default)), vars(parse_crest(cmd))
        differ = {k for k in image_args if image_args[k] != compose_args[k]}
        assert differ <= {"ray_address", "num_workers", "cpus_per_worker"}, differ


def test_trainer_sends_the_token_the_selector_requires() -> None:
    assert trainer_token_problems(load_compose()) == []


# ---------------------------------------------------------------- images


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_passes_hadolint(dockerfile: Path) -> None:
    # Default threshold: any finding, down to "info", fails; justified exceptions are inline `hadolint ignore`.
    out = run_tool(tool("hadolint"), "--no-color", dockerfile)
    assert out.returncode == 0, out.stdout + out.stderr


def test_three_images_non_root_with_healthchecks() -> None:
    names = {p.name for p in DOCKERFILES}
    assert names == {"selector-cpu.Dockerfile", "selector-gpu.Dockerfile", "trainer-gpu.Dockerfile"}
    for path in DOCKERFILES:
        text = path.read_text()
        assert len(re.findall(r"^FROM ", text, re.M)) >= 2, f"{path.name}: not multi-stage"
        assert re.search(r"^USER 10001", text, re.M), f"{path.name}: not a non-root user"
        assert re.search(r"^HEALTHCHECK ", text, re.M), f"{path.name}: no HEALTHCHECK"
        for image in re.findall(r"^ARG \w+_IMAGE=(\S+)$", text, re.M):
            assert re.search(r":\d+\.\d+\.\d+-", image), f"{path.name}: base image {image} is not pinned to a release"


def test_hadolint_rejects_a_broken_dockerfile(tmp_path: Path) -> None:
    path = tmp_path / "Dockerfile"
    text = (DEPLOY / "selector-cpu.Dockerfile").read_text()
    path.write_text(text.replace("WORKDIR /app", "WORKDIR app").replace("USER 10001:10001", "USER root"))
    out = run_tool(tool("hadolint"), "--no-color", "--failure-threshold", "error", path)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "DL3000" in out.stdout  # relative WORKDIR: an error
    assert "DL3002" in out.stdout  # last USER root: reported too


def test_dockerignore_keeps_what_the_images_copy() -> None:
    patterns = [
        line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines() if line.strip()[:1] not in "#"
    ]
    copied = set()
    for path in DOCKERFILES:
        for line in re.findall(r"^COPY (?!--from)(.+)$", path.read_text(), re.M):
            copied.update(line.split()[:-1])
    assert copied >= {"proto", "selector_service", "trainer_client", "pyproject.toml", "examples"}
    for src in copied:
        assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
        for pattern in patterns:
            assert not Path(src).match(pattern.rstrip("/")) and not src.startswith(pattern.rstrip("/") + "/"), (
                f"COPY {src} is excluded by .dockerignore pattern {pattern!r}"
            )
    assert {".git", ".venv", "tests"} <= set(patterns)


def test_healthcheck_probe_against_a_real_server() -> None:
    from selector_service.backends import LocalBackend
    from selector_service.server import ServerConfig, start_server

    probe = [sys.executable, str(DEPLOY / "healthcheck.py")]
    # With a token the server still answers health checks without one (load balancers, this probe).
    running = start_server(ServerConfig(port=0, backend="local", auth_token="s3cret"), backend=LocalBackend(1))
    try:
        ok = subprocess.run([*probe, running.target], capture_output=True, text=True, timeout=60, check=False)
        assert ok.returncode == 0, ok.stderr
        unknown = subprocess.run([*probe, running.target, "no.such"], capture_output=True, text=True, timeout=60)
        assert unknown.returncode == 1 and "NOT_FOUND" in unknown.stderr
    finally:
        running.stop(grace=0)
    down = subprocess.run([*probe, running.target], capture_output=True, text=True, timeout=60, check=False)
    assert down.returncode == 1 and "UNAVAILABLE" in down.stderr


def test_entrypoint_runs_the_command_without_a_cluster_to_join() -> None:
    env = {k: v for k, v in os.environ.items() if k != "RAY_JOIN_ADDRESS"}
    out = subprocess.run(
        ["sh", str(DEPLOY / "entrypoint.sh"), "sh", "-c", 'echo "ran $0 $1"', "a", "b"],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
        check=False,
    )
    assert (out.returncode, out.stdout) == (0, "ran a b\n"), out.stderr
    assert os.access(DEPLOY / "entrypoint.sh", os.X_OK)


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
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
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
