"""Session checkpoints: a restarted service resumes its sessions; bad files are set aside, never fatal."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import grpc
import numpy as np
import pytest

from crest.selector.v1.api import TrainerReport
from selector_service.backends import LocalBackend
from selector_service.persistence import SessionStore
from selector_service.server import RunningServer, ServerConfig, start_server
from trainer_client.client import SelectionClient, SessionInfo


def _server(state_dir: Path) -> RunningServer:
    return start_server(ServerConfig(port=0, backend="local", state_dir=str(state_dir)), backend=LocalBackend(2))


def _labels() -> np.ndarray:
    return np.random.default_rng(0).permutation(np.repeat(np.arange(10), 100)).astype(np.int64)


def _create_with_exclusion(client: SelectionClient) -> SessionInfo:
    return client.create_session(
        _labels(),
        subset_fraction=0.1,
        num_subsets=2,
        batch_size=20,
        drop_learned=True,
        drop_window=1,
        min_pool_fraction=0.5,
        joint_selection=True,
        seed=4,
        client_name="resume-test",
    )


def _round(client: SelectionClient, sid: str, round_id: int, loss: float) -> list[np.ndarray]:
    plan = client.start_round(sid, round_id, round_id)
    emb = np.random.default_rng(round_id).normal(size=(len(plan.ids), 10)).astype(np.float32)
    client.submit_embeddings(sid, round_id, plan.ids, emb, losses=np.full(len(plan.ids), loss, np.float32))
    return [b.ids for b in client.stream_batches(sid, round_id)]


def test_store_round_trips_nested_state(tmp_path: Path) -> None:
    store = SessionStore(tmp_path)
    state = {"session_id": "abc123", "n": 3, "labels": np.arange(5), "inner": {"x": np.ones((2, 2)), "k": "v"}}
    store.save(state)
    (loaded,) = store.load_all()
    assert loaded["n"] == 3 and loaded["inner"]["k"] == "v"
    np.testing.assert_array_equal(loaded["labels"], np.arange(5))
    np.testing.assert_array_equal(loaded["inner"]["x"], np.ones((2, 2)))
    with pytest.raises(ValueError, match="not alphanumeric"):
        store.path("../etc")


def test_tampered_checkpoint_fails_its_checksum_and_the_previous_one_is_used(tmp_path: Path) -> None:
    """A file that is a valid zip (so its CRCs pass) but whose content changed is caught by the SHA-256."""
    store = SessionStore(tmp_path)
    store.save({"session_id": "abc", "step": 1, "history": np.zeros(4, np.float32)})
    store.save({"session_id": "abc", "step": 2, "history": np.ones(4, np.float32)})
    path = store.path("abc")
    with np.load(path) as data:
        entries = {name: data[name] for name in data.files}
    entries["history"] = np.full(4, 7, np.float32)  # a silent change, re-zipped with fresh CRCs
    with open(path, "wb") as f:
        np.savez(f, **entries)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"checksum mismatch in abc\.npz"):
        store.load(path)
    (state,) = store.load_all()
    assert state["step"] == 1  # the previous checkpoint
    np.testing.assert_array_equal(state["history"], np.zeros(4, np.float32))
    assert (tmp_path / "sessions" / "abc.corrupt").exists()


def test_restarted_service_resumes_sessions_with_identical_exclusion_state(tmp_path: Path) -> None:
    first = _server(tmp_path)
    try:
        with SelectionClient(first.target, timeout_s=30) as client:
            info = _create_with_exclusion(client)
            sid = info.session_id
            _round(client, sid, 0, loss=0.0)  # every example of round 0 is learned and excluded
            before_state = client.session_state(sid)
            assert before_state.config.joint_selection  # and after the restart: the states compare equal below
            closed = client.create_session(_labels()).session_id
            client.close_session(closed)
        before = first.manager.get(sid).exclusion.state_dict()
        excluded = np.flatnonzero(before["excluded"])
        assert len(excluded) > 0
    finally:
        first.stop(grace=0)
    second = _server(tmp_path)
    try:
        after = second.manager.get(sid).exclusion.state_dict()
        for key in ("history", "counts", "excluded"):
            np.testing.assert_array_equal(after[key], before[key])
        with SelectionClient(second.target, timeout_s=30) as client:
            with pytest.raises(grpc.RpcError) as err:
                client.session_state(sid)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED  # the token survives the restart ...
            client.attach_session(info)  # ... and still opens the session
            assert client.session_state(sid) == before_state
            with pytest.raises(grpc.RpcError) as err:
                client.start_round(sid, 0, 0)
            assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS  # round ids stay unique
            for ids in _round(client, sid, 1, loss=1.0):
                assert not np.isin(ids, excluded).any()
            with pytest.raises(grpc.RpcError) as err:
                client.session_state(closed)
            assert err.value.code() == grpc.StatusCode.NOT_FOUND  # closed sessions stay closed
    finally:
        second.stop(grace=0)


def test_the_trainers_report_survives_a_restart_and_a_state_saved_without_one_loads(tmp_path: Path) -> None:
    report = TrainerReport(
        trainer_fallback_batches=4,
        trainer_service_errors=1,
        trainer_control_steps=9,
        payoff_measurements=2,
        payoff_per_second=0.75,
        payoff_per_second_lo=0.5,
        payoff_per_second_hi=float("inf"),
        payoff_arm="selection",
    )
    first = _server(tmp_path)
    try:
        with SelectionClient(first.target, timeout_s=30) as client:
            info = client.create_session(_labels(), subset_fraction=0.1, num_subsets=2, batch_size=20)
            client.start_round(info.session_id, 0, 0, trainer_wait_s=1.5, report=report)
    finally:
        first.stop(grace=0)
    state = SessionStore(tmp_path).load_all()[0]
    assert TrainerReport(**state["trainer_report"]) == report  # the JSON document keeps the infinity
    second = _server(tmp_path)
    try:
        with SelectionClient(second.target, timeout_s=30) as client:
            client.attach_session(info)
            assert TrainerReport.from_proto(client.session_state(info.session_id)) == report
    finally:
        second.stop(grace=0)

    del state["trainer_report"]  # the state a build from before the report wrote (the same version, without it)
    SessionStore(tmp_path).save(state)
    third = _server(tmp_path)
    try:
        with SelectionClient(third.target, timeout_s=30) as client:
            client.attach_session(info)
            restored = client.session_state(info.session_id)
            assert (restored.next_round_id, restored.trainer_wait_s) == (1, 1.5)
            kept = dataclasses.astuple(TrainerReport.from_proto(restored))
            np.testing.assert_equal(kept, dataclasses.astuple(TrainerReport()))  # nothing reported yet
            assert client.start_round(info.session_id, 1, 5, report=report).round_id == 1
            assert TrainerReport.from_proto(client.session_state(info.session_id)) == report
    finally:
        third.stop(grace=0)


def test_corrupt_checkpoint_is_set_aside_and_the_previous_one_used(tmp_path: Path) -> None:
    first = _server(tmp_path)
    try:
        with SelectionClient(first.target, timeout_s=30) as client:
            infos = [client.create_session(_labels(), client_name=name) for name in ("good", "bad", "older")]
            good, bad, older = (i.session_id for i in infos)
            client.start_round(older, 0, 0)  # a second checkpoint: the first becomes .prev
    finally:
        first.stop(grace=0)
    newest = tmp_path / "sessions" / f"{older}.npz"
    newest.write_bytes(newest.read_bytes()[:-40])  # torn tail: the zip directory is gone
    path = tmp_path / "sessions" / f"{bad}.npz"
    path.write_bytes(path.read_bytes()[:100])  # truncated, and no previous checkpoint to fall back on
    (tmp_path / "sessions" / "deadbeef.tmp").write_bytes(b"interrupted write")
    second = _server(tmp_path)
    try:
        with SelectionClient(second.target, timeout_s=30) as client:
            for info in infos:
                client.attach_session(info)
            assert client.session_state(good).dataset_size == 1000
            with pytest.raises(grpc.RpcError) as err:
                client.session_state(bad)
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
            assert client.session_state(older).next_round_id == 0  # the last good checkpoint: before round 0
        assert (tmp_path / "sessions" / f"{bad}.corrupt").exists()
        assert (tmp_path / "sessions" / f"{older}.corrupt").exists()
        assert not (tmp_path / "sessions" / "deadbeef.tmp").exists()
    finally:
        second.stop(grace=0)
