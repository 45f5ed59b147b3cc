"""``round_difficulty`` against a brute-force reference, and its errors."""

from __future__ import annotations

import numpy as np
import pytest

from trainer_client.difficulty import round_difficulty


def _brute_percentile(losses: np.ndarray, chosen: np.ndarray) -> float:
    """Mean over chosen positions of (#losses below + (#equal - 1) / 2) / (n - 1)."""
    n = len(losses)
    ranks = [((losses < losses[p]).sum() + ((losses == losses[p]).sum() - 1) / 2) / (n - 1) for p in chosen]
    return float(np.mean(ranks))


@pytest.mark.parametrize("seed", range(5))
def test_matches_a_brute_force_reference(seed: int) -> None:
    rng = np.random.default_rng(seed)
    ids = np.sort(rng.choice(10_000, 300, replace=False))
    losses = rng.exponential(1.0, 300).astype(np.float32)
    losses[:40] = losses[40]  # ties
    pos = rng.choice(300, 64, replace=False)
    weights = rng.uniform(0.5, 3.0, 64).astype(np.float32)
    d = round_difficulty(3, 100, 104, ids, losses, ids[pos], weights)
    chosen = losses[pos].astype(np.float64)
    assert (d.round, d.step, d.start_step, d.embedded, d.selected) == (3, 100, 104, 300, 64)
    assert d.embedded_loss == pytest.approx(losses.astype(np.float64).mean())
    assert d.selected_loss == pytest.approx(chosen.mean())
    assert d.selected_loss_weighted == pytest.approx(np.average(chosen, weights=weights))
    assert d.selected_percentile == pytest.approx(_brute_percentile(losses, pos))


def test_golden_extremes() -> None:
    ids = np.arange(5, dtype=np.int64) * 10
    losses = np.array([0.1, 0.2, 0.3, 0.4, 0.5], dtype=np.float32)
    hardest = round_difficulty(0, 0, 0, ids, losses, np.array([40]), np.ones(1, np.float32))
    easiest = round_difficulty(0, 0, 0, ids, losses, np.array([0]), np.ones(1, np.float32))
    everyone = round_difficulty(0, 0, 0, ids, losses, ids, np.ones(5, np.float32))
    assert (hardest.selected_percentile, easiest.selected_percentile, everyone.selected_percentile) == (1.0, 0.0, 0.5)
    assert everyone.selected_loss == pytest.approx(everyone.embedded_loss)


def test_selected_ids_outside_the_round_are_refused() -> None:
    ids, losses = np.array([1, 5, 9]), np.ones(3, np.float32)
    with pytest.raises(ValueError, match="among the round's embedded ids"):
        round_difficulty(0, 0, 0, ids, losses, np.array([5, 7]), np.ones(2, np.float32))
    with pytest.raises(ValueError, match="among the round's embedded ids"):
        round_difficulty(0, 0, 0, ids, losses, np.array([10]), np.ones(1, np.float32))
    with pytest.raises(ValueError, match="must match"):
        round_difficulty(0, 0, 0, ids, losses[:2], ids, np.ones(3, np.float32))
