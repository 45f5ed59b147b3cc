"""The embedding cache (LoaderConfig.embedding_max_age): which ids a round embeds, what it reuses, its checkpoint;
and, against a real server, a loader that reuses embeddings: no id run through the model twice within the age,
the reused rows those an earlier round computed, the counters."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from loader_settings import loader_settings

from trainer_client._embedding_cache import EmbeddingCache
from trainer_client._passes import RoundEmbeddings
from trainer_client.client import SelectionClient
from trainer_client.data import FashionMNIST
from trainer_client.embeddings import weighted_loss
from trainer_client.loader import CoresetLoader, LoaderConfig
from trainer_client.models import SmallCNN

torch.set_num_threads(1)


class Embed:
    """An embedding pass whose rows say which call made them: row i of id k at call c is [k, c], target k % 3."""

    def __init__(self) -> None:
        self.calls: list[np.ndarray] = []

    def __call__(self, ids: np.ndarray) -> RoundEmbeddings:
        self.calls.append(ids.copy())
        c = float(len(self.calls))
        emb = np.stack([ids.astype(np.float32), np.full(len(ids), c, np.float32)], axis=1)
        return RoundEmbeddings(emb, ids % 3, np.full(len(ids), c, np.float32), embedded=len(ids))


def test_a_round_embeds_only_the_ids_without_a_row_within_the_age() -> None:
    cache, embed = EmbeddingCache(10, 2, max_age=5), Embed()
    first = cache.embed_round(np.array([1, 2, 3]), 0, embed)
    assert (first.embedded, first.reused, first.reused_age) == (3, 0, 0)
    second = cache.embed_round(np.array([2, 3, 4]), 5, embed)  # 2 and 3 are 5 steps old: still usable
    assert embed.calls[-1].tolist() == [4] and (second.embedded, second.reused, second.reused_age) == (1, 2, 10)
    assert second.embeddings.tolist() == [[2, 1], [3, 1], [4, 2]]  # the rows of the call that made them
    assert second.labels.tolist() == [2, 0, 1] and second.losses.tolist() == [1, 1, 2]
    third = cache.embed_round(np.array([1, 4]), 6, embed)  # 1 is 6 steps old: embedded again; 4 is reused
    assert embed.calls[-1].tolist() == [1] and (third.embedded, third.reused) == (1, 1)
    assert third.embeddings.tolist() == [[1, 3], [4, 2]]
    cache.embed_round(np.array([1, 4]), 7, embed)  # nothing stale: the pass is not run at all
    assert len(embed.calls) == 3


def test_a_learned_row_stays_usable_for_the_longer_age_and_only_it() -> None:
    """Rows whose loss is at most learned_loss (here the even ids, loss 0) live learned_max_age steps, the others
    max_age; the checkpoint keeps what is still usable under either age."""

    def embed(ids: np.ndarray) -> RoundEmbeddings:
        calls.append(ids.copy())
        return RoundEmbeddings(np.ones((len(ids), 2), np.float32), ids % 3, (ids % 2).astype(np.float32), len(ids))

    calls: list[np.ndarray] = []
    cache = EmbeddingCache(10, 2, max_age=2, learned_max_age=10, learned_loss=0.5)
    cache.embed_round(np.array([0, 1, 2, 3]), 0, embed)
    out = cache.embed_round(np.array([0, 1, 2, 3]), 5, embed)  # 5 steps: the learned 0 and 2 are reused
    assert calls[-1].tolist() == [1, 3] and (out.embedded, out.reused, out.reused_age) == (2, 2, 10)
    assert cache.state_dict(10)["ids"].tolist() == [0, 2]  # 1 and 3 (step 5) are past max_age; 0 and 2 are not
    cache.embed_round(np.array([0, 1, 2, 3]), 11, embed)  # 0 and 2 are 11 steps old: embedded again
    assert calls[-1].tolist() == [0, 1, 2, 3]
    only_learned = EmbeddingCache(10, 2, max_age=0, learned_max_age=4, learned_loss=0.5)
    only_learned.embed_round(np.array([0, 1]), 0, embed)
    only_learned.embed_round(np.array([0, 1]), 1, embed)
    assert calls[-1].tolist() == [1]
    for kwargs, message in (
        ({"max_age": 0}, "max_age must be >= 0 steps and max_age or learned_max_age >= 1, received 0 and 0"),
        ({"max_age": 5, "learned_max_age": 3}, "learned_max_age must be >= max_age \\(5\\)"),
        ({"max_age": 1, "learned_max_age": 3, "learned_loss": float("nan")}, "received 3 and nan"),
    ):
        with pytest.raises(ValueError, match=message):
            EmbeddingCache(10, 2, **kwargs)
    with pytest.raises(ValueError, match="learned_embedding_max_age must be 0 \\(off\\) or >= embedding_max_age \\(8"):
        LoaderConfig(embedding_max_age=8, learned_embedding_max_age=4)


def test_the_cache_checkpoints_its_usable_rows_and_refuses_another_run() -> None:
    cache, embed = EmbeddingCache(10, 2, max_age=4), Embed()
    cache.embed_round(np.array([0, 1]), 0, embed)
    cache.embed_round(np.array([1, 5, 6]), 3, embed)  # 0 is kept from step 0, 1 reused
    state = cache.state_dict(4)  # step 0's rows are 4 old: still usable
    assert state["ids"].tolist() == [0, 1, 5, 6] and state["steps"].tolist() == [0, 0, 3, 3]
    assert cache.state_dict(5)["ids"].tolist() == [5, 6]  # 0 and 1 can never be reused again: not saved
    restored, again = EmbeddingCache(10, 2, max_age=4), Embed()
    restored.load_state_dict(state)
    out = restored.embed_round(np.array([0, 5, 7]), 4, again)
    assert again.calls[-1].tolist() == [7] and out.embeddings[:2].tolist() == [[0, 1], [5, 2]]
    for key, value, message in (
        ("dim", 3, "embedding cache state has dim 3; this loader's is 2"),
        ("dataset_size", 11, "embedding cache state has dataset_size 11; this loader's is 10"),
        ("version", 7, "embedding cache state has version 7; this loader's is 1"),
    ):
        with pytest.raises(ValueError, match=message):
            EmbeddingCache(10, 2, max_age=4).load_state_dict({**state, key: value})
    with pytest.raises(ValueError, match="embedding_max_age must be >= 0 steps \\(0: off\\), received -1"):
        LoaderConfig(embedding_max_age=-1)


def _reuse_config(**reuse: Any) -> LoaderConfig:
    """Short fixed regions of 2 subsets of 60 from 600 examples, every round 1 step ahead, with ``reuse``."""
    return loader_settings(
        batch_size=32, subset_fraction=0.1, num_subsets=2, steps_per_round=4, lookahead_steps=1, **reuse
    )


@pytest.mark.parametrize(
    ("max_age", "learned_age", "learned_loss"),
    [(12, 0, 0.0), (2, 30, 1.5)],  # recent rows only; and the rows of "learned" examples (loss <= 1.5) 30 steps
    ids=["recent", "learned"],
)
def test_a_loader_reuses_recent_embeddings_and_never_embeds_an_id_twice_within_the_age(
    client: SelectionClient, max_age: int, learned_age: int, learned_loss: float
) -> None:
    data = FashionMNIST("train", limit=600)
    torch.manual_seed(0)
    model = SmallCNN()
    config = _reuse_config(
        embedding_max_age=max_age, learned_embedding_max_age=learned_age, learned_embedding_loss=learned_loss
    )
    rounds: list[tuple[int, np.ndarray, RoundEmbeddings]] = []  # (step, round ids, rows handed to the service)
    passes: list[tuple[int, np.ndarray]] = []  # (step, ids run through the model)
    with CoresetLoader(data, model, client, data.targets.numpy(), config=config) as loader:
        assert loader._cache is not None
        cache_round, model_pass = loader._cache.embed_round, loader._passes.embed_round  # internal: observed

        def observed_round(ids: np.ndarray, step: int, embed: Any) -> RoundEmbeddings:
            out = cache_round(ids, step, embed)
            rounds.append((step, ids.copy(), out))
            return out

        def observed_pass(ids: np.ndarray) -> RoundEmbeddings:
            passes.append((loader.stats.steps, ids.copy()))
            return model_pass(ids)

        loader._cache.embed_round = observed_round  # type: ignore[method-assign]
        loader._passes.embed_round = observed_pass  # type: ignore[method-assign]
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        for _, (x, y, w) in zip(range(40), loader, strict=False):
            loss = weighted_loss(model(x), y, w)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        stats = loader.stats
    assert stats.fallback_batches == 0 and len(rounds) >= 8
    total = sum(len(ids) for _, ids, _ in rounds)
    assert stats.embeddings_reused > 0 and stats.examples_embedded + stats.embeddings_reused == total
    assert stats.examples_embedded == sum(len(ids) for _, ids in passes)
    last: dict[int, tuple[int, np.ndarray, float]] = {}  # id -> (step, row, loss) of its latest model pass
    reused_learned = 0  # reused rows older than max_age (usable only as learned ones)
    for step, ids, out in rounds:
        ran = next((p for s, p in passes if s == step), np.zeros(0, np.int64))
        for i, row, loss in zip(ids.tolist(), out.embeddings, out.losses.tolist(), strict=True):
            age = step - last[i][0] if i in last else None
            if age is not None and (age <= max_age or (age <= learned_age and last[i][2] <= learned_loss)):
                assert i not in ran.tolist()  # still usable: not run through the model again
                assert np.array_equal(row, last[i][1])  # the row of the pass that made it
                reused_learned += age > max_age
            else:
                assert i in ran.tolist()
                last[i] = (step, row.copy(), loss)
    assert reused_learned > 0 if learned_age else reused_learned == 0


def test_refresh_keeps_a_row_only_where_none_is_newer() -> None:
    cache, embed = EmbeddingCache(10, 2, max_age=5), Embed()
    cache.embed_round(np.array([1, 2]), 4, embed)  # rows [k, 1] at step 4
    trained = RoundEmbeddings(np.full((3, 2), 9, np.float32), np.array([0, 1, 2]), np.zeros(3, np.float32), 0)
    cache.refresh(np.array([0, 1, 2]), trained, 3)  # older than 1's and 2's rows: only 0 is taken
    out = cache.embed_round(np.array([0, 1, 2]), 5, embed)
    assert len(embed.calls) == 1 and out.embeddings.tolist() == [[9, 9], [1, 1], [2, 1]]
    cache.refresh(np.array([0, 1, 2]), trained, 6)  # newer than all: every row taken, at step 6
    assert cache.state_dict(11)["ids"].tolist() == [0, 1, 2] and cache.state_dict(12)["ids"].tolist() == []


def test_a_loader_stores_the_training_steps_logits_and_reuses_them(client: SelectionClient) -> None:
    """observe_logits: each trained batch's rows are softmax(z) - onehot(y) of the training forward's logits at
    the step before its update; a later round takes them instead of running those ids through the model."""
    data = FashionMNIST("train", limit=600)
    torch.manual_seed(0)
    model = SmallCNN()
    config = _reuse_config(embedding_max_age=6, training_logits=True)
    trained: dict[int, tuple[int, np.ndarray, float]] = {}  # id -> (step, row, loss) of its last training step
    passes: list[tuple[int, np.ndarray]] = []  # (step, ids run through the model)
    taken_from_training = 0
    with CoresetLoader(data, model, client, data.targets.numpy(), config=config) as loader:
        model_pass = loader._passes.embed_round  # internal: observed
        cache_round = loader._cache.embed_round  # type: ignore[union-attr]

        def observed_pass(ids: np.ndarray) -> RoundEmbeddings:
            passes.append((loader.stats.steps, ids.copy()))
            return model_pass(ids)

        def observed_round(ids: np.ndarray, step: int, embed: Any) -> RoundEmbeddings:
            nonlocal taken_from_training
            out = cache_round(ids, step, embed)
            ran = set(passes[-1][1].tolist()) if passes and passes[-1][0] == step else set()
            for i, row in zip(ids.tolist(), out.embeddings, strict=True):
                if i in trained and step - trained[i][0] <= config.embedding_max_age and i not in ran:
                    taken_from_training += np.array_equal(row, trained[i][1])
            return out

        loader._passes.embed_round = observed_pass  # type: ignore[method-assign]
        loader._cache.embed_round = observed_round  # type: ignore[union-attr, method-assign]
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        rows = 0
        for step, (x, y, w) in zip(range(40), loader, strict=False):
            logits = model(x)
            loader.observe_logits(logits)
            expected = (torch.softmax(logits.detach(), 1) - torch.nn.functional.one_hot(y, 10)).numpy()
            losses = torch.nn.functional.cross_entropy(logits.detach(), y, reduction="none").numpy()
            for i, row, loss in zip(loader.last_ids.tolist(), expected, losses.tolist(), strict=True):
                trained[i] = (step, row, loss)
            rows += len(y)
            loss = weighted_loss(logits, y, w)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        stats = loader.stats
        state = loader.state_dict()["embedding_cache"]
    assert stats.fallback_batches == 0 and stats.training_rows == rows == 40 * 32
    assert taken_from_training > 0  # rounds reused rows the training steps stored, exactly as computed there
    saved = dict(zip(state["ids"].tolist(), state["steps"].tolist(), strict=True))
    for i, (step, row, _) in trained.items():
        if step >= 40 - config.embedding_max_age and saved.get(i) == step:  # still usable, last set by training
            k = state["ids"].tolist().index(i)
            np.testing.assert_allclose(state["embeddings"][k].numpy(), row, atol=1e-6)
    assert sum(saved.get(i) == s for i, (s, _, _) in trained.items()) > 0


def test_observe_logits_refuses_what_is_not_the_last_batchs_logits(client: SelectionClient) -> None:
    data = FashionMNIST("train", limit=300)
    config = loader_settings(
        batch_size=16, subset_fraction=0.1, num_subsets=2, steps_per_round=4, embedding_max_age=4, training_logits=True
    )
    with CoresetLoader(data, SmallCNN(), client, data.targets.numpy(), config=config) as loader:
        with pytest.raises(RuntimeError, match="none was yielded yet"):
            loader.observe_logits(torch.zeros(16, 10))
        x, _, _ = next(iter(loader))
        n = len(x)
        assert loader._cache is not None
        before = loader._cache.state_dict(0)
        with pytest.raises(ValueError, match=f"shape \\({n}, 10\\); received \\({n}, 9\\)"):
            loader.observe_logits(torch.zeros(n, 9))
        bad = torch.zeros(n, 10)
        bad[3, 2] = float("nan")
        with pytest.raises(ValueError, match=f"non-finite logits in 1 of {n} rows; nothing stored"):
            loader.observe_logits(bad)
        after = loader._cache.state_dict(0)
        assert after["ids"].tolist() == before["ids"].tolist() and loader.stats.training_rows == 0
        assert torch.equal(after["embeddings"], before["embeddings"])
    plain = loader_settings(batch_size=16, subset_fraction=0.1, num_subsets=2, steps_per_round=4)
    with CoresetLoader(data, SmallCNN(), client, data.targets.numpy(), config=plain) as loader:
        next(iter(loader))
        with pytest.raises(RuntimeError, match="observe_logits needs LoaderConfig\\(training_logits=True\\)"):
            loader.observe_logits(torch.zeros(len(loader.last_ids), 10))
    with pytest.raises(ValueError, match="training_logits needs embedding='logit_gradient' and embedding_max_age"):
        LoaderConfig(training_logits=True, embedding_max_age=0, learned_embedding_max_age=0)
    with pytest.raises(ValueError, match="received embedding='last_layer_gradient'"):
        LoaderConfig(training_logits=True, embedding="last_layer_gradient", embedding_max_age=3)
