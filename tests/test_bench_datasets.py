"""The harder benchmark tasks and the validation split: what they change, exactly, and what they keep."""

from __future__ import annotations

import numpy as np
import pytest

from crest_bench.train_data import (
    IMBALANCE_RATIO,
    NOISE_FRACTION,
    fashion_mnist,
    fashion_mnist_imbalanced,
    fashion_mnist_noisy,
    flip_labels,
    load_data,
    long_tail,
    split_validation,
)


def test_flipped_labels_move_exactly_the_fraction_to_other_classes() -> None:
    labels = np.repeat(np.arange(10), 100)
    noisy = flip_labels(labels, 10, 0.3, seed=0)
    assert (noisy != labels).sum() == 300  # exactly round(0.3 N), each to another class
    assert noisy.min() >= 0 and noisy.max() < 10
    np.testing.assert_array_equal(noisy, flip_labels(labels, 10, 0.3, seed=0))  # fixed by its seed
    assert not np.array_equal(noisy, flip_labels(labels, 10, 0.3, seed=1))


def test_long_tail_keeps_a_geometric_profile_from_the_largest_class() -> None:
    labels = np.repeat(np.arange(5), 200)
    ids = long_tail(labels, 5, 10.0)
    counts = np.bincount(labels[ids], minlength=5)
    assert counts.tolist() == [200, 112, 63, 36, 20]  # 200 x 10^(-c/4), rounded
    assert len(np.unique(ids)) == len(ids) and (np.diff(ids) > 0).all()


def test_split_validation_partitions_the_training_set() -> None:
    data = fashion_mnist(None)
    assert data.train_labels is not None
    split = split_validation(data, 1000)
    train_ids = np.asarray(split.train.indices)  # type: ignore[attr-defined]
    val_ids = np.asarray(split.test.indices)  # type: ignore[attr-defined]
    assert len(val_ids) == 1000 and len(train_ids) == 59_000
    assert len(np.union1d(train_ids, val_ids)) == 60_000  # disjoint, and together the whole training set
    np.testing.assert_array_equal(split.train_labels, data.train_labels[train_ids])
    assert int(split.test[0][1]) == int(data.train_labels[val_ids[0]])  # validation comes from training data
    with pytest.raises(ValueError, match="must leave training data; the training set has 60000"):
        split_validation(data, 60_000)


def test_noisy_and_long_tailed_fashion_mnist() -> None:
    clean = fashion_mnist(None)
    noisy = fashion_mnist_noisy(None)
    assert clean.train_labels is not None and noisy.train_labels is not None
    assert (noisy.train_labels != clean.train_labels).mean() == pytest.approx(NOISE_FRACTION)
    assert int(noisy.train[7][1]) == noisy.train_labels[7]  # items carry the flipped label
    assert noisy.flipped is not None and clean.flipped is None
    np.testing.assert_array_equal(noisy.flipped, noisy.train_labels != clean.train_labels)
    split = split_validation(noisy, 1000)  # the mask follows the examples into the split and the limit
    assert split.flipped is not None
    np.testing.assert_array_equal(split.flipped, noisy.flipped[np.asarray(split.train.indices)])  # type: ignore[attr-defined]
    limited = load_data("crest_bench.train_data:fashion_mnist_noisy", None, 500, 100)
    assert limited.flipped is not None
    np.testing.assert_array_equal(limited.flipped, noisy.flipped[:500])
    assert noisy.test is clean.test or len(noisy.test) == len(clean.test)  # type: ignore[arg-type]
    tail = fashion_mnist_imbalanced(None)
    assert tail.train_labels is not None
    counts = np.bincount(tail.train_labels, minlength=10)
    assert counts[0] == 6000 and counts[-1] == round(6000 / IMBALANCE_RATIO) and len(tail.train) == counts.sum()  # type: ignore[arg-type]
    assert tail.balanced_score and not clean.balanced_score and not noisy.balanced_score
    assert load_data("crest_bench.train_data:fashion_mnist_imbalanced", None, 1000, 100).balanced_score


def test_balanced_score_is_the_accuracy_on_a_balanced_split_and_not_on_a_skewed_one() -> None:
    """A model that always answers class 0, scored on a 9:1 split and on a 1:1 one."""
    import torch

    from crest_bench.train_methods import EvalSets, balanced_accuracy

    class AlwaysZero(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.stack([torch.ones(len(x)), torch.zeros(len(x))], 1)

    model, x = AlwaysZero(), torch.zeros(10, 1)
    skewed, balanced = torch.tensor([0] * 9 + [1]), torch.tensor([0] * 5 + [1] * 5)
    assert balanced_accuracy(model, x, skewed) == pytest.approx(0.5)  # per class: 1.0 and 0.0
    assert balanced_accuracy(model, x, balanced) == pytest.approx(0.5)
    plain, weighted = EvalSets((x, skewed), (x, skewed)), EvalSets((x, skewed), (x, skewed), balanced=True)
    assert plain.score(model, plain.test) == pytest.approx(0.9) and weighted.score(model, weighted.test) == 0.5


def test_balanced_batches_give_every_class_its_quota_without_repeats() -> None:
    from crest_bench.train_methods import balanced_batches

    labels = np.random.default_rng(0).permutation(np.repeat(np.arange(4), [400, 200, 100, 50]))
    source = balanced_batches(labels, 30, seed=3)
    for _ in range(20):
        ids, weights = next(source)
        counts = np.bincount(labels[ids], minlength=4)
        assert len(np.unique(ids)) == 30 and sorted(counts) == [7, 7, 8, 8]  # 30 = 4 x 7 + 2 extra
        assert (weights == 1).all()
    again = balanced_batches(labels, 30, seed=3)
    first = next(balanced_batches(labels, 30, seed=3))[0]
    np.testing.assert_array_equal(next(again)[0], first)  # fixed by its seed


def test_a_run_reports_the_share_it_trained_on_flipped_labels_and_on_each_class() -> None:
    """Full data for exactly one epoch trains on every example once: its share is the corruption rate, and its
    class shares are the data's."""
    from dataclasses import replace

    from crest_bench.train_data import materialize
    from crest_bench.train_methods import BenchConfig, EvalSets, run_one

    data = load_data("crest_bench.train_data:fashion_mnist_noisy", None, 512, 200)
    evals = EvalSets(curve=materialize(data.test), test=materialize(data.test))
    config = BenchConfig(steps=4, batch_size=128, eval_every=4)
    result = run_one("full", 0, config, data, evals, endpoint=None, progress=False)
    assert data.flipped is not None
    assert result.flipped_share == pytest.approx(data.flipped.mean())
    assert result.flipped_weight_share == pytest.approx(data.flipped.mean())  # weights all 1
    assert data.train_labels is not None
    np.testing.assert_allclose(result.class_share, np.bincount(data.train_labels, minlength=data.num_classes) / 512)
    clean = run_one("full", 0, config, replace(data, flipped=None), evals, endpoint=None, progress=False)
    assert clean.flipped_share is None and clean.flipped_weight_share is None
    with pytest.raises(ValueError, match="coreset_weights must be one of cluster, uniform, received 'equal'"):
        replace(config, crest=replace(config.crest, coreset_weights="equal"))
