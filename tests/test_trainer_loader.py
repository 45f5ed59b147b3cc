"""The loader against a real gRPC server on loopback: CREST region control, never-block fallback when the
service is down or dies, dict batches with a forward_fn, and state checks. Real torch training, small data."""

from __future__ import annotations

import logging
import socket
from typing import Any

import numpy as np
import pytest
import torch
from loader_settings import loader_settings
from torch import nn

from selector_service.backends import LocalBackend
from selector_service.server import RunningServer, ServerConfig, start_server
from trainer_client.client import SelectionClient
from trainer_client.data import FashionMNIST
from trainer_client.embeddings import weighted_loss
from trainer_client.loader import CoresetLoader, LoaderConfig, SelectionUnavailable
from trainer_client.models import SmallCNN
from trainer_client.region import RegionConfig

torch.set_num_threads(1)
SMALL = {"batch_size": 32, "subset_fraction": 0.05, "num_subsets": 2, "check_examples": 128}


@pytest.fixture(scope="module")
def fmnist() -> FashionMNIST:
    return FashionMNIST("train", limit=1000)


def _train(loader: CoresetLoader, model: nn.Module, steps: int, on_step: object = None) -> list[float]:
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for step, (x, y, w) in zip(range(steps), loader, strict=False):
        assert (w > 0).all() and w.dtype == torch.float32 and len(w) == len(y)
        loss = weighted_loss(model(x), y, w)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if callable(on_step):
            on_step(step)
    return losses


def test_crest_regions_check_and_reselect_against_a_real_server(
    client: SelectionClient, fmnist: FashionMNIST, caplog: pytest.LogCaptureFixture
) -> None:
    torch.manual_seed(0)
    model = SmallCNN()
    config = loader_settings(**SMALL, lookahead_steps=2)  # type: ignore[arg-type]
    caplog.set_level(logging.INFO, logger="trainer_client")
    with CoresetLoader(fmnist, model, client, fmnist.targets.numpy(), config=config) as loader:
        _train(loader, model, 30)
        stats, ctl = loader.stats, loader.controller.stats
        region = loader._state.region  # the region being trained (internal state)
        region_ids = region.ids if region else np.zeros(0)
    assert stats.steps == 30 and stats.fallback_batches == 0 and stats.service_errors == 0
    assert stats.checks >= 5 and stats.reselections >= 1  # early training: the loss moves fast
    assert stats.regions == ctl.fits >= 2 and ctl.checks == stats.checks
    assert stats.rounds_started in (stats.regions, stats.regions + 1)
    assert set(loader.last_ids.tolist()) <= set(region_ids.tolist())
    logged = caplog.text
    assert "check" in logged and "predicted" in logged and "quadratic model" in logged
    assert logged.count("-> reselect") == stats.reselections


def _sampled_fits(client: SelectionClient, fmnist: FashionMNIST, fit_examples: int) -> tuple[Any, ...]:
    """Train 12 adaptive-rule steps; (stats, fits, pool size and fitted ids of every fit), the real fit observed."""
    torch.manual_seed(0)
    model = SmallCNN()
    config = loader_settings(**SMALL, lookahead_steps=2, fit_examples=fit_examples)  # type: ignore[arg-type]
    pool_sizes: list[int] = []
    seen: list[list[int]] = []
    with CoresetLoader(fmnist, model, client, fmnist.targets.numpy(), config=config) as loader:
        real_fit = loader._passes.fit  # internal: the pass, observed and then run

        def observed(controller: Any, ids: np.ndarray, weights: np.ndarray, *args: Any) -> None:
            region = loader._state.region
            assert region is not None
            pool_sizes.append(len(region.ids))
            assert set(ids.tolist()) <= set(region.ids.tolist())
            seen.append(ids.tolist())
            real_fit(controller, ids, weights, *args)

        loader._passes.fit = observed  # type: ignore[method-assign]
        _train(loader, model, 12)
        return loader.stats, loader.controller.stats.fits, pool_sizes, seen


