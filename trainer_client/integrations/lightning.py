"""A PyTorch Lightning ``LightningDataModule`` that trains on CREST coresets from a running service (extra
``[lightning]``).

The fit changes by a few lines: the data module in place of the train dataloader, and the weights in
``training_step``::

    from trainer_client import weighted_loss
    from trainer_client.integrations.lightning import CoresetDataModule

    def training_step(self, batch, batch_idx):
        x, y, w = batch
        return weighted_loss(self(x), y, w)

    trainer.fit(model, datamodule=CoresetDataModule(train_set, "127.0.0.1:50051"))

``CoresetDataModule.train_dataloader`` hands the ``LightningModule`` being fitted to a ``CoresetLoader`` and
returns one coreset batch per optimizer step, cut into ``accumulate_grad_batches`` micro-batches
(``steps.StepBatches``); batches are ``(*batch, weights)`` or ``{**batch, "weights": w}``. It has a length (an
epoch is ``ceil(N / batch_size)`` optimizer steps), so Lightning fetches no batch ahead and the loader's state in a
checkpoint is the state after the step checkpointed. Under Lightning's DDP strategy every rank builds the loader
in ``train_dataloader`` (the process group exists by then), rank 0 alone talks to the service and each rank trains
its own share of every step's batch; Lightning adds no sampler to it.

The loader's state goes into Lightning's checkpoints through the data module's ``state_dict`` (a collective under
DDP: Lightning calls it on every rank) and comes back with ``fit(ckpt_path=...)``, so a resumed fit trains on the
batches an uninterrupted fit would have, as long as the service session lives. ``teardown`` closes the session when
the fit ends, and keeps it when the fit was interrupted by an error, for a restart to resume it.

For validation or test data, subclass and add ``val_dataloader`` / ``test_dataloader`` as in any data module.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from numpy.typing import ArrayLike
from torch.utils.data import Dataset, default_collate

from trainer_client._fetch import Workers
from trainer_client.batches import ForwardFn, default_forward, label_array
from trainer_client.client import SelectionClient
from trainer_client.integrations.steps import (
    StepBatches,
    checked_forward,
    dataset_labels,
    integration_config,
    logged_stats,
    missing_extra,
    probe_set,
)
from trainer_client.loader import CoresetLoader, LoaderConfig

try:
    import lightning.pytorch as pl
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise missing_extra("trainer_client.integrations.lightning", "lightning", exc) from exc

log = logging.getLogger(__name__)

__all__ = ["CoresetDataModule"]


class CoresetDataModule(pl.LightningDataModule):
    """Weighted coresets of ``train_dataset`` from the selection service, as a Lightning data module.

    Args:
        train_dataset: map-style dataset of the examples to select from.
        endpoint: ``host:port`` of ``crest serve``, or a ``SelectionClient`` (for a token or TLS).
        batch_size: examples per optimizer step over all ranks and accumulated micro-batches (the coreset size).
        recipe: the selection settings' recipe (``trainer_client.loader_config.RECIPES``): "recommended" (the
            default), "long-tail" or "released"; for a recipe with overrides pass ``loader_config`` instead.
        loader_config: the other selection settings (its batch_size is replaced by ``batch_size``).
        labels: int (N,) label of every example; default: the dataset's ``targets``, or each example's label.
        num_classes: C; 0 means max(labels) + 1.
        collate_fn: turns a list of examples into a batch.
        forward_fn: ``(model, batch) -> (logits (n, C), targets (n,))``; the default runs ``model(batch[0])``.
        num_workers, pin_memory, prefetch_factor: the worker settings a data module passes to its ``DataLoader``:
            the coreset batches, and the examples the loader embeds, are fetched by a ``DataLoader`` with them
            (each rank its own share under DDP).
        persistent_workers, worker_init_fn: the ``DataLoader``'s, likewise.
        payoff_probe: the held-out probe set of ``LoaderConfig.payoff`` (collated by ``collate_fn``); required
            when the payoff is on.

    Attributes:
        loader: the ``CoresetLoader`` of the running (or last) fit; ``loader.stats``, ``loader.last_ids``.
    """

    def __init__(
        self,
        train_dataset: Dataset,
        endpoint: str | SelectionClient,
        *,
        batch_size: int = 128,
        recipe: str | None = None,
        loader_config: LoaderConfig | None = None,
        labels: ArrayLike | None = None,
        num_classes: int = 0,
        collate_fn: Callable[[list[Any]], Any] = default_collate,
        forward_fn: ForwardFn = default_forward,
        num_workers: int = 0,
        pin_memory: bool = False,
        prefetch_factor: int | None = None,
        persistent_workers: bool = False,
        worker_init_fn: Callable[[int], None] | None = None,
        payoff_probe: Dataset | None = None,
    ) -> None:
        super().__init__()
        self.workers = Workers(
            num_workers=num_workers,
            pin_memory=pin_memory,
            prefetch_factor=prefetch_factor,
            persistent_workers=persistent_workers,
            worker_init_fn=worker_init_fn,
        )
        self.train_dataset, self.endpoint = train_dataset, endpoint
        config = integration_config(recipe, loader_config, "CoresetDataModule")
        self.config = replace(config, batch_size=batch_size)
        self.probe = probe_set(self.config, payoff_probe, None, "CoresetDataModule")
        self.labels = None if labels is None else label_array(labels)
        self.num_classes, self.collate_fn, self.forward_fn = num_classes, collate_fn, forward_fn
        self.loader: CoresetLoader | None = None
        self._batches: StepBatches | None = None
        self._restored: dict[str, Any] | None = None
        self._logged_at = -1  # the optimizer step the counters were last logged at

    def train_dataloader(self) -> StepBatches:
        """The coreset batches of this fit, built once (with the checkpoint's loader state when resuming)."""
        if self._batches is not None:
            return self._batches
        trainer = self.trainer
        if trainer is None:
            raise RuntimeError("CoresetDataModule.train_dataloader runs inside Trainer.fit (it needs the model)")
        labels = self.labels if self.labels is not None else dataset_labels(self.train_dataset)
        if len(labels) != len(self.train_dataset):  # type: ignore[arg-type]
            raise ValueError(f"labels has {len(labels)} entries; the training dataset {len(self.train_dataset)}")  # type: ignore[arg-type]
        client = self.endpoint if isinstance(self.endpoint, SelectionClient) else SelectionClient(self.endpoint)
        # The quadratic model's fit runs in this rank's micro-batches, as Lightning's steps do.
        parts = trainer.world_size * trainer.accumulate_grad_batches
        config = replace(self.config, fit_batch_size=self.config.fit_batch_size or -(-self.config.batch_size // parts))
        loader = CoresetLoader(
            self.train_dataset,
            trainer.lightning_module,
            client,
            labels,
            num_classes=self.num_classes,
            config=config,
            collate_fn=self.collate_fn,
            forward_fn=checked_forward(self.forward_fn),
            num_workers=self.workers.num_workers,
            pin_memory=self.workers.pin_memory,
            prefetch_factor=self.workers.prefetch_factor,
            persistent_workers=self.workers.persistent_workers,
            worker_init_fn=self.workers.worker_init_fn,
            probe=self.probe,
        )
        if self._restored is not None:
            loader.load_state_dict(self._restored)
            log.info("loader state restored from the checkpoint at step %d", loader.stats.steps)
            self._restored = None
        self.loader = loader
        self._batches = StepBatches(loader, trainer.accumulate_grad_batches)
        return self._batches

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Every ``log_every_n_steps`` optimizer steps of a fit, the loader's ``crest/`` counters
        (``steps.logged_stats``) go to the fit's loggers, so TensorBoard, W&B or CSV show whether selection runs
        with no extra code; the batch passes unchanged."""
        trainer = self.trainer
        # Set on the trainer by its logger connector (not a declared attribute); 0 turns logging off.
        every = int(getattr(trainer, "log_every_n_steps", 50))
        if trainer is not None and trainer.training and self.loader is not None and trainer.loggers and every > 0:
            step = trainer.global_step
            if step != self._logged_at and step % every == 0:
                self._logged_at = step
                for logger in trainer.loggers:
                    logger.log_metrics(logged_stats(self.loader), step=step)
        return batch

    def state_dict(self) -> dict[str, Any]:
        """``{"loader": CoresetLoader.state_dict()}`` once training has started (a collective under DDP)."""
        return {} if self.loader is None else {"loader": self.loader.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep the checkpoint's loader state for ``train_dataloader`` (Lightning restores before it runs)."""
        self._restored = state_dict.get("loader")

    def teardown(self, stage: str) -> None:
        """Close the loader after a fit: the session ends, unless the fit was interrupted by an error."""
        if stage != "fit" or self.loader is None:
            return
        interrupted = self.trainer is not None and self.trainer.interrupted
        self.loader.close(end_session=not interrupted)
        if not isinstance(self.endpoint, SelectionClient):
            self.loader.client.close()
        self._batches = None
