"""Batch plumbing of the loader: how a batch is run through the model, how weights join it, and how candidate
ids become embeddings. Works with tuple/list batches (``(inputs, targets, ...)``) and dict batches
(Hugging Face style), given a ``forward_fn`` that extracts logits and labels."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from crest.selector.v1 import codec
from trainer_client.embeddings import last_layer_gradient, logit_gradient, random_projection

# (model, batch) -> (logits float (n, C), targets int64 (n,)), both on the model's device.
ForwardFn = Callable[[nn.Module, Any], tuple[torch.Tensor, torch.Tensor]]


def collate_ids(dataset: Dataset, collate_fn: Callable[[list[Any]], Any], ids: np.ndarray) -> Any:
    """The batch of the examples ``ids`` (int (n,)), in that order: ``collate_fn([dataset[i] for i in ids])``."""
    return collate_fn([dataset[int(i)] for i in ids])


def label_array(labels: Any) -> np.ndarray:
    """int64 (N,) host copy of class labels given as an array, a sequence or a tensor on any device."""
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    return np.asarray(labels, dtype=np.int64)


def default_forward(model: nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and targets of an ``(inputs, targets, ...)`` batch, on the model's device; floating inputs take the
    model's dtype too (a ``model.half()`` or bfloat16 model).

    For any other batch shape pass your own ``forward_fn``; for a Hugging Face sequence classifier::

        def forward_fn(model, batch):
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            return out.logits, batch["labels"]
    """
    if isinstance(batch, Mapping):
        raise TypeError(
            f"the default forward_fn takes (inputs, targets) batches; received a dict with keys {sorted(batch)}. "
            "Pass forward_fn=(model, batch) -> (logits, targets) to CoresetLoader"
        )
    param = next(model.parameters())
    inputs, targets = batch[0], batch[1]
    dtype = param.dtype if inputs.is_floating_point() and param.is_floating_point() else None
    return model(inputs.to(param.device, dtype)), targets.to(param.device)


def with_weights(batch: Any, weights: torch.Tensor, key: str = "weights") -> Any:
    """What the loader yields: ``(*batch, weights)`` for a tuple/list batch, ``{**batch, key: weights}`` for a
    dict batch. ``weights`` is float32 (n,), mean 1 over the region (all ones for a fallback batch)."""
    if isinstance(batch, Mapping):
        if key in batch:
            raise ValueError(f"the batch already has a {key!r} entry; choose another LoaderConfig.weights_key")
        return {**batch, key: weights}
    if isinstance(batch, (tuple, list)):
        return (*batch, weights)
    raise TypeError(f"batches must be tuples, lists or dicts to carry weights; collate_fn returned {type(batch)}")


def last_linear(model: nn.Module) -> nn.Linear:
    """The model's last ``nn.Linear`` in registration order (normally the classifier head)."""
    found = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not found:
        raise ValueError(
            f"{type(model).__name__} has no nn.Linear layer; pass last_layer= to CoresetLoader or use the "
            "logit_gradient embedding"
        )
    return found[-1]


class Embedder:
    """Per-example gradient embeddings of a batch, in closed form under no_grad (one forward pass).

    Args:
        kind: "logit_gradient" (softmax(z) - onehot(y), d = C) or "last_layer_gradient"
            ((softmax(z) - onehot(y)) ⊗ [h, 1], h the input of ``layer``).
        layer: the last linear layer (last-layer kind only).
        dim: random-projection dimension for the last-layer kind; 0 keeps all C·(H+1) values.
        seed: seeds the projection (the same on every process).
    """

    def __init__(self, kind: str, layer: nn.Linear | None = None, dim: int = 0, seed: int = 0) -> None:
        codec.enum_value("embedding", codec.EMBEDDING_KINDS, kind)  # a WireError (ValueError) names the kinds
        if kind == "last_layer_gradient" and layer is None:
            raise ValueError("the last_layer_gradient embedding needs the model's last nn.Linear layer")
        self.kind, self.layer = kind, layer
        self.projection: torch.Tensor | None = None
        if kind == "last_layer_gradient" and dim:
            assert layer is not None
            self.projection = random_projection(layer.out_features, layer.in_features, dim, seed)
        self._on_device: torch.Tensor | None = None  # the projection where the model runs, copied there once

    def dim(self, num_classes: int) -> int:
        """Row dimension d the service must be told at session creation."""
        if self.kind == "logit_gradient":
            return num_classes
        if self.projection is not None:
            return int(self.projection.shape[2])
        assert self.layer is not None
        return self.layer.out_features * (self.layer.in_features + 1)

    @contextlib.contextmanager
    def _capture(self) -> Iterator[list[torch.Tensor]]:
        seen: list[torch.Tensor] = []
        if self.layer is None or self.kind == "logit_gradient":
            yield seen
            return
        handle = self.layer.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
        try:
            yield seen
        finally:
            handle.remove()

    @torch.no_grad()
    def __call__(self, model: nn.Module, batch: Any, forward_fn: ForwardFn) -> tuple[torch.Tensor, ...]:
        """(embeddings float32 (n, d), targets int64 (n,), logits float (n, C)) of one batch."""
        with self._capture() as seen:
            logits, targets = forward_fn(model, batch)
        if self.kind == "logit_gradient":
            return logit_gradient(logits, targets), targets, logits
        if len(seen) != 1:
            raise RuntimeError(f"the last linear layer ran {len(seen)} times in one forward pass; expected once")
        features = seen[0].reshape(len(logits), -1)
        return last_layer_gradient(logits, targets, features, self._projection_on(features.device)), targets, logits

    def _projection_on(self, device: torch.device) -> torch.Tensor | None:
        if self.projection is None:
            return None
        if self._on_device is None or self._on_device.device != device:
            self._on_device = self.projection.to(device)
        return self._on_device


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (the CPU for a model without parameters)."""
    param = next(model.parameters(), None)
    return torch.device("cpu") if param is None else param.device
