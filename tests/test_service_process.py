"""`crest serve` as a process: SIGTERM drains and exits 0; SIGKILL mid-round loses only the round in flight; the
restarted service (same port and --state-dir) resumes the session, and a training job rides it out in it."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import grpc
import numpy as np
import pytest
from loader_settings import loader_settings

from selector_service.process import ServiceProcess, spawn_service
from selector_service.provenance import ProvenanceLog
from trainer_client.client import SelectionClient

pytestmark = pytest.mark.slow
ENV = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "RAY_AUTH_MODE": "disabled"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _serve(port: int, state: Path) -> ServiceProcess:
    return spawn_service(["--port", str(port), "--backend", "local", "--state-dir", str(state)], env=ENV)


def _embed_round(client: SelectionClient, sid: str, round_id: int) -> None:
    plan = client.start_round(sid, round_id, 10 * round_id)
    emb = np.random.default_rng(round_id).normal(size=(len(plan.ids), 10)).astype(np.float32)
    client.submit_embeddings(sid, round_id, plan.ids, emb)


def test_sigterm_exits_zero_and_sigkill_loses_only_the_round_in_flight(tmp_path: Path) -> None:
    port = _free_port()
    labels = np.arange(1000) % 10
    service = _serve(port, tmp_path)
    with SelectionClient(service.target, timeout_s=30) as client:
        info = client.create_session(labels, subset_fraction=0.05, num_subsets=2, batch_size=20)
        sid = info.session_id
        _embed_round(client, sid, 0)
        first = list(client.stream_batches(sid, 0))
    assert service.stop(timeout_s=60) == 0  # SIGTERM is graceful: stops accepting, closes the backend, exits 0

    service = _serve(port, tmp_path)
    try:
        with SelectionClient(service.target, timeout_s=30) as client:
            client.attach_session(info)  # a new client (a restarted trainer) presents the saved session token
            assert client.session_state(sid).rounds_completed == 1
            _embed_round(client, sid, 1)  # selection dispatched, batches not yet streamed
            service.kill()
            service = _serve(port, tmp_path)  # same port: the client's channel reconnects
            state = client.session_state(sid)
            assert (state.rounds_completed, state.next_round_id, state.batches_delivered) == (1, 2, 2)
            with pytest.raises(grpc.RpcError) as err:
                list(client.stream_batches(sid, 1))
            assert err.value.code() == grpc.StatusCode.NOT_FOUND  # the round in flight died with the process
            _embed_round(client, sid, 2)  # the trainer asks for the next round and carries on
            later = list(client.stream_batches(sid, 2))
    finally:
        service.stop()
    logged = ProvenanceLog(tmp_path).read(sid)
    assert sorted((r["round_id"], r["subset_index"]) for r in logged) == [(0, 0), (0, 1), (2, 0), (2, 1)]
    assert len(first) == len(later) == 2


def test_training_job_rides_out_a_sigkilled_service_and_keeps_its_session(tmp_path: Path) -> None:
    """A real training loop; the service is SIGKILLed mid-training and restarted on the same --state-dir."""
    import torch

    from trainer_client.data import FashionMNIST
    from trainer_client.embeddings import weighted_loss
    from trainer_client.loader import CoresetLoader
    from trainer_client.models import SmallCNN

    torch.set_num_threads(1)
    torch.manual_seed(0)
    data = FashionMNIST("train", limit=1000)
    model = SmallCNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    config = loader_settings(
        batch_size=32,
        subset_fraction=0.05,
        num_subsets=2,
        steps_per_round=4,
        lookahead_steps=1,
        reconnect_initial_s=0.05,
        reconnect_max_s=0.2,
    )
    port = _free_port()
    services = [_serve(port, tmp_path)]
    client = SelectionClient(services[0].target, timeout_s=30)
    try:
        with CoresetLoader(data, model, client, data.targets.numpy(), config=config) as loader:
            regions_at_kill = 0
            for step, (x, y, w) in zip(range(200), loader, strict=False):
                loss = weighted_loss(model(x), y, w)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                assert torch.isfinite(loss)
                if step == 12:
                    regions_at_kill = loader.stats.regions
                    services[-1].kill()  # SIGKILL: no drain, no final checkpoint
                    services.append(_serve(port, tmp_path))
                if step >= 40 and loader.stats.regions > regions_at_kill + 2:
                    break  # trained on coresets of the restarted service for a while
            stats = loader.stats
            session_id = loader.session.session_id if loader.session else ""
    finally:
        client.close()
        for s in services:
            s.stop()
    assert stats.sessions_opened == 1  # the session (and its token) survived the SIGKILL
    assert stats.regions > regions_at_kill + 2
    logged = ProvenanceLog(tmp_path).read(session_id)
    delivered = [(r["round_id"], r["subset_index"]) for r in logged]
    assert len(delivered) == len(set(delivered))  # no batch twice
    partial = [r for r in {r for r, _ in delivered} if sorted(s for q, s in delivered if q == r) != [0, 1]]
    assert len(partial) <= 1, partial  # only a round the kill cut short can be incomplete
