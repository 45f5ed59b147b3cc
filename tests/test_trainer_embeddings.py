"""Closed-form gradient embeddings against autograd per-example gradients (the oracle), and the batch plumbing."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from trainer_client.batches import Embedder, default_forward, last_linear, with_weights
from trainer_client.embeddings import last_layer_gradient, logit_gradient, random_projection

torch.set_num_threads(1)


def _model_and_batch() -> tuple[nn.Sequential, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4)).double()
    x = torch.randn(9, 6, dtype=torch.float64)
    y = torch.randint(0, 4, (9,))
    return model, x, y


def _autograd_last_layer(model: nn.Sequential, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-example [dW (C, H) row-major, db (C)] by one backward pass per example."""
    head = model[2]
    assert isinstance(head, nn.Linear)
    rows = []
    for i in range(len(y)):
        loss = nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1])
        dw, db = torch.autograd.grad(loss, [head.weight, head.bias])
        rows.append(torch.cat([dw.reshape(-1), db]))
    return torch.stack(rows)


def test_logit_gradient_equals_autograd_gradient_of_each_example() -> None:
    logits = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 5, (7,))
    per_example = torch.stack(
        [torch.autograd.grad(nn.functional.cross_entropy(logits[i], y[i]), logits)[0][i] for i in range(7)]
    )
    assert torch.allclose(logit_gradient(logits, y).double(), per_example, atol=1e-6)


def test_last_layer_gradient_equals_autograd_per_example_gradients() -> None:
    model, x, y = _model_and_batch()
    expected = _autograd_last_layer(model, x, y)
    with torch.no_grad():
        h = model[1](model[0](x))
        got = last_layer_gradient(model(x), y, h)
    assert got.shape == (9, 4 * (5 + 1))
    assert torch.allclose(got.double(), expected, atol=1e-5)


def test_projected_last_layer_gradient_is_the_projection_of_the_autograd_gradients() -> None:
    model, x, y = _model_and_batch()
    proj = random_projection(4, 5, 8, seed=3)
    assert torch.equal(proj, random_projection(4, 5, 8, seed=3))  # fixed by the seed: same on every rank
    flat = torch.cat([proj[:, :-1].reshape(4 * 5, 8), proj[:, -1]]).double()  # rows in [dW, db] order
    expected = _autograd_last_layer(model, x, y) @ flat
    embedder = Embedder("last_layer_gradient", last_linear(model), dim=8, seed=3)
    with torch.no_grad():
        got, targets, logits = embedder(model, (x, y), default_forward)
    assert embedder.dim(4) == 8 and got.shape == (9, 8)
    assert torch.equal(targets, y) and logits.shape == (9, 4)
    assert torch.allclose(got.double(), expected, atol=1e-5)
    assert not torch.is_grad_enabled() or not got.requires_grad


def test_embedder_reports_its_dimension_and_rejects_unknown_kinds() -> None:
    model, _, _ = _model_and_batch()
    assert Embedder("logit_gradient").dim(4) == 4
    assert Embedder("last_layer_gradient", last_linear(model)).dim(4) == 24
    with pytest.raises(ValueError, match="received 'tfidf'"):
        Embedder("tfidf")
    with pytest.raises(ValueError, match=r"no nn\.Linear"):
        last_linear(nn.Sequential(nn.ReLU()))


def test_weights_join_tuple_and_dict_batches() -> None:
    w = torch.ones(3)
    x, y = torch.zeros(3, 2), torch.zeros(3, dtype=torch.long)
    assert with_weights((x, y), w)[2] is w
    assert with_weights([x, x, y], w)[3] is w
    out = with_weights({"input_ids": x, "labels": y}, w)
    assert sorted(out) == ["input_ids", "labels", "weights"]
    with pytest.raises(ValueError, match="already has a 'weights'"):
        with_weights({"weights": y}, w)
    with pytest.raises(TypeError, match="received a dict with keys"):
        default_forward(nn.Linear(2, 2), {"input_ids": x})
