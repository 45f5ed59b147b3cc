"""``plain_before.py`` trained on CREST coresets from a running service (``crest serve``): five lines differ.

crest serve --port 50051 &
python examples/plain_after.py --steps 300 --endpoint 127.0.0.1:50051
"""

import argparse

import torch

from trainer_client import CoresetLoader, SelectionClient, weighted_loss
from trainer_client.data import FashionMNIST
from trainer_client.models import SmallCNN


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--endpoint", default="127.0.0.1:50051")
    args = parser.parse_args()
    torch.manual_seed(0)
    train_set, test_set = FashionMNIST("train"), FashionMNIST("test", limit=2000)
    model = SmallCNN().to(args.device)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loader = CoresetLoader(train_set, model, SelectionClient(args.endpoint), labels=train_set.targets)
    step = 0
    while step < args.steps:
        for x, y, w in loader:
            loss = weighted_loss(model(x.to(args.device)), y.to(args.device), w)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            if step == args.steps:
                break
    loader.close()
    model.eval()
    with torch.no_grad():
        predicted = model(test_set.images.to(args.device)).argmax(1).cpu()
        accuracy = (predicted == test_set.targets).float().mean().item()
    print(f"test accuracy {accuracy:.4f} after {args.steps} steps")


if __name__ == "__main__":
    main()
