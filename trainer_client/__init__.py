"""CREST trainer client: embeddings, the gRPC client, region control, and a PyTorch loader of weighted coresets.

Never imports faiss or Ray.
"""

from crest.selector.v1.api import RoundPlan, SelectionService, SessionInfo, WeightedBatch
from trainer_client.batches import Embedder, default_forward
from trainer_client.client import SelectionClient
from trainer_client.difficulty import RoundDifficulty
from trainer_client.embeddings import (
    last_layer_gradient,
    logit_gradient,
    per_example_loss,
    random_projection,
    weighted_loss,
)
from trainer_client.loader import CoresetLoader, LoaderConfig, LoaderStats, SelectionUnavailable
from trainer_client.region import CheckResult, QuadraticFit, RegionConfig, RegionController

__all__ = [
    "CheckResult",
    "CoresetLoader",
    "Embedder",
    "LoaderConfig",
    "LoaderStats",
    "QuadraticFit",
    "RegionConfig",
    "RegionController",
    "RoundDifficulty",
    "RoundPlan",
    "SelectionClient",
    "SelectionService",
    "SelectionUnavailable",
    "SessionInfo",
    "WeightedBatch",
    "default_forward",
    "last_layer_gradient",
    "logit_gradient",
    "per_example_loss",
    "random_projection",
    "weighted_loss",
]
