"""The fast paths of the selection engine against the references: compiled lazy and stochastic greedy, the
blocked dense kernel and the FAISS kNN coverage."""

from __future__ import annotations

import numpy as np
import pytest

from selector_service import InvalidArgument, select_coreset
from selector_service.coreset import auto_neighbours
from selector_service.facility_location import (
    facility_location,
    naive_greedy,
    objective,
    quantized_facility_location,
    sparse_facility_location,
)
from selector_service.similarity import STEP_BLOCK_ROWS, dense_similarity, knn_coverage, quantized_similarity


def _clustered(seed: int, n: int, d: int, clusters: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, d)).astype(np.float32) * 4
    return (centres[rng.integers(0, clusters, n)] + rng.normal(size=(n, d))).astype(np.float32)


def test_blocked_dense_kernel_matches_float64_reference_across_blocks() -> None:
    x = _clustered(0, 2500, 16, 20)  # more rows than one GEMM block
    dist = np.sqrt(np.maximum(((x[:, None, :].astype(np.float64) - x[None, :, :]) ** 2).sum(-1), 0))
    np.testing.assert_allclose(dense_similarity(x, "exp"), np.exp(-dist / 16), atol=2e-5)
    np.testing.assert_allclose(dense_similarity(x, "maxdist"), dist.max() - dist, atol=2e-3)
    assert dense_similarity(x, "exp").dtype == np.float32


@pytest.mark.parametrize("kind", ["exp", "maxdist"])
def test_quantized_kernel_matches_float64_reference_across_blocks(kind: str) -> None:
    x = _clustered(10, 2 * STEP_BLOCK_ROWS + 276, 16, 20)  # three row blocks: two mirrored panels
    dist = np.sqrt(np.maximum(((x[:, None, :].astype(np.float64) - x[None, :, :]) ** 2).sum(-1), 0))
    ref = np.exp(-dist / 16) if kind == "exp" else dist.max() - dist
    kernel = quantized_similarity(x, kind)
    assert kernel.steps.dtype == np.uint16
    float_error = 2e-5 if kind == "exp" else 2e-3  # float32 GEMM distances, as for the float32 kernel
    np.testing.assert_allclose(kernel.offset + kernel.unit * kernel.steps, ref, atol=kernel.unit / 2 + float_error)
    np.testing.assert_array_equal(kernel.steps, kernel.steps.T)  # the lower triangle is mirrored
    np.testing.assert_array_equal(kernel.row_sums, kernel.steps.sum(axis=1, dtype=np.int64))
    assert (np.diagonal(kernel.steps) == kernel.steps.max(axis=1)).all()  # every point covers itself best


