"""Compose files and images, validated without a Docker engine.

- docker-compose.yml and deploy/compose.cpu.yml against the compose specification (check-jsonschema's vendored
  schema), the Dockerfiles with hadolint; each validator is also shown to reject a broken copy.
- The commands and environment of the compose services agree with the flags that ``crest``, ``ray start``,
  ``torchrun`` and the trainer script really accept, so the files cannot silently rot (``deploy_files.py``).
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from deploy_files import (
    COMPOSE,
    COMPOSE_CPU,
    DEPLOY,
    DOCKERFILES,
    ROOT,
    compose_problems,
    cpu_override_problems,
    load_compose,
    load_yaml,
    parse_crest,
    run_tool,
    tool,
    trainer_token_problems,
)

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
    text = (DEPLOY / "selector.Dockerfile").read_text()
    default = json.loads(re.search(r"^CMD (\[.*\])$", text, re.M)[1])  # type: ignore[index]
    image_args, compose_args = vars(parse_crest(default)), vars(parse_crest(cmd))
    differ = {k for k in image_args if image_args[k] != compose_args[k]}
    assert differ <= {"ray_address", "num_workers", "cpus_per_worker"}, differ


def test_gpu_and_cpu_trainers_differ_only_in_base_image_and_torch_build() -> None:
    """The GPU compose file's trainer and the CPU file's build the same Dockerfile with the same entry point; the
    GPU one's build refuses a CPU torch."""
    compose, override = load_compose(), load_compose(COMPOSE_CPU)
    gpu, cpu = compose["services"]["trainer"], override["services"]["trainer-cpu"]
    assert gpu["build"]["dockerfile"] == cpu["build"]["dockerfile"] == "deploy/trainer.Dockerfile"
    assert set(cpu["build"]["args"]) == {"PYTHON_IMAGE", "TORCH_INDEX_URL"}
    assert set(gpu["build"]["args"]) == {"PYTHON_IMAGE", "TORCH_INDEX_URL", "REQUIRE_CUDA"}  # fails on a CPU torch
    assert gpu["build"]["args"]["REQUIRE_CUDA"]
    assert "cuda" in gpu["build"]["args"]["PYTHON_IMAGE"] and "cuda" not in cpu["build"]["args"]["PYTHON_IMAGE"]
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["driver"] == "nvidia"
    assert "deploy" not in cpu and override["services"]["trainer"]["profiles"] == ["gpu"]  # the GPU one moves aside
    # The selector image is built once, by the selector service; the Ray nodes run it as built.
    selector = compose["services"]["selector"]
    assert selector["build"]["dockerfile"] == "deploy/selector.Dockerfile"
    for node in ("ray-head", "ray-worker"):
        assert "build" not in compose["services"][node]
        assert compose["services"][node]["image"] == selector["image"]


def test_trainer_sends_the_token_the_selector_requires() -> None:
    assert trainer_token_problems(load_compose()) == []


# ---------------------------------------------------------------- images


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_passes_hadolint(dockerfile: Path) -> None:
    # Default threshold: any finding, down to "info", fails; justified exceptions are inline `hadolint ignore`.
    out = run_tool(tool("hadolint"), "--no-color", dockerfile)
    assert out.returncode == 0, out.stdout + out.stderr


def test_two_images_non_root_with_healthchecks() -> None:
    names = {p.name for p in DOCKERFILES}
    assert names == {"selector.Dockerfile", "trainer.Dockerfile"}
    for path in DOCKERFILES:
        text = path.read_text()
        assert len(re.findall(r"^FROM ", text, re.M)) >= 2, f"{path.name}: not multi-stage"
        assert re.search(r"^USER 10001", text, re.M), f"{path.name}: not a non-root user"
        assert re.search(r"^HEALTHCHECK ", text, re.M), f"{path.name}: no HEALTHCHECK"
        for image in re.findall(r"^ARG \w+_IMAGE=(\S+)$", text, re.M):
            assert re.search(r":\d+\.\d+\.\d+-", image), f"{path.name}: base image {image} is not pinned to a release"


def test_hadolint_rejects_a_broken_dockerfile(tmp_path: Path) -> None:
    path = tmp_path / "Dockerfile"
    text = (DEPLOY / "selector.Dockerfile").read_text()
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
    assert copied >= {"proto", "selector_service", "trainer_client", "benchmarks", "pyproject.toml", "examples"}
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