def test_the_quadratic_model_fits_on_a_seeded_sample_of_the_pool(client: SelectionClient, fmnist: FashionMNIST) -> None:
    """fit_examples: each fit sees that many of the region's pool (a sample, with their weights), the same sample
    for the same seed and round; the adaptive rule runs on as before."""
    runs = [_sampled_fits(client, fmnist, 24) for _ in range(2)]
    for stats, fits, pool_sizes, seen in runs:
        assert stats.fallback_batches == 0 and stats.regions == fits >= 2 and stats.fit_s > 0
        assert all(size > 24 for size in pool_sizes) and all(len(ids) == 24 for ids in seen)
    assert runs[0][3] == runs[1][3]  # seeded by (seed, round): the same sample in every run
    with pytest.raises(ValueError, match="fit_examples and check_examples must be >= 0 \\(0: all\\), received -1"):
        LoaderConfig(fit_examples=-1)


def test_difficulty_of_every_region_and_exclusion_reach_the_service(
    client: SelectionClient, fmnist: FashionMNIST
) -> None:
    torch.manual_seed(0)
    model = SmallCNN()
    config = loader_settings(**SMALL, steps_per_round=6, lookahead_steps=1, drop_learned=True)  # type: ignore[arg-type]
    with CoresetLoader(fmnist, model, client, fmnist.targets.numpy(), config=config) as loader:
        _train(loader, model, 20)
        assert loader.session is not None
        state = client.session_state(loader.session.session_id)
        regions, records = loader.stats.regions, loader.difficulty
    assert state.config.drop_learned
    assert regions >= 3 and len(records) == regions
    assert [d.round for d in records] == list(range(regions))
    for d in records:
        assert d.step <= d.start_step and 0 < d.selected < d.embedded  # coresets pick from the round's ids
        assert 0.0 <= d.selected_percentile <= 1.0
        assert d.embedded_loss > 0 and d.selected_loss > 0 and d.selected_loss_weighted > 0
    assert records[-1].embedded_loss < records[0].embedded_loss  # trained in between: the round's loss falls


def test_the_exclusion_rule_and_joint_selection_reach_the_service(
    client: SelectionClient, fmnist: FashionMNIST
) -> None:
    """drop_threshold / drop_window / min_pool_fraction set the session's rule: with a loose threshold and a window
    of one, the first rounds' candidates leave the pool down to its floor, and none of them is drawn again; the
    session selects jointly when the loader asks it to."""
    torch.manual_seed(0)
    model = SmallCNN()
    config = loader_settings(
        **SMALL,  # type: ignore[arg-type]
        steps_per_round=4,
        lookahead_steps=1,
        drop_learned=True,
        drop_threshold=5.0,
        drop_window=1,
        min_pool_fraction=0.5,
        joint_selection=True,
    )
    with CoresetLoader(fmnist, model, client, fmnist.targets.numpy(), config=config) as loader:
        _train(loader, model, 10)
        assert loader.session is not None
        state = client.session_state(loader.session.session_id)
    rule = state.config
    assert (rule.drop_threshold, rule.drop_window, rule.min_pool_fraction) == (5.0, 1, 0.5)
    assert rule.joint_selection
    assert 0 < state.excluded_size <= 500
    with pytest.raises(ValueError, match=r"min_pool_fraction in \[0, 1\] .*received 0.1, 5, 1.5"):
        LoaderConfig(min_pool_fraction=1.5)


def test_uniform_coreset_weights_train_the_same_ids_with_weight_one(
    client: SelectionClient, fmnist: FashionMNIST
) -> None:
    """Same seed, same service: the uniform loader yields the cluster loader's ids, every weight 1."""
    seen: dict[str, list[tuple[list[int], torch.Tensor]]] = {}
    for weighting in ("cluster", "uniform"):
        torch.manual_seed(0)
        model = SmallCNN()
        config = loader_settings(**SMALL, steps_per_round=5, lookahead_steps=0, coreset_weights=weighting)  # type: ignore[arg-type]
        with CoresetLoader(fmnist, model, client, fmnist.targets.numpy(), config=config) as loader:
            batches = []
            for _, (_x, _y, w) in zip(range(12), loader, strict=False):
                batches.append((loader.last_ids.tolist(), w.clone()))
            assert loader.stats.fallback_batches == 0
        seen[weighting] = batches
    assert [ids for ids, _ in seen["uniform"]] == [ids for ids, _ in seen["cluster"]]
    assert all(torch.equal(w, torch.ones_like(w)) for _, w in seen["uniform"])
    assert any(not torch.equal(w, torch.ones_like(w)) for _, w in seen["cluster"])  # cluster sizes differ
    with pytest.raises(ValueError, match="coreset_weights must be one of cluster, uniform, received 'equal'"):
        LoaderConfig(coreset_weights="equal")


