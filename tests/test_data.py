"""The Fashion-MNIST IDX reader on files written here, the not-found message, and the real files."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from trainer_client.data import FILES, FashionMNIST, find_dir, read_idx


def _write_idx(path: Path, array: np.ndarray, truncate: int = 0) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    body = array.astype(np.uint8).tobytes()
    with gzip.open(path, "wb") as f:
        f.write(header + body[: len(body) - truncate])


def _fake_dataset(root: Path, n: int = 12) -> None:
    rng = np.random.default_rng(0)
    for images, labels in FILES.values():
        _write_idx(root / images, rng.integers(0, 256, size=(n, 28, 28)))
        _write_idx(root / labels, np.arange(n) % 10)


def test_reads_idx_written_here(tmp_path: Path) -> None:
    _fake_dataset(tmp_path)
    ds = FashionMNIST("train", tmp_path)
    assert len(ds) == 12
    x, y = ds[3]
    assert x.shape == (1, 28, 28) and x.dtype.is_floating_point and int(y) == 3


def test_truncated_file_is_reported(tmp_path: Path) -> None:
    _write_idx(tmp_path / "bad.gz", np.zeros((4, 28, 28)), truncate=10)
    with pytest.raises(ValueError, match=r"declares shape \(4, 28, 28\) \(3136 bytes\), file holds 3126 bytes"):
        read_idx(tmp_path / "bad.gz")


def test_missing_files_say_where_it_looked_and_how_to_get_them(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as err:
        find_dir(tmp_path)
    message = str(err.value)
    assert str(tmp_path) in message and "apt-get install dataset-fashion-mnist" in message
    assert "train-images-idx3-ubyte.gz" in message and "--data-dir" in message


def test_real_fashion_mnist_loads() -> None:
    train, test = FashionMNIST("train"), FashionMNIST("test")
    assert (len(train), len(test)) == (60_000, 10_000)
    assert np.bincount(train.targets.numpy()).tolist() == [6000] * 10
    assert abs(float(train.images.mean())) < 0.01 and abs(float(train.images.std()) - 1) < 0.01
