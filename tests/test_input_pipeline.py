"""The loader's input pipeline: batches fetched by DataLoader worker processes, ahead of need, against a real gRPC
server and real torch training on Fashion-MNIST. The ids and weights of every step are those of a run without
workers; the examples are read in the workers; close() leaves no worker; a worker's error reaches the loop."""

from __future__ import annotations

import multiprocessing
import os
import signal
from typing import Any

import numpy as np
import pytest
import torch
from loader_settings import loader_settings
from torch.utils.data import DataLoader, Dataset

from trainer_client import LoaderConfig
from trainer_client._fetch import InputPipeline, Workers
from trainer_client.client import SelectionClient
from trainer_client.data import FashionMNIST
from trainer_client.embeddings import weighted_loss
from trainer_client.loader import CoresetLoader
from trainer_client.models import SmallCNN

torch.set_num_threads(1)
SMALL = {"batch_size": 32, "subset_fraction": 0.05, "num_subsets": 2, "check_examples": 128}


class Tagged(Dataset):
    """Fashion-MNIST examples as (image, label, id, pid of the process that read it); ``poison`` makes one id fail
    (raise, or kill the worker reading it)."""

    def __init__(self, data: FashionMNIST, poison: int = -1, how: str = "raise") -> None:
        self.data, self.poison, self.how = data, poison, how

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> tuple[Any, ...]:
        if i == self.poison:
            if self.how == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise ValueError(f"example {i} is corrupt")
        x, y = self.data[i]
        return x, y, i, os.getpid()


@pytest.fixture(scope="module")
def fmnist() -> FashionMNIST:
    return FashionMNIST("train", limit=1000)


def _run(
    client: SelectionClient | None, data: Dataset, labels: np.ndarray, config: LoaderConfig, steps: int, **workers: Any
) -> tuple[list[tuple[list[int], list[float]]], CoresetLoader, set[int]]:
    """Train ``steps`` steps; every step's (ids, weights), the closed loader, and the pids that read its batches."""
    torch.manual_seed(0)
    model = SmallCNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    seen, readers = [], set()
    with CoresetLoader(data, model, client, labels, config=config, **workers) as loader:
        for _, (x, y, ids, pids, w) in zip(range(steps), loader, strict=False):
            assert ids.tolist() == loader.last_ids.tolist()  # the batch holds the examples the schedule drew
            loss = weighted_loss(model(x), y, w)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            seen.append((ids.tolist(), w.tolist()))
            readers |= set(pids.tolist())
    return seen, loader, readers


@pytest.mark.parametrize(
    ("config", "misses_per_region"),
    [
        (loader_settings(**SMALL, steps_per_round=6), 2),  # type: ignore[arg-type]
        # A failed check ends the region 2 steps later, inside the workers' 4 batches ahead: mispredicted.
        (loader_settings(**SMALL, lookahead_steps=2), 4),  # type: ignore[arg-type]
        (LoaderConfig(**SMALL), 2),  # type: ignore[arg-type]
    ],
    ids=["fixed-regions", "crest-taylor-check", "recommended"],
)
def test_workers_give_every_step_the_ids_and_weights_of_a_run_without_them(
    client: SelectionClient, fmnist: FashionMNIST, config: LoaderConfig, misses_per_region: int
) -> None:
    data, labels = Tagged(fmnist), fmnist.targets.numpy()
    base, plain, main_readers = _run(client, data, labels, config, 64, pin_memory=True)  # ignored without a GPU
    ahead, loader, readers = _run(client, data, labels, config, 64, num_workers=2, pin_memory=True)
    assert plain.stats.regions >= 3 and plain.stats.fallback_batches == 0
    assert ahead == base  # every step: the same ids and the same weights
    assert loader.stats.regions == plain.stats.regions and loader.stats.fallback_batches == 0
    assert main_readers == {os.getpid()}
    assert os.getpid() not in readers and len(readers) == 2  # every training batch was read in a worker
    # Fetched ahead except where a step was not known in time (the first, a switch to a round still in flight).
    assert loader.stats.input_misses <= misses_per_region * loader.stats.regions, loader.stats
    assert not multiprocessing.active_children()  # close() shut the workers down


def test_the_next_rounds_candidates_are_given_to_the_workers_before_its_pass(
    client: SelectionClient, fmnist: FashionMNIST
) -> None:
    """The fixed rule's pass runs at a known step: once its round's plan is back (awaited here at every step, so
    the forecast finds it), its chunks are fetched right after the step before it, and match the pass's."""
    data, labels, config = Tagged(fmnist), fmnist.targets.numpy(), LoaderConfig(**SMALL)  # type: ignore[arg-type]
    torch.manual_seed(0)
    model = SmallCNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)  # as _run trains
    seen = []
    with CoresetLoader(data, model, client, labels, config=config, num_workers=2) as loader:
        for _, (x, y, ids, _, w) in zip(range(64), loader, strict=False):
            loss = weighted_loss(model(x), y, w)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            seen.append(ids.tolist())
            loader._link.settle()  # internal: the round started ahead has its plan back before the next step
    base, _, _ = _run(client, data, labels, config, 64)
    assert seen == [ids for ids, _ in base]
    assert loader.stats.regions == 4 and loader.stats.rounds_prefetched == 3, loader.stats
    assert loader.stats.passes_ahead == 3  # every pass but the first round's, at step 0
    assert loader.stats.input_misses <= 2 * loader.stats.regions


