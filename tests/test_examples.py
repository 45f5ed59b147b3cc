"""The README's before/after examples run as scripts: the plain loop, and the same loop on CREST coresets from a
real server (five lines differ)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from selector_service.backends import LocalBackend
from selector_service.server import RunningServer, ServerConfig, start_server
from selector_service.tasks import Batch

pytestmark = pytest.mark.slow
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


def test_plain_loop_and_its_crest_version_both_train(server: RunningServer) -> None:
    delivered: list[Batch] = []
    server.manager.batch_hooks.append(delivered.append)
    before = _accuracy([str(EXAMPLES / "plain_before.py"), "--steps", "40"])
    after = _accuracy([str(EXAMPLES / "plain_after.py"), "--steps", "40", "--endpoint", server.target])
    assert before > 0.5 and after > 0.5  # ten classes: chance is 0.1
    assert len(delivered) > 0  # the CREST version trained on coresets from the server ...
    assert server.manager.totals()["sessions"] == 0  # ... and closed its session
