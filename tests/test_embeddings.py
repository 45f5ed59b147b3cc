"""Closed-form embeddings and the weighted loss against autograd."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trainer_client.embeddings import logit_gradient, per_example_loss, weighted_loss


def test_logit_gradient_equals_autograd_per_example_gradient() -> None:
    torch.manual_seed(0)
    logits = torch.randn(64, 10, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 10, (64,))
    # Summed loss: row i of the gradient is example i's own gradient with respect to its logits.
    (grad,) = torch.autograd.grad(F.cross_entropy(logits, targets, reduction="sum"), logits)
    emb = logit_gradient(logits, targets)
    assert emb.dtype == torch.float32 and emb.shape == (64, 10)
    torch.testing.assert_close(emb, grad.float(), atol=1e-5, rtol=0)
    torch.testing.assert_close(emb.sum(1), torch.zeros(64), atol=1e-6, rtol=0)


def test_per_example_loss_and_weighted_loss() -> None:
    torch.manual_seed(1)
    logits, targets = torch.randn(8, 4), torch.randint(0, 4, (8,))
    losses = per_example_loss(logits, targets)
    torch.testing.assert_close(losses.mean(), F.cross_entropy(logits, targets))
    weights = torch.rand(8) + 0.5
    torch.testing.assert_close(weighted_loss(logits, targets, weights), (weights * losses).mean())
    torch.testing.assert_close(weighted_loss(logits, targets, torch.ones(8)), F.cross_entropy(logits, targets))
