"""A PyTorch Lightning fit on Fashion-MNIST: the starting point of ``lightning_fit.py``.

python examples/lightning_fit_plain.py --steps 200 [--devices 2]
"""

import argparse
import time

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from trainer_client.data import FashionMNIST
from trainer_client.models import SmallCNN


class Classifier(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = SmallCNN()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--endpoint", default="127.0.0.1:50051")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--devices", type=int, default=1, help="processes, one per device (2 or more: DDP)")
    cli = parser.parse_args()
    pl.seed_everything(0)
    train_set, test_set = FashionMNIST("train"), FashionMNIST("test", limit=2000)
    model = Classifier()
    trainer = pl.Trainer(
        accelerator="gpu" if cli.device == "cuda" else "cpu",
        devices=cli.devices,
        strategy="ddp" if cli.devices > 1 else "auto",
        max_steps=cli.steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
    )
    start = time.perf_counter()
    trainer.fit(model, DataLoader(train_set, batch_size=128, shuffle=True))
    runtime = time.perf_counter() - start
    if trainer.is_global_zero:
        model.eval()
        with torch.no_grad():
            predicted = model(test_set.images.to(model.device)).argmax(1).cpu()
            accuracy = (predicted == test_set.targets).float().mean().item()
        print(f"test accuracy {accuracy:.4f} after {cli.steps} steps, trained in {runtime:.1f} s")


if __name__ == "__main__":
    main()
