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
    """Batch mean of weight * cross-entropy: the CREST training loss for a weighted coreset batch.

    ``targets`` and ``weights`` (float (n,)) are moved to the logits' device: the loader yields them on the CPU,
    and a loop may move only its inputs and targets.
    """
    losses = F.cross_entropy(logits, targets.to(logits.device), reduction="none")
    return (losses * weights.to(losses.device, losses.dtype)).mean()


def random_projection(num_classes: int, feature_dim: int, dim: int, seed: int) -> torch.Tensor:
    """The fixed Gaussian projection of last-layer gradients: float32 (C, H + 1, d), entries N(0, 1/d).

    Seeded and generated on the CPU, so every process (and every DDP rank) builds the same matrix. The extra
    row of H + 1 projects the bias gradient.
    """
    g = torch.Generator().manual_seed(seed)
    return torch.randn(num_classes, feature_dim + 1, dim, generator=g) / dim**0.5


def last_layer_gradient(
    logits: torch.Tensor, targets: torch.Tensor, features: torch.Tensor, projection: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-example gradient of cross-entropy with respect to the last linear layer (weight and bias).

    For a layer z = W h + b the gradient is (softmax(z) - onehot(y)) ⊗ [h, 1], computed in closed form from one
    forward pass (no per-example backward).

    Args:
        logits: float (n, C), the layer's output.
        targets: int64 (n,).
        features: float (n, H), the layer's input h.
        projection: optional float32 (C, H + 1, d) from ``random_projection``; applied without materialising
            the (n, C·(H+1)) gradients.

    Returns:
        float32 (n, C·(H+1)) laid out as [dW row-major (C, H), db (C)], or (n, d) when projected.
    """
    e = logit_gradient(logits, targets)
    h = features.detach().float()
    if projection is not None:
        proj = projection.to(h.device)
        return torch.einsum("nc,nh,chd->nd", e, h, proj[:, :-1]) + e @ proj[:, -1]
    return torch.cat([(e[:, :, None] * h[:, None, :]).reshape(len(e), -1), e], dim=1)
