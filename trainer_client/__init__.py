"""CREST trainer client: embeddings, the gRPC client, and a PyTorch loader of weighted coresets.

Never imports faiss or Ray.
"""

from trainer_client.client import RoundPlan, SelectionClient, SessionInfo, WeightedBatch
from trainer_client.embeddings import logit_gradient, per_example_loss, weighted_loss
from trainer_client.loader import CoresetLoader, LoaderConfig, LoaderStats

__all__ = [
    "CoresetLoader",
    "LoaderConfig",
    "LoaderStats",
    "RoundPlan",
    "SelectionClient",
    "SessionInfo",
    "WeightedBatch",
    "logit_gradient",
    "per_example_loss",
    "weighted_loss",
]
