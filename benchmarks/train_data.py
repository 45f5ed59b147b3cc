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
with ``trainer_client.models.SmallCNN``.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
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
    train, test = data.train, data.test
    if train_limit is not None and train_limit < len(labels):
        train, labels = Subset(train, range(train_limit)), labels[:train_limit]
    if test_limit is not None and test_limit < len(test):  # type: ignore[arg-type]
        test = Subset(test, range(test_limit))
    labels = np.asarray(labels, dtype=np.int64)
    if labels.min() < 0 or labels.max() >= data.num_classes:
        raise ValueError(
            f"--dataset {spec!r}: labels span {labels.min()}..{labels.max()}, num_classes is {data.num_classes}"
        )
    return BenchData(
        name=data.name, train=train, test=test, num_classes=data.num_classes, model=data.model, train_labels=labels
    )


def fetch(dataset: Dataset, ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch of ``ids`` (int64 (b,)), collated as ``CoresetLoader`` does: (inputs, int64 labels (b,))."""
    x, y = default_collate([dataset[int(i)] for i in ids])
    return x, torch.as_tensor(y, dtype=torch.int64)


def materialize(dataset: Dataset, limit: int | None = None, chunk: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``limit`` examples (None: all) as (inputs, int64 labels) tensors, for evaluation."""
    n = len(dataset) if limit is None else min(limit, len(dataset))  # type: ignore[arg-type]
    parts = [fetch(dataset, np.arange(lo, min(lo + chunk, n))) for lo in range(0, n, chunk)]
    return torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts])
