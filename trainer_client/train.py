"""A complete CREST training run over the service: Fashion-MNIST, a small CNN, SGD with momentum.

Used by ``crest train`` (against a running service) and ``crest demo`` (which starts one first).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from crest.selector.v1.api import SelectionService
from trainer_client.data import FashionMNIST
from trainer_client.embeddings import weighted_loss
from trainer_client.loader import CoresetLoader, LoaderConfig
from trainer_client.models import SmallCNN

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """One training run."""

    # Optimizer steps (each back-propagates one coreset batch of about batch_size examples).
    steps: int = 1000
    # Peak learning rate of SGD; cosine-annealed to 0 over the run.
    lr: float = 0.05
    # SGD momentum (the paper's setting; the released code omits it).
    momentum: float = 0.9
    weight_decay: float = 5e-4
    # Selection and scheduling settings of the loader.
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    # Seeds model initialisation (the loader config seeds selection).
    seed: int = 0
    # Directory holding the four Fashion-MNIST files; None searches the default places.
    data_dir: str | None = None
    # Use only the first N training / test examples (small runs in tests); None uses all.
    train_limit: int | None = None
    test_limit: int | None = None
    # torch intra-op threads for training; keep below the core count so the selectors get CPU too.
    threads: int = 1
    # Log progress every this many steps (0: never).
    log_every: int = 100
    # Where the model trains: "auto" (cuda when available, else the CPU), "cpu", "cuda" or "cuda:N".
    device: str = "auto"
    # DataLoader worker processes that read and collate the batches (pinned on a GPU); 0 reads them on the
    # training thread. Fashion-MNIST needs no per-example work, so 0 is fastest here.
    dataloader_workers: int = 0
    # Training examples held out as the payoff's probe set when the loader measures it (LoaderConfig.payoff); they
    # are not trained on. 500 forward passes per probe, 4 probes per measurement: about 1% of the run's time.
    probe_examples: int = 500


@dataclass(frozen=True)
class TrainResult:
    """What a run achieved and what it cost."""

    test_accuracy: float  # fraction in [0, 1]
    wall_s: float  # whole run: embedding, selection waits and training, excluding data loading
    steps: int
    examples_backpropagated: int
    examples_embedded: int  # forward-only passes for selection
    wait_s: float  # training loop blocked on the service
    embed_s: float
    rounds: int
    late_steps: int
    final_loss: float
    checks: int = 0  # Taylor checks run
    reselections: int = 0  # regions ended by a failed check (or the fixed rule)
    fallback_batches: int = 0  # uniform batches yielded because no coreset was ready or the service was down
    service_errors: int = 0
    check_s: float = 0.0  # forward passes on the random subsets for the checks
    fit_s: float = 0.0  # quadratic-model fits (Hutchinson)
    persistent_failures: int = 0  # failures on the service's side (INTERNAL, ...), each logged as an error
    partial_rounds: int = 0  # regions started with fewer coresets than asked for
    payoff: str = ""  # whether selection paid (LoaderConfig.payoff): Payoff.describe(), or why it is not known
    control_steps: int = 0  # steps trained on the payoff's control arm
    probe_s: float = 0.0  # time spent on the payoff's probe set


def pick_device(name: str = "auto") -> torch.device:
    """The device ``name`` names; "auto" is cuda when torch sees a GPU, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but torch {torch.__version__} sees no CUDA device")
    return device


@torch.no_grad()
def evaluate(model: torch.nn.Module, images: torch.Tensor, targets: torch.Tensor, batch_size: int = 2000) -> float:
    """Top-1 accuracy of ``model`` on (images, targets), in batches moved to the model's device."""
    was_training = model.training
    model.eval()
    param = next(model.parameters(), None)
    device = torch.device("cpu") if param is None else param.device
    correct = 0
    for lo in range(0, len(targets), batch_size):
        logits = model(images[lo : lo + batch_size].to(device))
        correct += int((logits.argmax(1).cpu() == targets[lo : lo + batch_size]).sum())
    model.train(was_training)
    return correct / len(targets)


def train(config: TrainConfig, client: SelectionService) -> TrainResult:
    """Train a SmallCNN on Fashion-MNIST with coresets from the service behind ``client`` (gRPC or in process)."""
    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    train_set = FashionMNIST("train", config.data_dir, limit=config.train_limit)
    probe = None
    if config.loader.payoff != "off":
        train_set, probe = train_set.held_out(config.probe_examples, config.seed)
    test_set = FashionMNIST("test", config.data_dir, limit=config.test_limit)
    device = pick_device(config.device)
    model = SmallCNN(num_classes=len(FashionMNIST.classes)).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=config.steps)
    start = time.perf_counter()
    loss_value = float("nan")
    labels, workers = train_set.targets.numpy(), config.dataloader_workers
    with CoresetLoader(
        train_set,
        model,
        client,
        labels,
        config=config.loader,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        probe=probe,
    ) as loader:
        for step, (x, y, w) in zip(range(config.steps), loader, strict=False):
            logits = model(x.to(device, non_blocking=True))
            if config.loader.training_logits:
                loader.observe_logits(logits)
            loss = weighted_loss(logits, y, w)  # moves y and w to the logits' device
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
            loss_value = loss.item()
            if config.log_every and (step + 1) % config.log_every == 0:
                log.info(
                    "step %d/%d loss %.3f (%.1f s, %d rounds)",
                    step + 1,
                    config.steps,
                    loss_value,
                    time.perf_counter() - start,
                    loader.stats.rounds_started,
                )
        stats = loader.stats
        payoff = loader.payoff_summary()
    wall = time.perf_counter() - start
    accuracy = evaluate(model, test_set.images, test_set.targets)
    return TrainResult(
        accuracy,
        wall,
        stats.steps,
        stats.examples_backpropagated,
        stats.examples_embedded,
        stats.wait_s,
        stats.embed_s,
        stats.rounds_started,
        stats.late_steps,
        loss_value,
        stats.checks,
        stats.reselections,
        stats.fallback_batches,
        stats.service_errors,
        stats.check_s,
        stats.fit_s,
        stats.persistent_failures,
        stats.partial_rounds,
        payoff,
        stats.control_steps,
        stats.probe_s,
    )
