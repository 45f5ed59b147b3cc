"""The FAISS GPU path of the kNN coverage, against the CPU's exact graph.

These run only where ``faiss.get_num_gpus() > 0`` (the ``[gpu]`` extra on a CUDA machine); elsewhere they are
reported as skipped, and the CPU path is covered by tests/test_selection_engine.py.
"""

from __future__ import annotations

import numpy as np
import pytest

from selector_service import select_coreset
from selector_service._faiss import num_gpus
from selector_service.facility_location import objective
from selector_service.similarity import dense_similarity, exact_knn, knn_coverage

pytestmark = pytest.mark.skipif(num_gpus() == 0, reason="needs faiss-gpu and a CUDA device")


def _clustered(seed: int, n: int, d: int, clusters: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, d)).astype(np.float32) * 4
    return (centres[rng.integers(0, clusters, n)] + rng.normal(size=(n, d))).astype(np.float32)


def test_gpu_exact_graph_matches_the_cpu_graph() -> None:
    x = _clustered(0, 3000, 32, 30)
    coverage = knn_coverage(x, 40)  # exact FAISS flat index, moved to the GPU
    nbrs, _ = exact_knn(x, 40)  # blocked SGEMM and a compiled top-K on the CPU
    assert (coverage.neighbours[:, 0] == np.arange(3000)).all()
    same = np.mean([len(set(a) & set(b)) / 40 for a, b in zip(coverage.neighbours, nbrs, strict=True)])
    assert same >= 0.999  # only ties at the K-th distance may differ


def test_gpu_knn_selection_matches_dense_objective_and_is_deterministic() -> None:
    x = _clustered(1, 4000, 16, 40)
    sim = dense_similarity(x, "exp")
    dense = select_coreset(x, 40, knn=0)
    runs = [select_coreset(x, 40, knn=250) for _ in range(2)]
    np.testing.assert_array_equal(runs[0].indices, runs[1].indices)
    assert objective(sim, runs[0].indices) >= 0.995 * objective(sim, dense.indices)
    assert runs[0].weights.sum() == 4000


def test_gpu_ivf_path_for_large_ground_sets() -> None:
    x = _clustered(2, 30_000, 32, 150)
    first, second = (select_coreset(x, 300, seed=3) for _ in range(2))  # above 20,000 points: IVF on the GPU
    np.testing.assert_array_equal(first.indices, second.indices)
    assert first.weights.sum() == 30_000 and (first.weights >= 1).all()
