"""The GPU path's mechanisms, on whatever devices this machine has: a half-precision model through every pass of the
loader, labels and weights as tensors in a loop that moves only its inputs and targets, loader state loaded through
a ``map_location``, the quadratic model's fit bounded by the training micro-batch, cuDNN off for an RNN's fit, and
FAISS's GPU k-selection limit as a path choice.

Each test runs on the CPU here; those parametrised by device run on CUDA too where torch sees one
(``benchmarks/gpu_check.py`` runs this file there). tests/test_trainer_ddp.py holds the DDP backend decision.
"""

from __future__ import annotations

import io
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pytest
import torch
from loader_settings import loader_settings
from torch import nn

from selector_service import _faiss
from selector_service.coreset import auto_neighbours
from selector_service.similarity import knn_coverage, knn_on_gpu
from trainer_client._passes import ModelPasses
from trainer_client._state import on_cpu
from trainer_client.batches import Embedder, label_array
from trainer_client.client import SelectionClient
from trainer_client.data import FashionMNIST
from trainer_client.embeddings import weighted_loss
from trainer_client.loader import CoresetLoader
from trainer_client.models import SmallCNN
from trainer_client.region import RegionConfig, RegionController, _flat

torch.set_num_threads(1)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
SMALL = {"batch_size": 32, "subset_fraction": 0.05, "num_subsets": 2, "check_examples": 128, "lookahead_steps": 2}


@pytest.fixture(scope="module")
def fmnist() -> FashionMNIST:
    return FashionMNIST("train", limit=1000)


def _fit_sizes(model: nn.Module) -> list[int]:
    """Records the batch size of every forward pass the quadratic model's fit runs (eval mode, gradients on)."""
    sizes: list[int] = []

    def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
        if not module.training and torch.is_grad_enabled():
            sizes.append(len(args[0]))

    model.register_forward_pre_hook(hook)
    return sizes


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_model_runs_the_embedding_check_and_fit_passes(
    client: SelectionClient, fmnist: FashionMNIST, device: str, dtype: torch.dtype
) -> None:
    """``model.half()`` or ``.to(torch.bfloat16)`` (Lightning's "16-true"/"bf16-true"): the loader's passes feed
    the model its own dtype; the user's loop casts its inputs as it must for such a model."""
    if dtype == torch.float16 and device == "cpu":
        pytest.skip("float16 convolutions are a GPU precision (the CPU runs bfloat16)")
    torch.manual_seed(0)
    model = SmallCNN().to(device, dtype)
    config = loader_settings(**SMALL)  # type: ignore[arg-type]
    assert config.region.mode == "crest"  # embedding, Taylor checks and the quadratic model's fit all run
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with CoresetLoader(fmnist, model, client, fmnist.targets, config=config) as loader:
        for _, (x, y, w) in zip(range(12), loader, strict=False):
            loss = weighted_loss(model(x.to(device, dtype)).float(), y.to(device), w)
            opt.zero_grad()
            loss.backward()
            opt.step()
        stats = loader.stats
    assert stats.fallback_batches == 0 and stats.examples_embedded > 0 and stats.checks >= 1 and stats.fit_s > 0
    assert loader.controller.stats.fits >= 1 and np.isfinite(loader.controller.stats.last_relative_error)


@pytest.mark.parametrize("device", DEVICES)
def test_tensor_labels_and_a_loop_that_moves_only_inputs_and_targets(
    client: SelectionClient, fmnist: FashionMNIST, device: str
) -> None:
    """Labels given as a tensor on the model's device; the loop moves x and y, and leaves w where the loader put
    it (the CPU): ``weighted_loss`` takes it to the logits' device."""
    assert label_array(fmnist.targets.to(device)).dtype == np.int64
    torch.manual_seed(0)
    model = SmallCNN().to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    config = loader_settings(**SMALL, steps_per_round=4)  # type: ignore[arg-type]
    with CoresetLoader(fmnist, model, client, fmnist.targets.to(device), config=config) as loader:
        for _, (x, y, w) in zip(range(6), loader, strict=False):
            assert w.device.type == "cpu"
            loss = weighted_loss(model(x.to(device)), y.to(device), w)
            opt.zero_grad()
            loss.backward()
            opt.step()
        assert loader.stats.fallback_batches == 0 and loader.stats.regions >= 1
    np.testing.assert_array_equal(loader.labels, fmnist.targets.numpy())


@pytest.mark.parametrize("device", DEVICES)
def test_loader_state_loads_through_a_map_location_to_the_models_device(
    client: SelectionClient, fmnist: FashionMNIST, device: str
) -> None:
    """The loader's state saved in the model's checkpoint and loaded with ``map_location=device`` (tensors on the
    GPU there): it resumes with the batches of the saved run."""
    config = loader_settings(**SMALL)  # type: ignore[arg-type]
    torch.manual_seed(0)
    model = SmallCNN().to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)

    def steps(loader: CoresetLoader, n: int) -> list[list[int]]:
        out = []
        for _, (x, y, w) in zip(range(n), loader, strict=False):
            loss = weighted_loss(model(x.to(device)), y.to(device), w)
            opt.zero_grad()
            loss.backward()
            opt.step()
            out.append(loader.last_ids.tolist())
        return out

    with CoresetLoader(fmnist, model, client, fmnist.targets, config=config) as loader:
        steps(loader, 8)
        buffer = io.BytesIO()
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "loader": loader.state_dict()}, buffer)
        loader.close(end_session=False)
    buffer.seek(0)
    saved = torch.load(buffer, map_location=device, weights_only=True)
    assert saved["loader"]["controller"]["generator"].device.type == device
    expected = None
    for run in range(2):  # the same state, loaded twice: the same next batches
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
        with CoresetLoader(fmnist, model, client, fmnist.targets, config=config) as resumed:
            resumed.load_state_dict(saved["loader"])
            got = steps(resumed, 6)
            assert resumed.stats.steps == 14 and resumed.stats.fallback_batches == 0
            resumed.close(end_session=run == 1)
        assert expected is None or got == expected
        expected = got