def test_lazy_equals_naive_bit_for_bit_on_quantized_kernels() -> None:
    rng = np.random.default_rng(11)
    for trial in range(300):
        n = int(rng.integers(2, 150))
        x = rng.normal(size=(n, int(rng.integers(1, 20)))).astype(np.float32)
        if trial % 5 == 0:
            x[n // 2 :] = x[: n - n // 2]  # exact duplicates: ties resolved towards the lowest index by both
        kernel = quantized_similarity(x, "exp" if trial % 2 else "maxdist")
        k = int(rng.integers(1, n + 1))
        lazy = quantized_facility_location(kernel, k, "lazy")
        naive = quantized_facility_location(kernel, k, "naive")
        np.testing.assert_array_equal(lazy.indices, naive.indices, err_msg=f"trial {trial}, n={n}, k={k}")
        np.testing.assert_array_equal(lazy.gains, naive.gains)  # integer steps: no rounding to differ by
        np.testing.assert_array_equal(lazy.weights, naive.weights)


@pytest.mark.parametrize(("n", "k", "kind"), [(2000, 20, "exp"), (2000, 200, "exp"), (1500, 30, "maxdist")])
def test_quantized_dense_path_keeps_the_float_objective(n: int, k: int, kind: str) -> None:
    x = _clustered(12, n, 32, 40)
    sim = dense_similarity(x, kind)
    fixed_point = select_coreset(x, k, knn=0, similarity=kind)
    reference = facility_location(sim, k, "lazy")
    assert objective(sim, fixed_point.indices) >= (1 - 1e-5) * objective(sim, reference.indices)
    # Gains are reported in similarity units and add up to the objective.
    assert fixed_point.gains.sum() == pytest.approx(objective(sim, fixed_point.indices), rel=1e-4)
    assert fixed_point.weights.sum() == n and (fixed_point.weights >= 1).all()


def test_sparse_lazy_equals_sparse_naive() -> None:
    rng = np.random.default_rng(1)
    for trial in range(200):
        n = int(rng.integers(5, 120))
        x = rng.normal(size=(n, 6)).astype(np.float32)
        cov = knn_coverage(x, int(rng.integers(2, n + 1)), "exp" if trial % 2 else "maxdist")
        k = int(rng.integers(1, n + 1))
        lazy = sparse_facility_location(cov, x, k, "lazy")
        naive = sparse_facility_location(cov, x, k, "naive")
        np.testing.assert_array_equal(lazy.indices, naive.indices, err_msg=f"trial {trial}")
        np.testing.assert_array_equal(lazy.weights, naive.weights)


def test_knn_coverage_is_reverse_coverage_with_self() -> None:
    x = _clustered(2, 300, 8, 5)
    cov = knn_coverage(x, 10, "exp")
    assert (cov.neighbours[:, 0] == np.arange(300)).all()  # every point is its own nearest
    dense = cov.to_dense()
    # Candidate j covers point i only when j is among i's 10 nearest neighbours, by the listed amount.
    for i in (0, 17, 299):
        covered_by = set(np.flatnonzero(dense[:, i]).tolist())
        assert i in covered_by and covered_by <= set(cov.neighbours[i].tolist())
        for t, j in enumerate(cov.neighbours[i]):
            assert dense[j, i] == pytest.approx(cov.sims[i, t])
    # Scores are improvements over the point's K-th neighbour: non-negative, zero at the K-th, largest at self.
    assert (cov.sims >= 0).all() and (cov.sims[:, -1] == 0).all()
    assert (cov.sims[:, 0] >= cov.sims.max(axis=1)).all()


@pytest.mark.parametrize(("n", "k", "d"), [(3000, 30, 16), (4000, 400, 10)])
def test_knn_path_within_half_a_percent_of_dense_on_clustered_data(n: int, k: int, d: int) -> None:
    x = _clustered(3, n, d, 40)
    sim = dense_similarity(x, "exp")
    dense = select_coreset(x, k, knn=0)
    sparse = select_coreset(x, k, knn=auto_neighbours(n, k))
    assert objective(sim, sparse.indices) >= 0.995 * objective(sim, dense.indices)
    assert sparse.weights.sum() == n and (sparse.weights >= 1).all()


def test_stochastic_greedy_is_seeded_and_close_to_lazy() -> None:
    x = _clustered(4, 3000, 16, 30)
    sim = dense_similarity(x, "exp")
    lazy = facility_location(sim, 60, "lazy")
    runs = [facility_location(sim, 60, "stochastic", epsilon=0.1, seed=s) for s in (7, 7, 8)]
    np.testing.assert_array_equal(runs[0].indices, runs[1].indices)
    assert not np.array_equal(runs[0].indices, runs[2].indices)
    for r in runs:
        assert len(np.unique(r.indices)) == 60 and r.weights.sum() == 3000
        # Guaranteed: >= (1 - 1/e - eps) OPT in expectation; in practice within a couple of percent of lazy.
        assert objective(sim, r.indices) >= 0.98 * objective(sim, lazy.indices)


def test_every_path_is_deterministic_and_weights_sum_per_class() -> None:
    x = _clustered(5, 2000, 10, 20)
    y = np.random.default_rng(5).integers(0, 4, 2000)
    for kwargs in ({"knn": 0}, {"knn": 50}, {"method": "stochastic", "seed": 3}):
        a, b = select_coreset(x, 40, labels=y, **kwargs), select_coreset(x, 40, labels=y, **kwargs)
        np.testing.assert_array_equal(a.indices, b.indices)
        np.testing.assert_array_equal(a.weights, b.weights)
        for c in range(4):
            assert a.weights[y[a.indices] == c].sum() == (y == c).sum()


def test_lazy_compiled_matches_numpy_reference_gains() -> None:
    x = _clustered(6, 800, 12, 10)
    sim = dense_similarity(x, "maxdist")
    order, gains = naive_greedy(sim, 25)
    lazy = facility_location(sim, 25, "lazy")
    np.testing.assert_array_equal(lazy.indices, order)
    np.testing.assert_allclose(lazy.gains, gains, rtol=1e-6)


def test_bad_engine_arguments() -> None:
    x = _clustered(7, 50, 4, 3)
    with pytest.raises(InvalidArgument, match="knn must be None"):
        select_coreset(x, 5, knn=-1)
    with pytest.raises(InvalidArgument, match="epsilon must be in"):
        select_coreset(x, 5, method="stochastic", epsilon=1.5)
    with pytest.raises(InvalidArgument, match="unknown method 'greedy'"):
        select_coreset(x, 5, method="greedy")
    with pytest.raises(InvalidArgument, match="labels must be integers, received dtype float64"):
        select_coreset(x, 5, labels=np.linspace(0, 1, 50))


def test_batched_small_groups_agree_with_the_per_group_reference() -> None:
    rng = np.random.default_rng(8)
    for trial in range(100):
        n = int(rng.integers(20, 300))
        x = rng.normal(size=(n, 10)).astype(np.float32)
        y = rng.integers(0, 5, n)
        k = int(rng.integers(5, min(n, 60)))
        kind = "exp" if trial % 2 else "maxdist"
        batched = select_coreset(x, k, labels=y, similarity=kind)  # one compiled call for all classes
        for c in np.unique(y):
            members = np.flatnonzero(y == c)
            mine = batched.indices[y[batched.indices] == c]
            sim = dense_similarity(x[members], kind)
            ref = facility_location(sim, len(mine), "naive")
            # Same objective as the naive reference on the GEMM kernel (selections may differ only at float ties).
            assert objective(sim, np.searchsorted(members, mine)) == pytest.approx(
                objective(sim, ref.indices), rel=1e-5
            )


def test_blocked_exact_knn_matches_faiss_flat() -> None:
    from selector_service._faiss import faiss
    from selector_service.similarity import exact_knn

    x = _clustered(9, 2500, 16, 25)  # more rows than one block
    nbrs, dist = exact_knn(x, 40)
    index = faiss().IndexFlatL2(16)
    index.add(x)
    ref_d2, _ = index.search(x, 40)
    assert (nbrs[:, 0] == np.arange(2500)).all()
    np.testing.assert_allclose(dist, np.sqrt(np.maximum(ref_d2, 0)), atol=2e-3)  # same distances, nearest first
    assert (np.diff(dist, axis=1) >= 0).all()


def test_reused_kernel_buffer_gives_the_same_selections_sequentially_and_concurrently() -> None:
    from concurrent.futures import ThreadPoolExecutor

    from selector_service import _buffers

    sizes = (700, 1200, 600, 1200)  # the dense path; the buffer grows, shrinks in use, and is reused
    inputs = [_clustered(20 + i, n, 16, 12) for i, n in enumerate(sizes)]
    _buffers.release()
    fresh = []
    for x in inputs:
        fresh.append(select_coreset(x, 25, knn=0).indices)
        _buffers.release()  # every call on new memory
    reused = [select_coreset(x, 25, knn=0).indices for x in inputs]
    with ThreadPoolExecutor(max_workers=4) as pool:  # concurrent callers never share a buffer
        concurrent = list(pool.map(lambda x: select_coreset(x, 25, knn=0).indices, inputs * 2))
    for i in range(len(inputs)):
        np.testing.assert_array_equal(reused[i], fresh[i])
        np.testing.assert_array_equal(concurrent[i], fresh[i])
        np.testing.assert_array_equal(concurrent[i + len(inputs)], fresh[i])


def test_quantized_kernel_rejects_a_wrong_output_array() -> None:
    x = _clustered(21, 40, 4, 3)
    with pytest.raises(InvalidArgument, match=r"out must be a C-contiguous uint16 \(40, 40\) array, received float32"):
        quantized_similarity(x, out=np.empty((40, 40), dtype=np.float32))
