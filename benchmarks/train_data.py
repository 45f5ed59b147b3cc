"""The training benchmark's dataset hook: any map-style dataset and a model for it.

``crest bench train --dataset MODULE:FUNCTION`` (or ``--dataset path/to/file.py:FUNCTION``) calls
``FUNCTION(data_dir)`` once, with ``--data-dir`` (None when not given), and trains on what it returns::

    # my_data.py
    from crest_bench.train_data import BenchData

    def load(data_dir):
        train, test = MyDataset("train", data_dir), MyDataset("test", data_dir)
        return BenchData(name="my data", train=train, test=test, num_classes=100, model=lambda: MyNet(100))

    crest bench train --dataset my_data.py:load --methods full,crest

``train[i]`` and ``test[i]`` must return ``(input tensor, int label)`` (a 0-d integer tensor will do); every
method builds its batches the same way, ``default_collate([train[i] for i in ids])``, as ``CoresetLoader`` does.
``model()`` returns a fresh, untrained model mapping a batch of inputs to ``(n, num_classes)`` logits; it is
called once per run after ``torch.manual_seed(seed)``, so runs of one seed start from the same weights. The
default hook, ``crest_bench.train_data:fashion_mnist``, is Fashion-MNIST (Debian's ``dataset-fashion-mnist``)
with ``trainer_client.models.SmallCNN``; ``fashion_mnist_noisy`` (30% of the training labels flipped) and
``fashion_mnist_imbalanced`` (a long-tailed training set) are the harder variants. ``split_validation`` holds
part of the training set out for tuning.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Subset, default_collate

DEFAULT_HOOK = "crest_bench.train_data:fashion_mnist"


@dataclass(frozen=True, kw_only=True)
class BenchData:
    """What a dataset hook returns."""

    # Shown in the table's caption and the JSON.
    name: str
    # Map-style datasets: ds[i] -> (input tensor, int label).
    train: Dataset
    test: Dataset
    # Number of classes C; labels are 0..C-1.
    num_classes: int
    # A fresh model per call: inputs -> float (n, C) logits.
    model: Callable[[], torch.nn.Module]
    # int64 (N,) the training labels in dataset order; None reads them through train[i] (one pass).
    train_labels: np.ndarray | None = None
    # Score runs by the mean of the per-class accuracies: for a skewed training set with a balanced test set, so
    # that a validation split carved from the training set (skewed like it) scores what the test set does.
    balanced_score: bool = False
    # bool (N,): the training examples whose label the hook corrupted (None: none known). A diagnostic only: the
    # runs report the share of their trained examples (and of their loss weight) on these.
    flipped: np.ndarray | None = None


def fashion_mnist(data_dir: str | None) -> BenchData:
    """Fashion-MNIST (60k train, 10k test, 10 classes) from its IDX files, with the SmallCNN."""
    from trainer_client.data import FashionMNIST
    from trainer_client.models import SmallCNN

    train, test = FashionMNIST("train", data_dir), FashionMNIST("test", data_dir)
    classes = len(FashionMNIST.classes)
    return BenchData(
        name="Fashion-MNIST, SmallCNN",
        train=train,
        test=test,
        num_classes=classes,
        model=lambda: SmallCNN(num_classes=classes),
        train_labels=train.targets.numpy(),
    )


class Relabeled(Dataset):
    """``base`` with other labels: item i is (base[i]'s input, labels[i])."""

    def __init__(self, base: Dataset, labels: np.ndarray) -> None:
        self.base, self.labels = base, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.base[i][0], int(self.labels[i])


# The harder variants of the default task: where the literature says coresets help most. Their corruption is
# fixed (seed 0), whatever the run's seed, so every method and seed sees the same training set.
NOISE_FRACTION = 0.3
IMBALANCE_RATIO = 10.0


def flip_labels(labels: np.ndarray, num_classes: int, fraction: float, seed: int = 0) -> np.ndarray:
    """int64 (N,): a copy of ``labels`` with a seeded ``fraction`` of them (exactly round(fraction N) ids) moved
    to a uniformly drawn *other* class."""
    rng = np.random.default_rng([seed, 20])
    out = np.asarray(labels, dtype=np.int64).copy()
    flipped = rng.choice(len(out), round(fraction * len(out)), replace=False)
    out[flipped] = (out[flipped] + rng.integers(1, num_classes, len(flipped))) % num_classes
    return out


def long_tail(labels: np.ndarray, num_classes: int, ratio: float, seed: int = 0) -> np.ndarray:
    """int64 sorted ids of a long-tailed subset: class c keeps n_c = n_max x ratio^(-c / (C - 1)) of its
    examples (seeded choice), so the largest class is ``ratio`` times the smallest."""
    rng = np.random.default_rng([seed, 21])
    labels = np.asarray(labels)
    n_max = int(np.bincount(labels, minlength=num_classes).min())
    keep = []
    for c in range(num_classes):
        members = np.flatnonzero(labels == c)
        count = max(1, round(n_max * ratio ** (-c / (num_classes - 1))))
        keep.append(rng.choice(members, count, replace=False))
    return np.sort(np.concatenate(keep))


def fashion_mnist_noisy(data_dir: str | None) -> BenchData:
    """Fashion-MNIST with 30% of the training labels flipped to another class (test labels clean)."""
    data = fashion_mnist(data_dir)
    assert data.train_labels is not None
    labels = flip_labels(data.train_labels, data.num_classes, NOISE_FRACTION)
    return replace(
        data,
        name=f"Fashion-MNIST, {NOISE_FRACTION:.0%} training labels flipped, SmallCNN",
        train=Relabeled(data.train, labels),
        train_labels=labels,
        flipped=labels != data.train_labels,
    )


def fashion_mnist_imbalanced(data_dir: str | None) -> BenchData:
    """A long-tailed Fashion-MNIST training set (imbalance ratio 10: 6,000 down to 600 per class, 24,523 in all);
    the balanced test set. Scored by the mean per-class accuracy (the accuracy, on the balanced test set), so that
    a validation split of the skewed training set measures what the test set does."""
    data = fashion_mnist(data_dir)
    assert data.train_labels is not None
    ids = long_tail(data.train_labels, data.num_classes, IMBALANCE_RATIO)
    return replace(
        data,
        name=f"Fashion-MNIST, long-tailed 1:{IMBALANCE_RATIO:.0f} training set, SmallCNN "
        "(score: mean per-class accuracy)",
        train=Subset(data.train, ids.tolist()),
        train_labels=data.train_labels[ids],
        balanced_score=True,
    )


def split_validation(data: BenchData, size: int, seed: int = 0) -> BenchData:
    """Carve a validation set out of the training set, for tuning without the test set: ``size`` seeded ids
    (stratified by nothing: a uniform draw) become ``test``, the rest ``train``. The split is fixed by ``seed``,
    not by the runs' seeds, so every method and seed tunes on the same one."""
    labels = data.train_labels
    assert labels is not None, "load_data fills the labels in"
    if not 0 < size < len(labels):
        raise ValueError(
            f"a validation set of {size} examples must leave training data; the training set has {len(labels)}"
        )
    held = np.zeros(len(labels), dtype=bool)
    held[np.random.default_rng([seed, 22]).choice(len(labels), size, replace=False)] = True
    train_ids, val_ids = np.flatnonzero(~held), np.flatnonzero(held)
    return replace(
        data,
        name=f"{data.name} (validation split: {size} of the training examples)",
        train=Subset(data.train, train_ids.tolist()),
        test=Subset(data.train, val_ids.tolist()),
        train_labels=labels[train_ids],
        flipped=data.flipped[train_ids] if data.flipped is not None else None,
    )


def load_hook(spec: str) -> Callable[[str | None], BenchData]:
    """The function named by ``MODULE:FUNCTION`` or ``path/to/file.py:FUNCTION``."""
    module_name, sep, func_name = spec.rpartition(":")
    if not sep or not module_name or not func_name:
        raise ValueError(f"--dataset takes MODULE:FUNCTION or FILE.py:FUNCTION, received {spec!r}")
    if module_name.endswith(".py"):
        path = Path(module_name)
        if not path.is_file():
            raise FileNotFoundError(f"--dataset {spec!r}: no file {path.resolve()}")
        loader_spec = importlib.util.spec_from_file_location(f"_bench_dataset_{path.stem}", path)
        assert loader_spec is not None and loader_spec.loader is not None
        module = importlib.util.module_from_spec(loader_spec)
        loader_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(module_name)
    func = getattr(module, func_name, None)
    if not callable(func):
        raise ValueError(f"--dataset {spec!r}: {module_name} has no function {func_name!r}")
    return func  # type: ignore[no-any-return]


def load_data(spec: str, data_dir: str | None, train_limit: int | None, test_limit: int | None) -> BenchData:
    """Call the hook and keep the first ``train_limit`` / ``test_limit`` examples (None: all)."""
    data = load_hook(spec)(data_dir)
    if not isinstance(data, BenchData):
        raise TypeError(f"--dataset {spec!r} returned {type(data).__name__}; it must return a BenchData")
    labels = data.train_labels
    if labels is None:
        labels = np.array([int(data.train[i][1]) for i in range(len(data.train))], dtype=np.int64)  # type: ignore[arg-type]
    train, test, flipped = data.train, data.test, data.flipped
    if flipped is not None and flipped.shape != labels.shape:
        raise ValueError(f"--dataset {spec!r}: flipped has shape {flipped.shape}, the labels {labels.shape}")
    if train_limit is not None and train_limit < len(labels):
        train, labels = Subset(train, range(train_limit)), labels[:train_limit]
        flipped = flipped[:train_limit] if flipped is not None else None
    if test_limit is not None and test_limit < len(test):  # type: ignore[arg-type]
        test = Subset(test, range(test_limit))
    labels = np.asarray(labels, dtype=np.int64)
    if labels.min() < 0 or labels.max() >= data.num_classes:
        raise ValueError(
            f"--dataset {spec!r}: labels span {labels.min()}..{labels.max()}, num_classes is {data.num_classes}"
        )
    return replace(data, train=train, test=test, train_labels=labels, flipped=flipped)


def fetch(dataset: Dataset, ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch of ``ids`` (int64 (b,)), collated as ``CoresetLoader`` does: (inputs, int64 labels (b,))."""
    x, y = default_collate([dataset[int(i)] for i in ids])
    return x, torch.as_tensor(y, dtype=torch.int64)


def materialize(dataset: Dataset, limit: int | None = None, chunk: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``limit`` examples (None: all) as (inputs, int64 labels) tensors, for evaluation."""
    n = len(dataset) if limit is None else min(limit, len(dataset))  # type: ignore[arg-type]
    parts = [fetch(dataset, np.arange(lo, min(lo + chunk, n))) for lo in range(0, n, chunk)]
    return torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts])
