"""What the deployment tests share: the files' paths, the validator tools, compose interpolation, and the checks
that the commands and environment in the deployment files agree with the flags the real CLIs accept."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from crest.cli import build_parser

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
    gpu_build = base["services"]["trainer"].get("build", {})
    if cpu.get("build", {}).get("dockerfile") != gpu_build.get("dockerfile"):
        problems.append("trainer-cpu: not built from the GPU trainer's Dockerfile")
    if cpu.get("image") in (base["services"]["selector"]["image"], base["services"]["trainer"]["image"]):
        problems.append("trainer-cpu: shares its image name with another image of the stack")
    return problems


def trainer_token_problems(compose: dict[str, Any]) -> list[str]:
    """The selector binds beyond loopback with a token; the trainer must send it (--token or $CREST_AUTH_TOKEN)."""
    cmd = [str(c) for c in compose["services"]["trainer"]["command"]]
    script = parse_torchrun(cmd).training_script
    if "--token" in cmd or "--token" in script_flags(script):
        return []
    return [f"trainer: {script} has no --token and the selector requires one; every call would be UNAUTHENTICATED"]
