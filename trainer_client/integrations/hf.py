"""A Hugging Face ``Trainer`` that trains on CREST coresets from a running service (extra ``[hf]``).

Two lines change in a training script::

    from trainer_client.integrations.hf import CoresetTrainer
    trainer = CoresetTrainer(model=model, args=args, train_dataset=train_set, endpoint="127.0.0.1:50051")
    trainer.train()

The model and the dataset stay as they are: dict examples collated by the Trainer's collator, a model that returns
``logits`` (n, C) and takes its labels under ``labels`` (the Trainer's ``label_names``). ``CoresetTrainer``:

- replaces the train dataloader with a ``CoresetLoader`` on the Trainer's collated dict batches, fetched by the
  Trainer's DataLoader settings (``dataloader_num_workers``, ``dataloader_pin_memory``,
  ``dataloader_persistent_workers``, ``dataloader_prefetch_factor``, ``dataloader_multiprocessing_context``, and its
  per-worker seeding), never sharded by
  ``accelerate`` (under DDP the loader gives each rank its own share of every step's coreset batch). One loader
  batch is one optimizer step: the coreset size is the Trainer's total train batch size (per-device batch x
  gradient accumulation x processes), cut into the accumulation's micro-batches (``steps.StepBatches``);
- weights the loss in ``compute_loss``: the labels are taken out of the inputs, the model runs without them and
  the loss is ``weighted_loss(logits, labels, weights)`` (evaluation batches, which carry no weights, keep the
  Trainer's own loss);
- writes the loader's ``state_dict`` into every checkpoint folder (``crest_loader.pt``, beside the optimizer's) and
  loads it on ``train(resume_from_checkpoint=...)``, so a resumed run trains on the batches an uninterrupted run
  would have, as long as the service session lives. The loader's state replaces the Trainer's skipping of the
  batches already trained (``ignore_data_skip`` is set);
- closes the session when ``train`` returns, and keeps it when ``train`` raises, so that a restarted job resumes it.

Runs under ``accelerate``/``torchrun`` DDP (CPU gloo or GPU NCCL): the loader finds the process group the Trainer
initialised, and rank 0 alone talks to the service.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from numpy.typing import ArrayLike
from torch.utils.data import Dataset

from crest.selector.v1 import codec
from trainer_client.batches import label_array
from trainer_client.client import SelectionClient
from trainer_client.embeddings import weighted_loss
from trainer_client.integrations.steps import (
    StepBatches,
    dataset_labels,
    integration_config,
    logged_stats,
    logits_of,
    missing_extra,
    probe_set,
)
from trainer_client.loader import CoresetLoader, LoaderConfig

try:
    from transformers import Trainer
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint, seed_worker
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise missing_extra("trainer_client.integrations.hf", "hf", exc) from exc

log = logging.getLogger(__name__)

__all__ = ["LOADER_STATE_NAME", "CoresetTrainer"]

# File of the loader's state in a Trainer checkpoint folder.
LOADER_STATE_NAME = "crest_loader.pt"


class CoresetTrainer(Trainer):
    """``transformers.Trainer`` training on weighted coresets from the selection service.

    Every argument of ``Trainer`` is accepted and passed on; ``train_dataset`` is required (map-style, one class
    label per example). Give ``args.max_steps`` or epochs: an epoch is ``ceil(N / total batch)`` optimizer steps.

    Args:
        endpoint: ``host:port`` of ``crest serve``, or a ``SelectionClient`` (for a token or TLS).
        recipe: the selection settings' recipe (``trainer_client.loader_config.RECIPES``): "recommended" (the
            default), "long-tail" or "released"; for a recipe with overrides pass ``loader_config`` instead.
        loader_config: selection settings; ``batch_size`` is set to the Trainer's total train batch size
            (giving another non-default one is an error). Default: the ``recipe``'s.
        labels: int (N,) label of every training example; default: read from the dataset (a ``labels``/``label``
            key or column, or a ``targets`` attribute).
        num_classes: C; 0 means max(labels) + 1.
        payoff_probe: the held-out probe set of ``LoaderConfig.payoff`` (collated by the Trainer's collator);
            default: the first 512 examples of ``eval_dataset``.

    Attributes:
        coreset_loader: the loader of the running (or last) ``train`` call; its ``stats`` and ``last_ids``
            (this rank's ids of the last optimizer step) are for logging and tests.
    """

    def __init__(
        self,
        *args: Any,
        endpoint: str | SelectionClient,
        recipe: str | None = None,
        loader_config: LoaderConfig | None = None,
        labels: ArrayLike | None = None,
        num_classes: int = 0,
        payoff_probe: Dataset | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if self.train_dataset is None:
            raise ValueError("CoresetTrainer needs a train_dataset: the coresets are selected from it")
        self._endpoint = endpoint
        self._config = integration_config(recipe, loader_config, "CoresetTrainer")
        self._labels = None if labels is None else label_array(labels)
        self._num_classes = num_classes
        eval_set = self.eval_dataset if not isinstance(self.eval_dataset, dict) else None
        self._probe = probe_set(self._config, payoff_probe, eval_set, "CoresetTrainer")  # type: ignore[arg-type]
        self._resume_dir: str | None = None
        self.coreset_loader: CoresetLoader | None = None
        self._loader_open = False
        # compute_loss returns a per-micro-batch mean: the Trainer divides it by the accumulation steps.
        self.loss_is_scaled_for_ga = False
        if not self.args.ignore_data_skip:
            log.info("CoresetTrainer: the loader's checkpointed state replaces the Trainer's data skip on resume")
            self.args.ignore_data_skip = True

    # -- the train dataloader ------------------------------------------------------------------------------

    @property
    def label_key(self) -> str:
        """The batch key of the labels: the Trainer's single label name (``labels`` by default)."""
        names = self.label_names or ["labels"]
        if len(names) != 1:
            raise ValueError(f"CoresetTrainer needs one label tensor per batch; the Trainer's label_names are {names}")
        return names[0]

    def get_train_dataloader(self) -> Any:
        """A ``StepBatches`` over a new ``CoresetLoader`` (the state of ``resume_from_checkpoint`` loaded)."""
        self._close_loader(end_session=True)
        dataset = self.train_dataset
        labels = self._labels if self._labels is not None else dataset_labels(dataset)
        if len(labels) != len(dataset):  # type: ignore[arg-type]
            raise ValueError(f"labels has {len(labels)} entries; the training dataset {len(dataset)}")  # type: ignore[arg-type]
        total = self.args.per_device_train_batch_size * self.args.gradient_accumulation_steps * self.args.world_size
        if self._config.batch_size not in (codec.DEFAULT_BATCH_SIZE, total):
            raise ValueError(
                f"loader_config.batch_size is {self._config.batch_size}, the Trainer's total train batch size "
                f"{total} (per_device_train_batch_size x gradient_accumulation_steps x processes): set the batch "
                "size in the TrainingArguments and leave it out of the LoaderConfig"
            )
        # The quadratic model's fit runs in this process's micro-batches, as the Trainer's steps do.
        micro = self._config.fit_batch_size or self.args.per_device_train_batch_size
        config = replace(self._config, batch_size=total, fit_batch_size=micro)
        client = self._endpoint if isinstance(self._endpoint, SelectionClient) else SelectionClient(self._endpoint)
        # The Trainer keeps the columns model.forward takes; the loader needs the labels even where it takes none.
        self._set_signature_columns_if_needed()
        if self._signature_columns is not None and self.label_key not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, self.label_key]
        collate = self._get_collator_with_removed_columns(self.data_collator, description="training")
        assert self.model is not None, "Trainer.__init__ sets the model"
        loader = CoresetLoader(
            dataset,  # type: ignore[arg-type]
            self.model,  # the replica: the loader's passes need no gradient sync
            client,
            labels,
            num_classes=self._num_classes,
            config=config,
            collate_fn=collate,
            forward_fn=self._forward_fn(),
            probe=self._probe,
            **self._worker_settings(),
        )
        if self._resume_dir is not None:
            path = Path(self._resume_dir) / LOADER_STATE_NAME
            if path.is_file():
                loader.load_state_dict(torch.load(path, weights_only=True))
                log.info("loader state restored from %s at step %d", path, loader.stats.steps)
            else:
                log.warning("%s has no loader state (%s): selection starts afresh", self._resume_dir, LOADER_STATE_NAME)
        self.coreset_loader, self._loader_open = loader, True
        return StepBatches(loader, self.args.gradient_accumulation_steps)

    def _worker_settings(self) -> dict[str, Any]:
        """The Trainer's DataLoader settings for the loader's workers, as ``Trainer.get_train_dataloader`` sets them."""
        args = self.args
        return {
            "num_workers": args.dataloader_num_workers,
            "pin_memory": args.dataloader_pin_memory,
            "persistent_workers": args.dataloader_persistent_workers,
            "prefetch_factor": args.dataloader_prefetch_factor,
            "multiprocessing_context": args.dataloader_multiprocessing_context,
            "worker_init_fn": functools.partial(
                seed_worker, num_workers=args.dataloader_num_workers, rank=args.process_index
            ),
        }

    def _forward_fn(self) -> Callable[[torch.nn.Module, Any], tuple[torch.Tensor, torch.Tensor]]:
        """The loader's ``(model, batch) -> (logits, labels)`` for the Trainer's dict batches."""
        key = self.label_key

        def forward(model: torch.nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
            if not isinstance(batch, Mapping) or key not in batch:
                found = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
                raise ValueError(f"training batches must be dicts with the labels under {key!r}; received {found}")
            device = next(model.parameters()).device
            inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items() if k != key}
            return logits_of(model(**inputs), model), batch[key].to(device)

        return forward

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """The Trainer's log with the loader's ``crest/`` counters beside the loss (``steps.logged_stats``), so
        TensorBoard, W&B and every other ``report_to`` show whether selection runs, with no extra code."""
        if self.coreset_loader is not None:
            logs = {**logs, **logged_stats(self.coreset_loader)}
        super().log(logs, start_time)

    # -- the weighted loss ---------------------------------------------------------------------------------

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> Any:
        """``weighted_loss(logits, labels, weights)`` of a coreset micro-batch; the Trainer's loss otherwise."""
        weights_key = self._config.weights_key
        if weights_key not in inputs:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        inputs = dict(inputs)
        weights, labels = inputs.pop(weights_key), inputs.pop(self.label_key)
        outputs = model(**inputs)
        loss = weighted_loss(logits_of(outputs, model), labels, weights)
        return (loss, outputs) if return_outputs else loss

    # -- checkpoints and the session -----------------------------------------------------------------------

    def _save_checkpoint(self, model: torch.nn.Module, trial: Any) -> None:
        state = self.coreset_loader.state_dict() if self.coreset_loader is not None else None  # every rank
        super()._save_checkpoint(model, trial)
        if state is None or not self.args.should_save:
            return
        folder = Path(self._get_output_dir(trial=trial)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / (LOADER_STATE_NAME + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, folder / LOADER_STATE_NAME)

    def train(  # type: ignore[override]
        self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any
    ) -> Any:
        """``Trainer.train``; the loader's state is restored with the checkpoint's, and the session is closed when
        training ends (kept when it raises, for a restart to resume)."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"no checkpoint found in output directory {self.args.output_dir}")
        self._resume_dir = resume_from_checkpoint or None  # type: ignore[assignment]
        finished = False
        try:
            out = super().train(resume_from_checkpoint or None, *args, **kwargs)
            finished = True
            return out
        finally:
            self._close_loader(end_session=finished)

    def _close_loader(self, end_session: bool) -> None:
        """Close the running loader, and its client when this trainer made it (idempotent)."""
        loader = self.coreset_loader
        if loader is None or not self._loader_open:
            return
        self._loader_open = False
        loader.close(end_session=end_session)
        if not isinstance(self._endpoint, SelectionClient):
            loader.client.close()
