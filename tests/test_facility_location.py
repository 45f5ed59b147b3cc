"""Oracle, golden and invariant tests of the selection maths."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from selector_service import InvalidArgument, select_coreset
from selector_service.coreset import minibatch_coreset
from selector_service.facility_location import facility_location, objective
from selector_service.similarity import similarity_matrix
from selector_service.subsets import class_balanced_subsets, per_class_quota, split_budget


def _data(seed: int, n: int, d: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)


def test_exp_kernel_matches_direct_formula() -> None:
    x = _data(0, 40, 10)
    direct = np.exp(-np.linalg.norm(x[:, None, :] - x[None, :, :], axis=2) / x.shape[1])
    sim = similarity_matrix(x, "exp")
    np.testing.assert_allclose(sim, direct, atol=1e-6)
    np.testing.assert_array_equal(sim, sim.T)
    np.testing.assert_array_equal(np.diag(sim), 1.0)


def test_maxdist_kernel_matches_direct_formula() -> None:
    x = _data(1, 30, 5)
    dist = np.linalg.norm(x[:, None, :] - x[None, :, :], axis=2)
    np.testing.assert_allclose(similarity_matrix(x, "maxdist"), dist.max() - dist, atol=1e-5)


def test_lazy_equals_naive_on_1000_random_instances() -> None:
    rng = np.random.default_rng(2)
    for trial in range(1000):
        n = int(rng.integers(2, 51))
        k = int(rng.integers(1, n + 1))
        x = rng.normal(size=(n, int(rng.integers(2, 12)))).astype(np.float32)
        sim = similarity_matrix(x, "exp" if trial % 2 else "maxdist")
        lazy, naive = facility_location(sim, k, "lazy"), facility_location(sim, k, "naive")
        np.testing.assert_array_equal(lazy.indices, naive.indices, err_msg=f"trial {trial}, n={n}, k={k}")
        np.testing.assert_allclose(lazy.gains, naive.gains, rtol=1e-9)


def test_lazy_breaks_ties_like_naive_on_duplicate_points() -> None:
    x = np.repeat(_data(3, 5, 4), 3, axis=0)  # every point three times: many exact ties
    sim = similarity_matrix(x, "exp")
    np.testing.assert_array_equal(facility_location(sim, 8, "lazy").indices, facility_location(sim, 8, "naive").indices)


def test_greedy_within_1_minus_1_over_e_of_brute_force_optimum() -> None:
    rng = np.random.default_rng(4)
    for _ in range(50):
        n, k = int(rng.integers(4, 13)), int(rng.integers(1, 5))
        sim = similarity_matrix(rng.normal(size=(n, 3)).astype(np.float32), "exp")
        best = max(objective(sim, np.array(s)) for s in itertools.combinations(range(n), k))
        got = objective(sim, facility_location(sim, k, "lazy").indices)
        assert got >= (1 - 1 / math.e) * best - 1e-9
        assert got <= best + 1e-9


def test_gains_sum_to_objective_and_do_not_increase() -> None:
    sim = similarity_matrix(_data(5, 200, 10), "exp")
    c = facility_location(sim, 20)
    assert np.isclose(c.gains.sum(), objective(sim, c.indices))
    assert (np.diff(c.gains) <= 1e-9).all()


def test_golden_selection_on_fixed_points() -> None:
    # Three tight clusters of sizes 5, 3, 2 on a line. With the local exp kernel greedy takes each cluster's
    # centre, biggest first (8 and 9 tie; the lower index wins). With the global maxdist kernel the first pick is
    # a medoid of all points.
    x = np.array([[0.0], [0.1], [-0.1], [0.2], [-0.2], [10.0], [10.1], [9.9], [20.0], [20.1]], dtype=np.float32)
    c = select_coreset(x, 3, similarity="exp")
    assert c.indices.tolist() == [0, 5, 8]
    assert c.weights.tolist() == [5.0, 3.0, 2.0]
    pick = select_coreset(x, 1, similarity="maxdist").indices[0]
    total = np.abs(x - x.T).sum(axis=1)  # maxdist's single best pick is the medoid (0.2 and 9.9 tie exactly)
    assert total[pick] == pytest.approx(total.min(), abs=1e-4)


def test_per_class_weights_are_positive_integers_summing_to_class_sizes() -> None:
    rng = np.random.default_rng(6)
    x = rng.normal(size=(500, 10)).astype(np.float32)
    y = rng.integers(0, 10, size=500)
    c = select_coreset(x, 130, labels=y)
    assert len(c.indices) == 130 and len(np.unique(c.indices)) == 130
    assert (c.weights >= 1).all() and (c.weights == np.round(c.weights)).all()
    for cls in range(10):
        members = y[c.indices] == cls
        assert c.weights[members].sum() == (y == cls).sum()
        assert members.sum() >= 1


def test_minibatch_coreset_weights_have_mean_one_and_estimate_subset_mean() -> None:
    rng = np.random.default_rng(8)
    ids = np.sort(rng.choice(10_000, size=600, replace=False))
    labels = rng.integers(0, 10, size=600)
    emb = rng.normal(size=(600, 10)).astype(np.float32)
    c = minibatch_coreset(ids, labels, emb, batch_size=128)
    assert len(c.ids) == 128 and np.isin(c.ids, ids).all()
    assert np.isclose(c.weights.mean(), 1.0, atol=1e-5)
    # Batch-mean of w * f over the coreset == (1/r) sum gamma_s f_s, the cluster-weighted subset mean.
    rows = np.searchsorted(ids, c.ids)
    gamma = c.weights * 600 / 128
    np.testing.assert_allclose(
        (c.weights[:, None] * emb[rows]).mean(0), (gamma[:, None] * emb[rows]).sum(0) / 600, atol=1e-5
    )


def test_invalid_inputs_name_what_was_received() -> None:
    with pytest.raises(InvalidArgument, match=r"received shape \(5,\)"):
        select_coreset(np.zeros(5, dtype=np.float32), 1)
    bad = _data(9, 10, 3)
    bad[4, 1] = np.nan
    with pytest.raises(InvalidArgument, match="row 4"):
        select_coreset(bad, 2)
    with pytest.raises(InvalidArgument, match="budget k=11"):
        select_coreset(_data(9, 10, 3), 11)
    with pytest.raises(InvalidArgument, match="unknown similarity 'cosine'"):
        select_coreset(_data(9, 10, 3), 2, similarity="cosine")


def test_split_budget_invariants() -> None:
    rng = np.random.default_rng(10)
    for _ in range(500):
        counts = rng.integers(1, 100, size=int(rng.integers(1, 12)))
        k = int(rng.integers(len(counts), counts.sum() + 1))
        b = split_budget(counts, k)
        assert b.sum() == k and (b >= 1).all() and (b <= counts).all()
    assert split_budget(np.array([60] * 10), 128).tolist() == [13] * 8 + [12] * 2


def test_crest_sizes_match_released_code() -> None:
    # crest-algorithm.md section 2: CIFAR-10 r=500 (50/class), CIFAR-100 r=500 (5/class), Tiny r=1000 (5/class).
    assert per_class_quota(50_000, 10, 0.01) == 50
    assert per_class_quota(50_000, 100, 0.01) == 5
    assert per_class_quota(100_000, 200, 0.01) == 5


def test_class_balanced_subsets_invariants_and_determinism() -> None:
    labels = np.random.default_rng(11).integers(0, 10, size=5000)
    active = np.ones(5000, dtype=bool)
    active[::3] = False
    subsets = class_balanced_subsets(labels, active, 50, 5, np.random.default_rng([0, 3]))
    again = class_balanced_subsets(labels, active, 50, 5, np.random.default_rng([0, 3]))
    assert len(subsets) == 5
    for s, t in zip(subsets, again, strict=True):
        np.testing.assert_array_equal(s, t)
        assert len(np.unique(s)) == len(s) == 500
        assert active[s].all()
        assert (np.bincount(labels[s], minlength=10) == 50).all()


def test_class_balanced_subsets_follow_the_class_order_whatever_the_label_values() -> None:
    rng = np.random.default_rng(12)
    labels = rng.integers(0, 6, size=3000)
    active = rng.random(3000) > 0.2
    active[labels == 4] = False  # a class with no active example is simply absent
    expected = class_balanced_subsets(labels, active, 20, 3, np.random.default_rng(1))
    for relabelled in (labels * 10**12 - 7, labels - 3):  # a wide span (sorted) and negative classes (counted)
        got = class_balanced_subsets(relabelled, active, 20, 3, np.random.default_rng(1))
        for s, t in zip(expected, got, strict=True):
            np.testing.assert_array_equal(s, t)
    assert all(len(s) == 5 * 20 and not (labels[s] == 4).any() for s in expected)
    with pytest.raises(InvalidArgument, match="the active pool is empty"):
        class_balanced_subsets(labels, np.zeros(3000, dtype=bool), 20, 3, np.random.default_rng(1))
