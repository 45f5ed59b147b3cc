"""The contract between the two execution paths: the local backend (threads) and the Ray backend (actors of an
embedded Ray) select bit-identical coresets, ids and weights, for the same sessions, rounds and seeds, driven
through the real ``SessionManager``."""

from __future__ import annotations

import numpy as np
import pytest

from selector_service.backends import LocalBackend, SelectionBackend
from selector_service.exclusion import ExclusionConfig
from selector_service.manager import SessionManager
from selector_service.rounds import EmbeddingPart
from selector_service.session import SessionConfig

pytestmark = pytest.mark.slow

ROUNDS = 3
CONFIGS = {
    # The CREST shape: 10 balanced classes, 50 points per class and subset, the exp kernel, learned examples
    # excluded from round 1 on (the pool, hence the subsets, then depend on the losses sent).
    "exp": SessionConfig(
        subset_fraction=0.1,
        num_subsets=5,
        batch_size=32,
        seed=3,
        exclusion=ExclusionConfig(enabled=True, window=1, min_pool_fraction=0.6),
    ),
    # CRAIG's kernel, a last-layer embedding, uneven classes, and more subsets than workers can take in one share.
    "maxdist": SessionConfig(
        subset_fraction=0.05,
        num_subsets=7,
        batch_size=24,
        similarity="maxdist",
        seed=11,
        embedding_dim=16,
        embedding_kind="last_layer_gradient",
    ),
    # Classes of 650 points per subset, past the engine's batched path (BATCH_MAX): one dense kernel per class,
    # computed with BLAS, whose thread count differs between this process and a Ray actor.
    "dense": SessionConfig(subset_fraction=0.5, num_subsets=2, batch_size=64, seed=5),
}
Coresets = dict[tuple[str, int, int], tuple[bytes, bytes, str]]


def _labels(name: str) -> np.ndarray:
    rng = np.random.default_rng(0)
    if name == "exp":
        return rng.permutation(np.repeat(np.arange(10), 500)).astype(np.int64)
    if name == "dense":
        return rng.permutation(np.repeat(np.arange(10), 1300)).astype(np.int64)
    return rng.choice(10, size=6000, p=np.linspace(1, 3, 10) / 20).astype(np.int64)


def _select(backend: SelectionBackend) -> Coresets:
    """Every batch of ``ROUNDS`` rounds of each configuration: (config, round, subset) -> (ids, weights, worker)."""
    manager = SessionManager(backend)
    out: Coresets = {}
    for name, config in CONFIGS.items():
        session = manager.create(_labels(name), 10, config).session
        for r in range(ROUNDS):
            plan = manager.start_round(session.id, r, trainer_step=10 * r)
            rng = np.random.default_rng([7, r])
            emb = rng.normal(size=(len(plan.ids), session.dim)).astype(np.float32)
            losses = rng.uniform(0, 0.2, len(plan.ids)).astype(np.float32)  # about half count as learned
            order = rng.permutation(len(plan.ids))  # sent in three messages, out of order
            parts = [
                EmbeddingPart(session.id, r, plan.ids[o], emb[o], None, losses[o]) for o in np.array_split(order, 3)
            ]
            manager.submit_embeddings(parts)
            for b in manager.batches(session.id, r):
                assert b.ids.dtype == np.int64 and b.weights.dtype == np.float32
                out[(name, r, b.subset_index)] = (b.ids.tobytes(), b.weights.tobytes(), b.worker)
        manager.close(session.id)
    return out


def test_local_and_ray_backends_select_bit_identical_coresets() -> None:
    from selector_service.ray_backend import RayBackend

    local = LocalBackend(num_workers=2)
    try:
        expected = _select(local)
    finally:
        local.close()
    ray_backend = RayBackend(num_workers=2, cpus_per_worker=0.5)
    try:
        got = _select(ray_backend)
    finally:
        ray_backend.close()
    assert sorted(got) == sorted(expected) and len(got) == ROUNDS * (5 + 7 + 2)
    for key, (ids, weights, worker) in got.items():
        assert worker.startswith("selector-") and expected[key][2].startswith("local-")  # each path really ran
        assert ids == expected[key][0], f"ids of {key} differ between the Ray and the local backend"
        assert weights == expected[key][1], f"weights of {key} differ between the Ray and the local backend"
