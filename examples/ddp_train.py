"""``plain_after.py`` under DistributedDataParallel: run by ``torchrun``, one process per rank, on CPUs (gloo) or
GPUs (NCCL, one per rank).

Every rank runs the same loop with the same loader arguments. Rank 0 alone talks to the service; every rank
embeds its share of each round's candidates and trains on its own share of every coreset batch, so a step's
global batch is about ``--batch-size`` examples and no example reaches two ranks in one round.

crest serve --port 50051 &
OMP_WAIT_POLICY=PASSIVE torchrun --nproc-per-node 2 examples/ddp_train.py --steps 200 --endpoint 127.0.0.1:50051
"""

import argparse
import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from trainer_client import CoresetLoader, LoaderConfig, SelectionClient, weighted_loss
from trainer_client.data import FashionMNIST
from trainer_client.models import SmallCNN


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps (the same on every rank)")
    parser.add_argument("--endpoint", default="127.0.0.1:50051", help="host:port of `crest serve`")
    parser.add_argument("--batch-size", type=int, default=128, help="global batch: the coreset size m")
    parser.add_argument("--train-limit", type=int, default=None, help="use the first N training examples")
    parser.add_argument(
        "--token",
        default=os.environ.get("CREST_AUTH_TOKEN"),
        help="bearer token of the service (default: $CREST_AUTH_TOKEN; none on loopback)",
    )
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")  # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR/PORT
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    torch.manual_seed(0)  # the same initial weights on every rank (DDP broadcasts rank 0's anyway)

    train_set, test_set = FashionMNIST("train", limit=args.train_limit), FashionMNIST("test", limit=2000)
    model = DistributedDataParallel(SmallCNN().to(device), device_ids=[device.index] if cuda else None)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    client = SelectionClient(args.endpoint, token=args.token)  # built on every rank, used by rank 0 only
    loader = CoresetLoader(
        train_set,
        model,  # the loader unwraps DDP for its no-grad passes
        client,
        labels=train_set.targets,
        config=LoaderConfig(batch_size=args.batch_size),
    )
    try:
        for _, (x, y, w) in zip(range(args.steps), loader, strict=False):
            loss = weighted_loss(model(x.to(device)), y.to(device), w.to(device))
            opt.zero_grad()
            loss.backward()  # DDP averages the gradients of the ranks' shares
            opt.step()
    finally:
        loader.close()  # rank 0 closes the session
        client.close()  # every rank: no gRPC thread is left running into the interpreter's shutdown

    stats = loader.stats
    print(
        f"rank {rank}/{world}: {stats.steps} steps, {stats.regions} regions, {stats.checks} checks, "
        f"{stats.reselections} reselections, {stats.examples_backpropagated} examples back-propagated here, "
        f"{stats.fallback_batches} fallback batches, waited {stats.wait_s:.2f} s"
    )
    if rank == 0:  # the coresets arrive at rank 0, which hands every rank its share
        print(
            f"rank 0 received {stats.batches_received} coreset batches in {stats.rounds_started} rounds: "
            f"{stats.partial_rounds} partial rounds, {stats.duplicate_batches} duplicate batches, "
            f"{stats.service_errors} service errors"
        )
    if rank == 0:
        model.eval()
        with torch.no_grad():
            logits = model.module(test_set.images.to(device))
            accuracy = (logits.argmax(1).cpu() == test_set.targets).float().mean().item()
        print(f"test accuracy {accuracy:.4f} after {args.steps} steps on {world} ranks")
    # No rank tears gloo down while rank 0 still evaluates: a rank that destroys the group early can abort at exit.
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # DDP keeps the gloo group and its threads alive past destroy_process_group() (torch 2.13), and a rank can then
    # abort in the process's own teardown ("terminate called without an active exception"): torchrun then fails a
    # job whose work is done. End the rank here, output flushed.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