def test_on_cpu_moves_every_tensor_of_a_nested_state() -> None:
    state = {"a": torch.ones(2), "b": [torch.zeros(1), (torch.arange(3), 4)], "c": None, "d": "x"}
    moved = on_cpu(state)
    assert moved["b"][1][1] == 4 and moved["c"] is None and moved["d"] == "x" and isinstance(moved["b"][1], tuple)
    assert all(t.device.type == "cpu" for t in (moved["a"], moved["b"][0], moved["b"][1][0]))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_a_model_spread_over_two_gpus_flattens_on_the_first() -> None:
    parts = [torch.ones(3, device="cuda:0"), torch.zeros(2, 2, device="cuda:1")]
    flat = _flat(parts)
    assert flat.device == torch.device("cuda:0") and flat.shape == (7,)


class _Recurrent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.GRU(28, 16, batch_first=True)
        self.head = nn.Linear(16, 10)
        self.cudnn_in_fit: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training and torch.is_grad_enabled():
            self.cudnn_in_fit.append(torch.backends.cudnn.enabled)
        out, _ = self.rnn(x.reshape(len(x), 28, 28))
        return self.head(out[:, -1])


@pytest.mark.parametrize("device", DEVICES)
def test_an_rnns_fit_runs_without_cudnn(fmnist: FashionMNIST, device: str) -> None:
    """cuDNN's RNN refuses a backward pass in eval mode, which the quadratic model's fit takes: the fit of a model
    holding an RNN turns cuDNN off, and only the fit does."""
    torch.manual_seed(0)
    model = _Recurrent().to(device)
    ids = np.arange(48)

    def fetch(chunks: Sequence[np.ndarray]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return ((fmnist.images[c], fmnist.targets[c]) for c in chunks)

    def forward_fn(m: nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return m(batch[0].to(device)), batch[1].to(device)

    passes = ModelPasses(model, fetch, forward_fn, Embedder("logit_gradient"), 10, 64, None)
    controller = RegionController(RegionConfig(), max_coresets=2)
    before = torch.backends.cudnn.enabled
    passes.fit(controller, ids, np.ones(len(ids), np.float32), 16, step=0)
    assert model.cudnn_in_fit == [False] * 3 and torch.backends.cudnn.enabled == before
    assert controller.stats.fits == 1 and model.training


def test_the_fit_runs_in_micro_batches_of_this_ranks_share(client: SelectionClient, fmnist: FashionMNIST) -> None:
    """``fit_batch_size`` bounds the fit's forward and double backward (the HF and Lightning integrations set it to
    their micro-batch; under DDP it defaults to batch_size / world size, held by tests/test_trainer_ddp.py)."""
    torch.manual_seed(0)
    model = SmallCNN()
    sizes = _fit_sizes(model)
    config = loader_settings(**SMALL, fit_batch_size=8)  # type: ignore[arg-type]
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with CoresetLoader(fmnist, model, client, fmnist.targets, config=config) as loader:
        for _, (x, y, w) in zip(range(4), loader, strict=False):
            loss = weighted_loss(model(x), y, w)
            opt.zero_grad()
            loss.backward()
            opt.step()
        assert loader.controller.stats.fits >= 1
    assert sizes and max(sizes) == 8


@pytest.mark.parametrize(
    ("neighbours", "gpus", "on_gpu"), [(200, 1, True), (2047, 1, True), (2048, 1, False), (200, 0, False)]
)
def test_faiss_searches_on_a_gpu_only_within_its_k_selection_limit(neighbours: int, gpus: int, on_gpu: bool) -> None:
    assert knn_on_gpu(neighbours, gpus) is on_gpu


def test_crests_per_class_knn_takes_the_cpu_path_on_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """At CREST's per-class budget the automatic K exceeds FAISS's GPU limit (the kNN path starts above 16,384
    points): with a GPU injected, the search still runs, on the CPU."""
    assert auto_neighbours(20_000, 16) > _faiss.GPU_MAX_K
    monkeypatch.setattr("selector_service.similarity.num_gpus", lambda: 1)
    x = np.random.default_rng(0).normal(size=(2_200, 4)).astype(np.float32)
    coverage = knn_coverage(x, 2_100)  # faiss-cpu here: a GPU path would fail to build its resources
    assert coverage.neighbours.shape == (2_200, 2_100) and (coverage.neighbours[:, 0] == np.arange(2_200)).all()


def test_a_selector_that_reserved_no_gpu_uses_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_faiss, "_allowed", None)
    _faiss.use_gpus([])
    assert _faiss.num_gpus() == 0
