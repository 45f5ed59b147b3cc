"""Pairwise similarities between gradient embeddings, for facility location.

Pure numpy plus FAISS (for the distance GEMM). Both kernels are symmetric and non-negative, so a selected
point always covers itself at least as well as any other point does.
"""

from __future__ import annotations

import numpy as np

from selector_service._faiss import faiss
from selector_service.errors import InvalidArgument

# Name -> description; the keys are the accepted values of ``similarity=``.
KERNELS = {
    "exp": "exp(-||x_i - x_j|| / d), the released CREST kernel",
    "maxdist": "max distance minus distance, the CRAIG kernel",
}


def pairwise_distances(x: np.ndarray) -> np.ndarray:
    """Euclidean distances between all rows of ``x``.

    Args:
        x: float32 (n, d), C-contiguous.

    Returns:
        float32 (n, n), symmetric, zero diagonal.
    """
    d2 = faiss().pairwise_distances(x, x)  # squared L2 by one float32 GEMM
    np.maximum(d2, 0.0, out=d2)  # GEMM round-off can give tiny negatives
    np.fill_diagonal(d2, 0.0)
    d2 = np.minimum(d2, d2.T)  # exact symmetry, so greedy ties do not depend on the orientation
    return np.sqrt(d2, out=d2)


def similarity_matrix(x: np.ndarray, kind: str = "exp") -> np.ndarray:
    """Similarity s_ij between all rows of ``x`` (see ``KERNELS``).

    Args:
        x: float32 (n, d) embeddings.
        kind: a key of ``KERNELS``.

    Returns:
        float32 (n, n), symmetric, non-negative; the diagonal holds each row's maximum.
    """
    if kind not in KERNELS:
        raise InvalidArgument(f"unknown similarity {kind!r}; expected one of {sorted(KERNELS)}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    dist = pairwise_distances(x)
    if kind == "exp":
        return np.exp(dist / -float(x.shape[1]), out=dist)
    return np.subtract(dist.max(), dist, out=dist)
