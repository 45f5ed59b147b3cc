"""What the framework integrations share, with no framework imported: one coreset batch per optimizer step, cut
into gradient-accumulation micro-batches; the class labels of a dataset; the logits of a model's output.

A coreset is a weighted mini-batch that stands for the gradient of one optimizer step (CREST section 3), so the
loader yields one batch per optimizer step and ``StepBatches`` cuts it into the ``accumulation`` micro-batches the
framework runs before stepping. The frameworks divide each micro-batch's loss by ``accumulation``; the weights
are rescaled so that the accumulated loss is the weighted mean over the whole coreset batch, as one un-split step
would have it. The loader then sees optimizer steps, not micro-batches: its region steps, Taylor checks and
checkpoints fall between optimizer steps, as its contract asks.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from trainer_client.batches import ForwardFn
from trainer_client.distributed import split_bounds
from trainer_client.loader import CoresetLoader, LoaderConfig
from trainer_client.payoff import or_nan

# Examples of an evaluation dataset an integration takes as the payoff's probe set when none is given.
PROBE_EXAMPLES = 512

# Keys a Hugging Face batch or example carries its class label under (the default collator renames "label" and
# "label_ids" to "labels").
LABEL_KEYS = ("labels", "label", "label_ids")


def integration_config(recipe: str | None, config: LoaderConfig | None, integration: str) -> LoaderConfig:
    """The selection settings of an integration: ``config``, or the recipe ``recipe`` (``recommended`` when
    neither is given). Both at once is refused: ``LoaderConfig.from_recipe(recipe, ...)`` says both in one value."""
    if recipe is not None and config is not None:
        raise ValueError(
            f"{integration} takes recipe= or loader_config=, received both (recipe={recipe!r}); pass "
            f"loader_config=LoaderConfig.from_recipe({recipe!r}, ...) for a recipe with overrides"
        )
    out = config if config is not None else LoaderConfig.from_recipe(recipe or "recommended")
    refuse_training_logits(out, integration)
    return out


def probe_set(
    config: LoaderConfig, probe: Dataset | None, held_out: Dataset | None, integration: str
) -> Dataset | None:
    """The payoff's probe set (``LoaderConfig.payoff``): ``probe``, else the first ``PROBE_EXAMPLES`` of
    ``held_out`` (an evaluation dataset the run does not train on); None with the payoff off. Refuses a payoff
    with neither, naming both ways to give one."""
    if config.payoff == "off":
        return None
    if probe is not None:
        return probe
    if held_out is None:
        raise ValueError(
            f"{integration} with LoaderConfig(payoff={config.payoff!r}) scores the arms on a held-out probe set: pass "
            "payoff_probe=dataset (a few hundred examples not trained on), or an eval_dataset to take them from"
        )
    return Subset(held_out, range(min(PROBE_EXAMPLES, len(held_out))))  # type: ignore[arg-type]


def refuse_training_logits(config: LoaderConfig, integration: str) -> None:
    """``LoaderConfig.training_logits`` asks the training loop to call ``CoresetLoader.observe_logits``; the
    integrations do not (the framework runs the forward, micro-batch by micro-batch), so the setting is refused
    rather than ignored."""
    if config.training_logits:
        raise ValueError(
            f"{integration} does not hand the loader the training steps' logits: leave "
            "LoaderConfig.training_logits False (received True); the embedding cache's ages work without it"
        )


def logged_stats(loader: CoresetLoader) -> dict[str, float]:
    """The loader's counters an integration adds to the framework's logged metrics, under ``crest/``: whether
    selection runs at all (uniform fallback batches, failed calls to the service, regions trained on) and what it
    costs (seconds waiting for coresets, in the embedding passes, getting training batches); with
    ``LoaderConfig.payoff`` on, whether it pays (selection's speedup per second over the control, its 90% interval,
    nan until 2 measurements; the measurements; 1 while governed onto the control; control steps; probe seconds)."""
    s = loader.stats
    out = {
        "crest/fallback_batches": float(s.fallback_batches),
        "crest/service_errors": float(s.service_errors),
        "crest/regions": float(s.regions),
        "crest/coreset_wait_s": s.wait_s,
        "crest/embed_s": s.embed_s,
        "crest/input_wait_s": s.input_wait_s,
    }
    if loader.config.payoff != "off":
        out |= {
            "crest/payoff_per_second": or_nan(s.payoff_per_second),
            "crest/payoff_per_second_lo": or_nan(s.payoff_per_second_lo),
            "crest/payoff_per_second_hi": or_nan(s.payoff_per_second_hi),
            "crest/payoff_measurements": float(s.payoff_measurements),
            "crest/payoff_on_control": float(s.payoff_arm == "control"),
            "crest/control_steps": float(s.control_steps),
            "crest/probe_s": s.probe_s,
        }
    return out


def missing_extra(module: str, extra: str, exc: ImportError) -> ImportError:
    """The error to raise when an integration's framework is not installed."""
    return ImportError(
        f"{module} needs the '{extra}' extra ({exc.name or exc} is not installed): from a checkout, pip install "
        f"'.[{extra}]'; elsewhere, the wheel that `make wheel` builds with the same extra"
    )


