"""``CoresetLoader`` inside the trainers people already use: Hugging Face's ``Trainer`` and PyTorch Lightning.

- ``trainer_client.integrations.hf.CoresetTrainer`` (extra ``[hf]``): a ``transformers.Trainer`` that trains on
  coresets from a running service, with the loss weighted in ``compute_loss`` and the loader's state in the
  Trainer's checkpoints.
- ``trainer_client.integrations.lightning.CoresetDataModule`` (extra ``[lightning]``): a ``LightningDataModule``
  whose ``train_dataloader`` is the coreset loader, with its state in Lightning's checkpoints.

Neither framework is imported by ``import trainer_client`` nor by this package: each module imports its framework
when it is imported itself, and says which extra to install when that fails. ``steps.py`` holds what both share
(one coreset batch per optimizer step, cut into gradient-accumulation micro-batches) and imports neither.
"""

from __future__ import annotations

__all__: list[str] = []
