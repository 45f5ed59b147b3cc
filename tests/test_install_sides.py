"""Installing one side alone, as deploy/README.md ("Installing by side") says, into fresh virtual environments:
the trainer side from the wheel that ``make wheel`` builds, the selector side from the checkout. Each imports
its side and not the other's, its ``crest`` command names the extra it lacks, and a trainer-only environment
trains against a selector-only environment's ``crest serve`` over gRPC.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from selector_service.process import READY_PREFIX

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
PROBE = (
    "import importlib.util as u, json; "
    "print(json.dumps({m: u.find_spec(m) is not None for m in ('torch', 'ray', 'faiss', 'numba', 'trainer_client')}))"
)


def _run(args: list[str | Path], timeout: float = 900, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(map(str, args))} exited with {done.returncode}:\n{done.stderr[-3000:]}"
    return done


def _venv(path: Path) -> Path:
    _run([sys.executable, "-m", "venv", path])
    return path / "bin"


@pytest.fixture(scope="module")
def sides(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """{"trainer": bin dir, "selector": bin dir}, each a fresh venv holding one side."""
    tmp = tmp_path_factory.mktemp("sides")
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", tmp / "dist", ROOT])
    (wheel,) = (tmp / "dist").glob("crest_selection-*.whl")
    trainer = _venv(tmp / "trainer")
    # torch==2.13.0 first, as the README says: the CPU wheel where the machine has one.
    _run([trainer / "pip", "install", "-q", "torch==2.13.0"])
    _run([trainer / "pip", "install", "-q", f"{wheel}[trainer]"])
    selector = _venv(tmp / "selector")
    _run([selector / "pip", "install", "-q", f"{ROOT}[cpu]"])
    return {"trainer": trainer, "selector": selector}


def _modules(bin_dir: Path) -> dict[str, bool]:
    return json.loads(_run([bin_dir / "python", "-c", PROBE], cwd=bin_dir).stdout)


def test_each_side_holds_its_dependencies_only(sides: dict[str, Path]) -> None:
    assert _modules(sides["trainer"]) == {
        "torch": True, "ray": False, "faiss": False, "numba": False, "trainer_client": True
    }  # fmt: skip
    selector = _modules(sides["selector"])
    assert selector == {"torch": False, "ray": True, "faiss": True, "numba": True, "trainer_client": True}
    # The trainer_client package ships in every install; without torch it says what to install.
    _run(
        [sides["selector"] / "python", "-c", "import selector_service.server, crest.selector.v1"], cwd=sides["selector"]
    )


def test_each_sides_command_names_the_extra_it_lacks(sides: dict[str, Path]) -> None:
    serve = subprocess.run(
        [sides["trainer"] / "crest", "serve", "--port", "0"], capture_output=True, text=True, timeout=120
    )
    assert serve.returncode == 2 and "No module named" in serve.stderr and "'.[cpu]'" in serve.stderr, serve.stderr
    train = subprocess.run([sides["selector"] / "crest", "train"], capture_output=True, text=True, timeout=120)
    assert train.returncode == 2 and "'.[trainer]'" in train.stderr, train.stderr
    for side in sides.values():  # both list every command
        assert "serve" in _run([side / "crest", "--help"]).stdout


@pytest.fixture
def selector_only_service(sides: dict[str, Path]) -> Iterator[str]:
    """``crest serve`` (local backend, port 0) from the selector-only environment; yields its target."""
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    args = [sides["selector"] / "crest", "serve", "--port", "0", "--backend", "local"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # the server prints READY once it serves (after its warm-up)
            if line.startswith(READY_PREFIX):
                yield line[len(READY_PREFIX) :].strip()
                break
        else:
            pytest.fail(f"crest serve exited with {proc.wait()} before it was ready")
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def test_trainer_side_trains_against_selector_side(sides: dict[str, Path], selector_only_service: str) -> None:
    port = selector_only_service.rsplit(":", 1)[1]
    args = [sides["trainer"] / "crest", "train", "--endpoint", f"127.0.0.1:{port}", "--steps", "30"]
    args += ["--train-limit", "2000", "--test-limit", "500", "--steps-per-round", "10"]
    out = _run(args, timeout=600).stdout
    rounds = re.search(r"selection rounds\s+(\d+)", out)
    fallback = re.search(r"uniform fallback batches \(late rounds\)\s+(\d+)", out)
    assert rounds and fallback, out
    assert int(rounds[1]) >= 3 and int(fallback[1]) == 0, out
