"""The README's before/after examples run as scripts: the plain loop, and the same loop on CREST coresets from a
real server (five lines differ); the same for a Hugging Face ``Trainer`` and a Lightning fit."""

from __future__ import annotations

import ast
import difflib
import importlib.util
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from selector_service.backends import LocalBackend
from selector_service.server import RunningServer, ServerConfig, start_server
from selector_service.tasks import Batch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
ENV = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"}


@pytest.fixture
def server() -> Iterator[RunningServer]:
    running = start_server(ServerConfig(port=0, backend="local"), backend=LocalBackend(1))
    yield running
    running.stop(grace=0)


def _accuracy(args: list[str]) -> float:
    run = subprocess.run([sys.executable, *args], env=ENV, capture_output=True, text=True, timeout=600, check=False)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    (line,) = [x for x in run.stdout.splitlines() if x.startswith("test accuracy")]
    return float(line.split()[2])


@pytest.mark.slow
def test_plain_loop_and_its_crest_version_both_train(server: RunningServer) -> None:
    delivered: list[Batch] = []
    server.manager.batch_hooks.append(delivered.append)
    before = _accuracy([str(EXAMPLES / "plain_before.py"), "--steps", "40"])
    after = _accuracy([str(EXAMPLES / "plain_after.py"), "--steps", "40", "--endpoint", server.target])
    assert before > 0.5 and after > 0.5  # ten classes: chance is 0.1
    assert len(delivered) > 0  # the CREST version trained on coresets from the server ...
    assert server.manager.totals()["sessions"] == 0  # ... and closed its session


# (script without CREST, the same script on CREST coresets)
PAIRS = [
    ("plain_before.py", "plain_after.py"),
    ("hf_trainer_plain.py", "hf_trainer.py"),
    ("lightning_fit_plain.py", "lightning_fit.py"),
]


def _code_lines(path: Path) -> list[str]:
    """The script's lines after its module docstring (the usage text differs by design)."""
    lines = path.read_text().splitlines()
    docstring = ast.parse("\n".join(lines)).body[0]
    assert isinstance(docstring, ast.Expr), f"{path.name} starts with its docstring"
    return lines[docstring.end_lineno :]


@pytest.mark.parametrize(("plain", "crest"), PAIRS)
def test_each_crest_example_is_a_small_diff_of_its_plain_script(plain: str, crest: str) -> None:
    diff = difflib.ndiff(_code_lines(EXAMPLES / plain), _code_lines(EXAMPLES / crest))
    added = [line[2:] for line in diff if line.startswith("+ ")]
    assert 1 <= len(added) <= 5, f"{crest} differs from {plain} by {len(added)} lines:\n" + "\n".join(added)


def _needs(module: str) -> None:
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed (its extra is missing)")


@pytest.mark.slow
def test_hf_trainer_and_its_crest_version_both_train(server: RunningServer, tmp_path: Path) -> None:
    _needs("transformers")
    delivered: list[Batch] = []
    server.manager.batch_hooks.append(delivered.append)
    out = ["--steps", "60", "--out", str(tmp_path)]
    before = _accuracy([str(EXAMPLES / "hf_trainer_plain.py"), *out])
    after = _accuracy([str(EXAMPLES / "hf_trainer.py"), *out, "--endpoint", server.target])
    assert before > 0.5 and after > 0.5
    assert len(delivered) > 0 and server.manager.totals()["sessions"] == 0


@pytest.mark.slow
def test_lightning_fit_and_its_crest_version_both_train(server: RunningServer) -> None:
    _needs("lightning")
    delivered: list[Batch] = []
    server.manager.batch_hooks.append(delivered.append)
    before = _accuracy([str(EXAMPLES / "lightning_fit_plain.py"), "--steps", "30"])
    after = _accuracy([str(EXAMPLES / "lightning_fit.py"), "--steps", "30", "--endpoint", server.target])
    assert before > 0.5 and after > 0.5
    assert len(delivered) > 0 and server.manager.totals()["sessions"] == 0


def _readme_loop() -> str:
    """The README's loop snippet: the first python block under "Point an existing PyTorch loop"."""
    readme = (EXAMPLES.parent / "README.md").read_text()
    section = readme.split("## Point an existing PyTorch loop", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_the_readmes_loop_runs_unchanged_against_a_token_protected_service(monkeypatch: pytest.MonkeyPatch) -> None:
    """The snippet builds ``SelectionClient("localhost:50051")`` with no token: the client takes CREST_AUTH_TOKEN,
    as set beside the compose stack. Only the port is this test's (the service listens on a free one)."""
    import grpc
    import torch

    from trainer_client.data import FashionMNIST
    from trainer_client.models import SmallCNN

    running = start_server(ServerConfig(port=0, backend="local", auth_token="s3cret"), backend=LocalBackend(1))
    snippet = _readme_loop()
    assert 'SelectionClient("localhost:50051")' in snippet and "token" not in snippet
    code = snippet.replace("localhost:50051", f"localhost:{running.port}")
    torch.manual_seed(0)
    model = SmallCNN()
    scope = {
        "train_set": FashionMNIST("train"),
        "model": model,
        "opt": torch.optim.SGD(model.parameters(), lr=0.05),
        "num_steps": 6,
    }
    try:
        monkeypatch.setenv("CREST_AUTH_TOKEN", "s3cret")
        exec(code, scope)  # the README's own code
        stats = scope["loader"].stats
        assert stats.steps == 6 and stats.fallback_batches == 0 and stats.service_errors == 0
        assert running.manager.totals()["sessions"] == 0  # the snippet's close() ended its session
        monkeypatch.setenv("CREST_AUTH_TOKEN", "wrong")
        with pytest.raises(grpc.RpcError) as refused:  # a wrong token is the trainer's setup: raised at once
            exec(code, {**scope, "model": SmallCNN()})
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        running.stop(grace=0)
