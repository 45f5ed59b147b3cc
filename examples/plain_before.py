"""A plain PyTorch training loop on Fashion-MNIST: the starting point of ``plain_after.py``.

python examples/plain_before.py --steps 300
"""

import argparse

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

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
    loader = DataLoader(train_set, batch_size=128, shuffle=True)
    step = 0
    while step < args.steps:
        for x, y in loader:
            loss = F.cross_entropy(model(x.to(args.device)), y.to(args.device))
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            if step == args.steps:
                break
    model.eval()
    with torch.no_grad():
        predicted = model(test_set.images.to(args.device)).argmax(1).cpu()
        accuracy = (predicted == test_set.targets).float().mean().item()
    print(f"test accuracy {accuracy:.4f} after {args.steps} steps")


if __name__ == "__main__":
    main()
