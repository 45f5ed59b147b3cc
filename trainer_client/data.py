"""Fashion-MNIST from its gzip IDX files, read directly (torchvision's checksums reject Debian's copy)."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

# Where the Debian package dataset-fashion-mnist installs the files.
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
# Pixel statistics of the Fashion-MNIST training set (on [0, 1] intensities).
MEAN, STD = 0.2860, 0.3530


def read_idx(path: Path) -> np.ndarray:
    """Read a (gzip) IDX file into a uint8 array of the shape its header declares."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4:
        raise ValueError(f"{path}: {len(data)} bytes is too short for an IDX header")
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file (magic {data[:4].hex()}, expected 0000 08 xx)")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise ValueError(
            f"{path}: header declares shape {shape} ({int(np.prod(shape))} bytes), file holds "
            f"{body.size} bytes: truncated or corrupt"
        )
    return body.reshape(shape)


def find_dir(data_dir: Path | str | None = None) -> Path:
    """``data_dir`` when given, else the Debian location, checked to hold all four files."""
    looked = [Path(data_dir) if data_dir else DEBIAN_DIR]
    needed = [name for pair in FILES.values() for name in pair]
    for d in looked:
        if all((d / name).is_file() for name in needed):
            return d
    raise FileNotFoundError(
        "Fashion-MNIST not found; looked in " + ", ".join(str(d) for d in looked) + ". "
        "On Debian/Ubuntu: apt-get install dataset-fashion-mnist. Elsewhere download "
        + ", ".join(needed)
        + " from the Fashion-MNIST project (github.com/zalandoresearch/fashion-mnist) "
        "into one directory and pass --data-dir (or set CREST_DATA_DIR)."
    )


class FashionMNIST(Dataset):
    """Fashion-MNIST held in memory: ``ds[i]`` is (float32 (1, 28, 28) normalised image, int64 label).

    Attributes:
        images: float32 (n, 1, 28, 28).
        targets: int64 (n,), classes 0..9.
    """

    classes = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")

    def __init__(self, split: str = "train", data_dir: Path | str | None = None, limit: int | None = None) -> None:
        if split not in FILES:
            raise ValueError(f"split must be one of {sorted(FILES)}, received {split!r}")
        root = find_dir(data_dir)
        images = read_idx(root / FILES[split][0])
        labels = read_idx(root / FILES[split][1])
        if len(images) != len(labels):
            raise ValueError(f"{root}: {len(images)} images but {len(labels)} labels in split {split!r}")
        if limit is not None:
            images, labels = images[:limit], labels[:limit]
        x = torch.from_numpy(images.astype(np.float32) / 255.0)
        self.images = ((x - MEAN) / STD).unsqueeze(1)
        self.targets = torch.from_numpy(labels.astype(np.int64))

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[i], self.targets[i]

    def held_out(self, n: int, seed: int) -> tuple[FashionMNIST, FashionMNIST]:
        """(the rest, ``n`` examples drawn at random by ``seed``): a held-out split, each in its original order."""
        if not 0 < n < len(self):
            raise ValueError(f"a held-out split needs 0 < n < {len(self)} examples, received {n}")
        out = np.zeros(len(self), dtype=bool)
        out[np.random.default_rng([seed, 6]).choice(len(self), n, replace=False)] = True
        return self._rows(torch.from_numpy(~out)), self._rows(torch.from_numpy(out))

    def _rows(self, keep: torch.Tensor) -> FashionMNIST:
        part = object.__new__(FashionMNIST)
        part.images, part.targets = self.images[keep], self.targets[keep]
        return part
