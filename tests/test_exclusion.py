"""Learned-example exclusion: the rule, its floors, re-admission and versioned state."""

from __future__ import annotations

import numpy as np
import pytest

from selector_service import InvalidArgument
from selector_service.exclusion import ExclusionConfig, ExclusionState


def _state(n: int = 100, classes: int = 4, **config: object) -> ExclusionState:
    labels = np.arange(n) % classes
    return ExclusionState(labels, ExclusionConfig(enabled=True, **config), min_per_class=2)  # type: ignore[arg-type]


def _record_rounds(state: ExclusionState, ids: np.ndarray, losses: np.ndarray, rounds: int) -> None:
    for _ in range(rounds):
        state.record(ids, losses)


def test_learned_needs_a_full_window_of_low_losses() -> None:
    s = _state(window=3, min_pool_fraction=0.1)
    ids = np.arange(10)
    _record_rounds(s, ids, np.full(10, 0.05, np.float32), 2)
    assert len(s.update().excluded) == 0  # only 2 of 3 losses recorded
    losses = np.full(10, 0.05, np.float32)
    losses[3] = 0.5  # one high loss in the window keeps example 3 active
    s.record(ids, losses)
    assert s.update().excluded.tolist() == [0, 1, 2, 4, 5, 6, 7, 8, 9]
    assert not s.active[[0, 1, 2]].any() and s.active[3]


def test_floor_as_fraction_of_n_and_per_class_minimum() -> None:
    s = _state(n=100, classes=4, window=1, min_pool_fraction=0.9)
    s.record(np.arange(100), np.linspace(0.0, 0.05, 100).astype(np.float32))  # everything learned
    update = s.update()
    assert len(update.excluded) == 10 and s.active.sum() == 90
    assert update.excluded.tolist() == list(range(10))  # lowest losses first
    t = _state(n=40, classes=4, window=1, min_pool_fraction=0.01)
    t.record(np.arange(40), np.zeros(40, np.float32))
    t.update()
    assert np.bincount(t.labels[t.active], minlength=4).tolist() == [2, 2, 2, 2]


def test_excluded_examples_are_readmitted_when_their_loss_rises() -> None:
    s = _state(window=1, min_pool_fraction=0.5)
    s.record(np.arange(20), np.zeros(20, np.float32))
    assert len(s.update().excluded) == 20
    retest = s.retest_ids(5, np.random.default_rng(0))
    assert len(retest) == 5 and s.excluded[retest].all()
    s.record(retest, np.array([0.0, 2.0, 0.0, 3.0, 0.0], np.float32))
    update = s.update()
    assert update.readmitted.tolist() == sorted(retest[[1, 3]].tolist())
    assert s.active[update.readmitted].all() and s.counts[update.readmitted].tolist() == [0, 0]
    assert s.readmitted_total == 2


def test_without_readmit_exclusion_is_final() -> None:
    s = _state(window=1, min_pool_fraction=0.5, readmit=False)
    s.record(np.arange(5), np.zeros(5, np.float32))
    s.update()
    assert len(s.retest_ids(5, np.random.default_rng(0))) == 0
    s.record(np.arange(5), np.full(5, 9.0, np.float32))
    assert len(s.update().readmitted) == 0 and s.excluded[:5].all()


def test_state_dict_round_trip_and_refusals() -> None:
    s = _state(window=2, min_pool_fraction=0.5)
    _record_rounds(s, np.arange(30), np.zeros(30, np.float32), 2)
    s.update()
    saved = s.state_dict()
    t = _state(window=2, min_pool_fraction=0.5)
    t.load_state_dict(saved)
    np.testing.assert_array_equal(t.excluded, s.excluded)
    np.testing.assert_array_equal(t.history, s.history)
    for bad, message in (
        ({**saved, "version": 2}, "version 2 is not supported"),
        ({**saved, "dataset_size": 99}, "dataset of 99 examples, this one has 100"),
    ):
        before = t.state_dict()
        with pytest.raises(InvalidArgument, match=message):
            t.load_state_dict(bad)
        np.testing.assert_array_equal(t.excluded, before["excluded"])
    with pytest.raises(InvalidArgument, match=r"history has shape \(2, 100\), expected \(3, 100\)"):
        _state(window=3).load_state_dict(saved)


def test_bad_records_change_nothing() -> None:
    s = _state()
    before = s.state_dict()
    for ids, losses, message in (
        (np.array([1, 1]), np.zeros(2), "unique"),
        (np.array([100]), np.zeros(1), r"\[0, 100\)"),
        (np.array([1]), np.array([np.nan]), "finite"),
        (np.array([1, 2]), np.zeros(3), "matching"),
    ):
        with pytest.raises(InvalidArgument, match=message):
            s.record(ids, losses)
    np.testing.assert_array_equal(s.counts, before["counts"])
    with pytest.raises(InvalidArgument, match="window must be in"):
        _state(window=0)