def split_batch(batch: Any, parts: int, weights_key: str = "weights") -> list[Any]:
    """Cut a loader batch into ``parts`` micro-batches along the first dimension (as ``np.array_split``: the
    first ones hold one example more), rescaling the weights so that the mean over the micro-batches of each one's
    weighted mean loss equals the weighted mean loss of the whole batch.

    Args:
        batch: ``(*tensors, weights)`` or ``{..., weights_key: weights}`` as ``CoresetLoader`` yields it; every
            tensor (and list) has the batch's n examples first; weights float32 (n,).
        parts: micro-batches, >= 1; at most n.

    Returns:
        ``parts`` batches of the same kind; micro-batch j's weights are ``w * parts * n_j / n``.
    """
    if parts == 1:
        return [batch]
    if isinstance(batch, Mapping):
        items, weights = {k: v for k, v in batch.items() if k != weights_key}, batch[weights_key]
    else:
        items, weights = dict(enumerate(batch[:-1])), batch[-1]
    n = len(weights)
    if n < parts:
        raise ValueError(
            f"this rank's batch has {n} examples, fewer than the {parts} gradient-accumulation micro-batches; raise "
            "the batch size or lower the accumulation steps"
        )
    out: list[Any] = []
    for lo, hi in (split_bounds(n, parts, j) for j in range(parts)):
        part = {k: _slice(k, v, n, lo, hi) for k, v in items.items()}
        w = weights[lo:hi] * (parts * (hi - lo) / n)
        if isinstance(batch, Mapping):
            out.append({**part, weights_key: w})
        else:
            out.append([*part.values(), w] if isinstance(batch, list) else (*part.values(), w))
    return out


def _slice(key: Any, value: Any, n: int, lo: int, hi: int) -> Any:
    if isinstance(value, (torch.Tensor, np.ndarray, list, tuple)) and len(value) == n:
        return value[lo:hi]
    raise TypeError(
        f"batch entry {key!r} is a {type(value).__name__} without the batch's {n} examples first; gradient "
        "accumulation cuts every entry of the batch"
    )


class StepBatches:
    """The train dataloader a framework sees: ``accumulation`` micro-batches per loader batch, forever.

    ``len()`` is the micro-batches of one epoch, an epoch being about the dataset's size in examples trained
    (``ceil(N / batch_size)`` optimizer steps), so epoch-based training works as well as ``max_steps``. Every
    ``iter()`` continues where the last one stopped: the loader's schedule, not the epoch, decides the batches.
    """

    def __init__(self, loader: CoresetLoader, accumulation: int = 1) -> None:
        if accumulation < 1:
            raise ValueError(f"gradient accumulation steps must be >= 1, received {accumulation}")
        self.loader, self.accumulation = loader, accumulation
        self._batches = iter(loader)
        self.steps_per_epoch = max(1, math.ceil(len(loader.labels) / loader.config.batch_size))

    def __len__(self) -> int:
        return self.steps_per_epoch * self.accumulation

    def __iter__(self) -> Iterator[Any]:
        while True:
            # The loader's passes (embedding, Taylor check, the quadratic model's fit) run inside next().
            batch = next(self._batches, None)
            if batch is None:  # the loader was closed
                return
            yield from split_batch(batch, self.accumulation, self.loader.config.weights_key)


