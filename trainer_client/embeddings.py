"""Closed-form per-example gradient embeddings (no per-example backward pass)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def logit_gradient(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Gradient of each example's cross-entropy with respect to its logits: softmax(z) - onehot(y).

    This is CREST's selection feature (crest-algorithm.md section 1): the last layer's bias gradient.

    Args:
        logits: float (n, C).
        targets: int64 (n,) class indices in [0, C).

    Returns:
        float32 (n, C); each row sums to 0.
    """
    probs = torch.softmax(logits.detach().float(), dim=1)
    return probs - F.one_hot(targets, num_classes=logits.shape[1]).to(probs.dtype)


def per_example_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each example, float32 (n,), in nats."""
    return F.cross_entropy(logits.detach().float(), targets, reduction="none")


def weighted_loss(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Batch mean of weight * cross-entropy: the CREST training loss for a weighted coreset batch."""
    losses = F.cross_entropy(logits, targets, reduction="none")
    return (losses * weights.to(losses.dtype)).mean()