def test_a_bfloat16_embedding_pass_sends_float32_embeddings_close_to_the_float32_pass(
    client: SelectionClient, fmnist: FashionMNIST
) -> None:
    """embed_dtype="bfloat16": the round's candidates are embedded under autocast; the embeddings and losses the
    service receives are float32 and within bfloat16's error of the float32 pass's; training runs on coresets."""
    torch.manual_seed(0)
    model = SmallCNN()
    passes = {}
    for dtype in ("float32", "bfloat16"):
        config = loader_settings(**SMALL, steps_per_round=4, lookahead_steps=0, embed_dtype=dtype)  # type: ignore[arg-type]
        loader = CoresetLoader(fmnist, model, client, fmnist.targets.numpy(), config=config)
        passes[dtype] = loader._passes.embed_round(np.arange(200, dtype=np.int64))
        loader.close()
    full, half = passes["float32"], passes["bfloat16"]
    assert half.embeddings.dtype == np.float32 and half.losses.dtype == np.float32
    np.testing.assert_array_equal(half.labels, full.labels)
    assert np.abs(half.embeddings - full.embeddings).max() < 0.05  # softmax(z) - onehot(y), entries in [-1, 1]
    np.testing.assert_allclose(half.losses, full.losses, rtol=0.05, atol=0.02)
    assert not np.array_equal(half.embeddings, full.embeddings)  # the pass did run in bfloat16

    config = loader_settings(**SMALL, steps_per_round=4, lookahead_steps=0, embed_dtype="bfloat16")  # type: ignore[arg-type]
    with CoresetLoader(fmnist, model, client, fmnist.targets.numpy(), config=config) as loader:
        losses = _train(loader, model, 12)
        assert loader.stats.fallback_batches == 0 and loader.stats.regions >= 3
        assert loader.stats.rounds_started >= 3 and loader.stats.examples_embedded >= 3 * 2 * 40  # 2 subsets of ~50
    assert all(np.isfinite(losses))
    with pytest.raises(
        ValueError, match="embed_dtype must be one of auto, float32, bfloat16, float16, received 'int8'"
    ):
        LoaderConfig(embed_dtype="int8")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="embed_batch_size must be >= 1, received 0"):
        LoaderConfig(embed_batch_size=0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _server(port: int = 0) -> RunningServer:
    return start_server(ServerConfig(port=port, backend="local"), backend=LocalBackend(num_workers=2))


def test_killing_the_server_mid_training_falls_back_then_reconnects(fmnist: FashionMNIST) -> None:
    server = _server()
    port = server.port
    torch.manual_seed(0)
    model = SmallCNN()
    config = loader_settings(
        **SMALL,  # type: ignore[arg-type]
        steps_per_round=4,
        lookahead_steps=1,
        reconnect_initial_s=0.05,
        reconnect_max_s=0.2,
    )
    client = SelectionClient(server.target, timeout_s=10)
    restarted: list[RunningServer] = []
    try:
        with CoresetLoader(fmnist, model, client, fmnist.targets.numpy(), config=config) as loader:

            def chaos(step: int) -> None:
                if step == 10:
                    server.stop(grace=0)
                if step == 20:
                    restarted.append(_server(port))

            losses = _train(loader, model, 25, chaos)
            before = loader.stats.regions
            assert loader.stats.fallback_batches > 0 and loader.stats.service_errors > 0
            # Keep training until the loader has reconnected and trains on coresets again (bounded).
            for _ in range(400):
                losses += _train(loader, model, 1)
                if loader.stats.regions > before + 1:
                    break
            stats = loader.stats
    finally:
        for s in restarted:
            s.stop(grace=0)
        client.close()
    assert np.isfinite(losses).all()
    assert stats.sessions_opened == 2  # the restarted server had lost the first session
    assert stats.regions > before + 1
    assert stats.steps == len(losses) and stats.fallback_batches < stats.steps


def test_unreachable_service_trains_on_uniform_batches_and_strict_mode_raises(fmnist: FashionMNIST) -> None:
    target = f"127.0.0.1:{_free_port()}"
    torch.manual_seed(0)
    model = SmallCNN()
    with SelectionClient(target, timeout_s=5) as client:
        with CoresetLoader(fmnist, model, client, fmnist.targets.numpy(), config=loader_settings(**SMALL)) as loader:  # type: ignore[arg-type]
            losses = _train(loader, model, 8)
            assert loader.stats.fallback_batches == 8 and loader.stats.regions == 0
            assert loader.stats.service_errors >= 1 and loader.stats.wait_s < 1.0
        assert losses[-1] < losses[0]  # it really trained, on uniform batches
        strict = loader_settings(**SMALL, strict=True)  # type: ignore[arg-type]
        loader = CoresetLoader(fmnist, model, client, fmnist.targets.numpy(), config=strict)
        with loader, pytest.raises(SelectionUnavailable, match=target):
            next(iter(loader))


class _Tokens(torch.utils.data.Dataset):
    """A toy text classification set: the label is which half of the vocabulary dominates the sequence."""

    def __init__(self, n: int = 600, length: int = 12, vocab: int = 50) -> None:
        g = torch.Generator().manual_seed(0)
        self.labels = torch.randint(0, 2, (n,), generator=g)
        lo = torch.randint(0, vocab // 2, (n, length), generator=g)
        self.ids = lo + self.labels[:, None] * (vocab // 2)
        noise = torch.rand(n, length, generator=g) < 0.3
        self.ids[noise] = torch.randint(0, vocab, (int(noise.sum()),), generator=g)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


class _BagClassifier(nn.Module):
    def __init__(self, vocab: int = 50) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, 16)  # EmbeddingBag has no double backward, which Hutchinson needs
        self.head = nn.Linear(16, 2)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.embed(input_ids).mean(1)))