def dataset_labels(dataset: Any, keys: tuple[str, ...] = LABEL_KEYS) -> np.ndarray:
    """int64 (N,): the class label of every example of a map-style dataset, in index order.

    Read from a ``targets`` attribute (torchvision style), a label column (``datasets.Dataset``), or else each
    example: a dict's first key of ``keys``, or a tuple's second item. Raises ``ValueError`` naming what example 0
    holds when there is no integer class label: CREST draws class-balanced subsets and needs one per example.
    """
    targets = getattr(dataset, "targets", None)
    if targets is not None:
        return _as_labels(targets, "the dataset's targets")
    columns = getattr(dataset, "column_names", None)
    if columns is not None:
        for key in keys:
            if key in columns:
                return _as_labels(dataset[key], f"column {key!r}")
    n = len(dataset)
    if n == 0:
        raise ValueError("the training dataset is empty")
    first = dataset[0]
    if isinstance(first, Mapping):
        found = next((k for k in keys if k in first), None)
        if found is None:
            raise ValueError(
                f"the training examples have no class label: example 0 has keys {sorted(first)}, none of "
                f"{list(keys)}. CREST selects class-balanced coresets and needs an integer label per example; add "
                "one, or pass labels= (int (N,)) to the integration"
            )
        values = [first[found]] + [dataset[i][found] for i in range(1, n)]
        return _as_labels(np.asarray([_scalar(v) for v in values]), f"key {found!r}")
    if isinstance(first, (tuple, list)) and len(first) >= 2:
        return _as_labels(np.asarray([_scalar(dataset[i][1]) for i in range(n)]), "item [1] of each example")
    raise ValueError(
        f"cannot find the class labels of a dataset whose examples are {type(first).__name__}; pass labels= "
        "(int (N,)) to the integration"
    )


def _scalar(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(
                f"a class label must be one integer per example; received a tensor of shape "
                f"{tuple(value.shape)} (token-level labels are not supported)"
            )
        return value.item()
    return value


def _as_labels(values: Any, where: str) -> np.ndarray:
    """int64 (N,) host copy of ``values`` (an array, a sequence or a tensor on any device), checked to be labels."""
    values = values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
    if values.ndim != 1 or not np.issubdtype(values.dtype, np.integer):
        raise ValueError(
            f"class labels from {where} must be integers, one per example; received dtype {values.dtype} and "
            f"shape {values.shape}"
        )
    return values.astype(np.int64)


def logits_of(outputs: Any, model: torch.nn.Module) -> torch.Tensor:
    """The ``logits`` of a model's output (a ``ModelOutput`` or a dict), float (n, C).

    Raises ``TypeError`` naming what the model returned when it has no logits of that shape: CREST weights a
    per-example classification loss and embeds its gradient with respect to the logits.
    """
    logits = outputs.get("logits") if isinstance(outputs, Mapping) else getattr(outputs, "logits", None)
    if logits is None:
        keys = sorted(outputs) if isinstance(outputs, Mapping) else type(outputs).__name__
        raise TypeError(
            f"{type(model).__name__} returned no logits (received {keys}); CREST weights a per-example "
            "classification loss computed from logits (batch, classes): use a model with a classification head, "
            "e.g. *ForSequenceClassification or *ForImageClassification"
        )
    if logits.ndim != 2:
        raise TypeError(
            f"{type(model).__name__} returned logits of shape {tuple(logits.shape)}; CREST needs one class "
            "distribution per example, logits (batch, classes)"
        )
    return logits


def checked_forward(forward_fn: ForwardFn) -> ForwardFn:
    """``forward_fn`` whose output is checked: logits (n, C) for the n targets, taken out of a ``ModelOutput`` or
    dict when the model returns one; a ``TypeError`` naming what came back otherwise."""

    def forward(model: torch.nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        outputs, targets = forward_fn(model, batch)
        logits = outputs if isinstance(outputs, torch.Tensor) else logits_of(outputs, model)
        if logits.ndim != 2 or len(logits) != len(targets):
            raise TypeError(
                f"{type(model).__name__} returned logits of shape {tuple(logits.shape)} for {len(targets)} "
                "targets; CREST needs one class distribution per example, logits (batch, classes)"
            )
        return logits, targets

    return forward