def test_a_forecast_pass_that_does_not_run_as_forecast_costs_a_fetch_never_a_wrong_batch() -> None:
    """The pipeline alone, on a dataset of ids: a pass forecast with other chunks than the pass asks for, and one
    that never runs, are dropped; every batch holds the ids asked for."""
    forecast_at = {3: [np.arange(100, 110), np.arange(110, 115)], 6: [np.arange(200, 204)], 12: [np.arange(300, 306)]}
    pipe = InputPipeline(Ids(), torch.utils.data.default_collate, Workers(num_workers=2), _steps, forecast_at.get)
    try:
        for step in range(12):
            if step == 3:  # the pass forecast before step 3 asks for other chunks
                got = list(pipe.batches([np.arange(100, 108), np.arange(108, 115)]))
                assert [b.tolist() for b in got] == [list(range(100, 108)), list(range(108, 115))]
            if step == 8:  # a pass with no forecast, after the one forecast before step 6 that never ran
                assert [b.tolist() for b in pipe.batches([np.arange(200, 204)])] == [list(range(200, 204))]
            assert pipe.step_batch(step, _steps(step)).tolist() == _steps(step).tolist()
        assert pipe.counters.passes_ahead == 0 and pipe.counters.input_misses == 1  # the first step
        # The pass forecast before step 12 runs as forecast: its chunks were given to the workers ahead.
        assert [b.tolist() for b in pipe.batches([np.arange(300, 306)])] == [list(range(300, 306))]
        assert pipe.counters.passes_ahead == 1
        assert pipe.step_batch(12, _steps(12)).tolist() == _steps(12).tolist()
    finally:
        pipe.close()
    assert not multiprocessing.active_children()


class Ids(Dataset):
    def __len__(self) -> int:
        return 1000

    def __getitem__(self, i: int) -> int:
        return i


def _steps(step: int) -> np.ndarray:
    return np.arange(step * 4, step * 4 + 4, dtype=np.int64)


def test_uniform_mode_trains_on_forecast_batches_with_no_service(fmnist: FashionMNIST) -> None:
    config = LoaderConfig(selection="uniform", batch_size=32)
    data, labels = Tagged(fmnist), fmnist.targets.numpy()
    base, _, _ = _run(None, data, labels, config, 20)
    ahead, loader, readers = _run(None, data, labels, config, 20, num_workers=2)
    assert ahead == base and all(w == [1.0] * 32 for _, w in base)
    assert loader.stats.input_misses == 1  # the first step only: every later one was known ahead
    assert loader.stats.fallback_batches == 0 and loader.session is None
    assert os.getpid() not in readers


def test_the_model_passes_read_their_examples_in_the_workers(client: SelectionClient, fmnist: FashionMNIST) -> None:
    """The embedding pass, the check and the fit fetch through the pipeline: the main process reads no example."""
    main = os.getpid()

    class MainReads(Tagged):
        reads = 0

        def __getitem__(self, i: int) -> tuple[Any, ...]:
            if os.getpid() == main:
                MainReads.reads += 1
            return super().__getitem__(i)

    config = loader_settings(**SMALL, lookahead_steps=2)  # type: ignore[arg-type]
    _, loader, _ = _run(client, MainReads(fmnist), fmnist.targets.numpy(), config, 16, num_workers=2)
    assert loader.stats.examples_embedded > 0 and loader.stats.checks > 0 and loader.controller.stats.fits > 0
    assert MainReads.reads == 0


def test_from_dataloader_takes_the_dataloaders_dataset_collate_and_workers(
    client: SelectionClient, fmnist: FashionMNIST
) -> None:
    def collate(samples: list[Any]) -> tuple[Any, ...]:
        x, y, ids, pids = torch.utils.data.default_collate(samples)
        return x, y, ids, pids

    user = DataLoader(Tagged(fmnist), batch_size=64, num_workers=1, pin_memory=True, collate_fn=collate)
    model = SmallCNN()
    config = loader_settings(**SMALL, steps_per_round=4)  # type: ignore[arg-type]
    with CoresetLoader.from_dataloader(user, model, client, fmnist.targets.numpy(), config=config) as loader:
        assert loader.collate_fn is collate and loader._input.workers.num_workers == 1  # internal: its settings
        x, _, ids, pids, _ = next(iter(loader))
        assert len(ids) == 32 and os.getpid() not in pids.tolist() and x.is_pinned() == torch.cuda.is_available()


@pytest.mark.parametrize("how", ["raise", "kill"])
def test_a_workers_failure_is_raised_in_the_training_loop(fmnist: FashionMNIST, how: str) -> None:
    config = LoaderConfig(selection="uniform", batch_size=32)
    poison = 7
    model = SmallCNN()
    loader = CoresetLoader(
        Tagged(fmnist, poison, how), model, None, fmnist.targets.numpy(), config=config, num_workers=2
    )
    expected = (
        (ValueError, "example 7 is corrupt")
        if how == "raise"
        else (RuntimeError, "DataLoader worker .*(killed by signal|exited unexpectedly)")
    )
    with pytest.raises(expected[0], match=expected[1]), loader:
        for _ in zip(range(400), loader, strict=False):
            pass
    assert not multiprocessing.active_children()


def test_bad_worker_settings_are_refused(fmnist: FashionMNIST) -> None:
    labels, uniform = fmnist.targets.numpy(), LoaderConfig(selection="uniform")
    with pytest.raises(ValueError, match="num_workers must be >= 0, received -1"):
        CoresetLoader(fmnist, SmallCNN(), None, labels, config=uniform, num_workers=-1)
    with pytest.raises(ValueError, match=r"prefetch_factor must be None without workers .* received 2"):
        CoresetLoader(fmnist, SmallCNN(), None, labels, config=uniform, prefetch_factor=2)
    with pytest.raises(ValueError, match="needs a client unless"):
        CoresetLoader(fmnist, SmallCNN(), None, labels)
    with pytest.raises(ValueError, match="selection must be one of crest, uniform, received 'random'"):
        LoaderConfig(selection="random")  # type: ignore[arg-type]
