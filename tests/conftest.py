"""Shared fixtures. Environment first: these must be set before torch or Ray load."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from collections.abc import Iterator

import numpy as np
import pytest

from selector_service.backends import LocalBackend
from selector_service.server import RunningServer, ServerConfig, start_server
from trainer_client.client import SelectionClient


@pytest.fixture
def local_server() -> Iterator[RunningServer]:
    """A real gRPC server on a free loopback port, selecting in threads of this process."""
    running = start_server(ServerConfig(port=0, backend="local"), backend=LocalBackend(num_workers=2))
    yield running
    running.stop(grace=0)


@pytest.fixture
def client(local_server: RunningServer) -> Iterator[SelectionClient]:
    with SelectionClient(local_server.target, timeout_s=30) as c:
        c.wait_ready(timeout_s=10)
        yield c


@pytest.fixture
def small_labels() -> np.ndarray:
    """2,000 examples over 10 classes, shuffled, 200 per class."""
    return np.random.default_rng(7).permutation(np.repeat(np.arange(10), 200)).astype(np.int64)
