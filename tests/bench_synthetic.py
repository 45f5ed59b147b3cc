"""A dataset hook for ``crest bench train --dataset tests/bench_synthetic.py:load`` (tests/test_bench_*.py): three
Gaussian blobs in 16 dimensions and a small MLP, so the benchmark can run on something other than Fashion-MNIST."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from crest_bench.train_data import BenchData

CLASSES, DIM = 3, 16


class Blobs(Dataset):
    """``n`` examples: ``ds[i]`` is (float32 (16,), int label); class c is centred at 2.5 * e_c."""

    def __init__(self, n: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.labels = rng.integers(0, CLASSES, n)
        centres = np.zeros((CLASSES, DIM), dtype=np.float32)
        centres[np.arange(CLASSES), np.arange(CLASSES)] = 2.5
        self.x = torch.from_numpy(centres[self.labels] + rng.standard_normal((n, DIM)).astype(np.float32))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.x[i], int(self.labels[i])


def load(data_dir: str | None) -> BenchData:
    return BenchData(
        name="blobs, MLP",
        train=Blobs(3000, seed=0),
        test=Blobs(600, seed=1),
        num_classes=CLASSES,
        model=lambda: nn.Sequential(nn.Linear(DIM, 32), nn.ReLU(), nn.Linear(32, CLASSES)),
    )
