"""``hf_trainer_plain.py`` trained on CREST coresets from a running service (``crest serve``) through
``CoresetTrainer``: the model and the dataset stay as they are; three lines differ.

crest serve --port 50051 &
python examples/hf_trainer.py --steps 200 --endpoint 127.0.0.1:50051
"""

import argparse

import torch
from torch.utils.data import Dataset
from transformers import ResNetConfig, ResNetForImageClassification, TrainingArguments

from trainer_client.data import FashionMNIST
from trainer_client.integrations.hf import CoresetTrainer


class Pixels(Dataset):
    """Fashion-MNIST as Hugging Face examples: ``{"pixel_values": float32 (1, 28, 28), "labels": int64}``."""

    def __init__(self, split: str) -> None:
        self.data = FashionMNIST(split)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        x, y = self.data[i]
        return {"pixel_values": x, "labels": y}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--endpoint", default="127.0.0.1:50051")
    parser.add_argument("--out", default="results/hf_trainer")
    cli = parser.parse_args()
    torch.manual_seed(0)
    train_set, test_set = Pixels("train"), FashionMNIST("test", limit=2000)
    config = ResNetConfig(num_channels=1, embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], num_labels=10)
    model = ResNetForImageClassification(config)
    args = TrainingArguments(
        output_dir=cli.out,
        max_steps=cli.steps,
        per_device_train_batch_size=128,
        learning_rate=1e-2,
        save_strategy="no",
        report_to=[],
        use_cpu=cli.device == "cpu",
        dataloader_pin_memory=False,
        disable_tqdm=True,
    )
    trainer = CoresetTrainer(model=model, args=args, train_dataset=train_set, endpoint=cli.endpoint)
    runtime = trainer.train().metrics["train_runtime"]
    model.eval()
    with torch.no_grad():
        logits = model(pixel_values=test_set.images.to(model.device)).logits.cpu()
    accuracy = (logits.argmax(1) == test_set.targets).float().mean().item()
    print(f"test accuracy {accuracy:.4f} after {cli.steps} steps, trained in {runtime:.1f} s")


if __name__ == "__main__":
    main()