def test_dict_batches_with_a_forward_fn_and_projected_last_layer_embeddings(client: SelectionClient) -> None:
    data = _Tokens()
    torch.manual_seed(0)
    model = _BagClassifier()
    config = loader_settings(
        batch_size=24, subset_fraction=0.1, num_subsets=2, embedding="last_layer_gradient", embedding_dim=8
    )
    calls = []

    def forward_fn(m: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(len(batch["labels"]))
        return m(batch["input_ids"]), batch["labels"]

    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    with CoresetLoader(data, model, client, data.labels.numpy(), config=config, forward_fn=forward_fn) as loader:
        for _, batch in zip(range(15), loader, strict=False):
            assert sorted(batch) == ["input_ids", "labels", "weights"]
            loss = weighted_loss(model(batch["input_ids"]), batch["labels"], batch.pop("weights"))
            opt.zero_grad()
            loss.backward()
            opt.step()
        stats, session = loader.stats, loader.session
    assert session is not None and stats.regions >= 1 and stats.fallback_batches == 0
    assert stats.examples_embedded > 0 and calls  # embeddings and checks went through forward_fn


class _AttentionClassifier(nn.Module):
    """Self-attention over the token embeddings (``scaled_dot_product_attention``), mean-pooled, then a head."""

    def __init__(self, vocab: int = 50) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, 16)
        self.head = nn.Linear(16, 2)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(input_ids).unsqueeze(1)  # (n, 1 head, length, 16)
        attended = nn.functional.scaled_dot_product_attention(h, h, h).squeeze(1)
        return self.head(torch.relu(attended.mean(1)))


def test_the_quadratic_models_fit_differentiates_twice_through_attention(client: SelectionClient) -> None:
    """CREST's adaptive rule fits its quadratic model with Hessian-vector products, a double backward that CPU's
    fused attention kernel cannot take: the fit runs attention on the math kernel, and only the fit does."""
    q = torch.randn(2, 1, 4, 8, requires_grad=True)
    grad = torch.autograd.grad(nn.functional.scaled_dot_product_attention(q, q, q).square().sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="not implemented"):  # the default kernel, as training uses it
        torch.autograd.grad(grad[0].sum(), q)
    data = _Tokens()
    torch.manual_seed(0)
    model = _AttentionClassifier()
    config = loader_settings(batch_size=24, subset_fraction=0.1, num_subsets=2, check_examples=48)
    assert config.region.mode == "crest"  # the adaptive rule fits

    def forward_fn(m: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return m(batch["input_ids"]), batch["labels"]

    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    with CoresetLoader(data, model, client, data.labels.numpy(), config=config, forward_fn=forward_fn) as loader:
        for _, batch in zip(range(8), loader, strict=False):
            loss = weighted_loss(model(batch["input_ids"]), batch["labels"], batch.pop("weights"))
            opt.zero_grad()
            loss.backward()
            opt.step()
        stats = loader.stats
    assert stats.regions >= 1 and stats.fit_s > 0 and stats.checks >= 1 and stats.fallback_batches == 0


def test_state_from_another_dataset_or_version_is_refused(client: SelectionClient, fmnist: FashionMNIST) -> None:
    model = SmallCNN()
    with CoresetLoader(fmnist, model, client, fmnist.targets.numpy(), config=loader_settings(**SMALL)) as loader:  # type: ignore[arg-type]
        _train(loader, model, 2)
        state = loader.state_dict()
    other = FashionMNIST("train", limit=500)
    with CoresetLoader(other, model, client, other.targets.numpy(), config=loader_settings(**SMALL)) as fresh:  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="dataset_size 1000; this loader has 500"):
            fresh.load_state_dict(state)
        with pytest.raises(ValueError, match="version 99"):
            fresh.load_state_dict({**state, "version": 99})
    assert RegionConfig().mode == "crest"


def test_rounds_started_ahead_train_the_ids_of_rounds_started_at_their_step(
    client: SelectionClient, fmnist: FashionMNIST
) -> None:
    """Same seed, same service, with and without starting rounds ahead (fixed rule): every round after the first
    comes from a StartRound run on the stream thread, and every step trains the same ids with the same weights as
    when each round is started at the step that asks for it. With learned-example exclusion too, once examples
    have left the pool and some have come back (the draw depends on the pool: the start ahead must meet the pool
    the round just switched to left)."""
    for drop_learned in (False, True):
        seen: dict[bool, list[tuple[list[int], torch.Tensor]]] = {}
        for ahead in (True, False):
            torch.manual_seed(0)
            model = SmallCNN()
            config = loader_settings(  # type: ignore[arg-type]
                **{**SMALL, "subset_fraction": 0.3},
                steps_per_round=2,
                lookahead_steps=1,
                deadline_s=60.0,
                drop_learned=drop_learned,
                prefetch_rounds=ahead,
            )
            opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
            with CoresetLoader(fmnist, model, client, fmnist.targets.numpy(), config=config) as loader:
                batches = []
                for _, (x, y, w) in zip(range(50), loader, strict=False):
                    loss = weighted_loss(model(x), y, w)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    batches.append((loader.last_ids.tolist(), w.clone()))
                stats = loader.stats
                assert loader.session is not None
                state = client.session_state(loader.session.session_id)
            assert stats.fallback_batches == 0 and stats.service_errors == 0 and stats.sessions_opened == 1
            assert stats.rounds_started >= 20
            assert stats.rounds_prefetched == (stats.rounds_started - 1 if ahead else 0)
            if drop_learned:
                assert state.excluded_size > 0 and state.readmitted_total > 0  # the pool changed round to round
            seen[ahead] = batches
        assert [ids for ids, _ in seen[True]] == [ids for ids, _ in seen[False]]
        assert all(torch.equal(a, b) for (_, a), (_, b) in zip(seen[True], seen[False], strict=True))
