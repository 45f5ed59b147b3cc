"""The payoff inside a real run (``LoaderConfig.payoff``): SmallCNN trained on Fashion-MNIST against a real gRPC
server, the probe set held out from the test split. The schedule's control segments train on control batches and
pause the region; the workers fetch the same batches; a run where selection is made to lose (every round embeds
half the dataset afresh, so a selection step costs several control steps) is governed onto the control and asks
for rounds only ahead of its selection probes; a resumed run repeats the uninterrupted run's decisions and batches."""

from __future__ import annotations

import io
import logging
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from selector_service.server import RunningServer
from trainer_client import LoaderConfig
from trainer_client._payoff_run import class_index, control_batch
from trainer_client.client import SelectionClient
from trainer_client.data import FashionMNIST
from trainer_client.embeddings import weighted_loss
from trainer_client.loader import CoresetLoader
from trainer_client.models import SmallCNN
from trainer_client.payoff import ArmCosts
from trainer_client.region import RegionConfig

torch.set_num_threads(1)
MEASURE = {"batch_size": 32, "subset_fraction": 0.05, "num_subsets": 2, "payoff": "measure"}
MEASURE |= {"payoff_segment_steps": 5, "payoff_every": 4, "payoff_window": 2, "payoff_control_scale": 1}
# Selection made to lose: every 5-step region embeds 1,000 of the 2,000 examples afresh, in float32.
LOSING = {"batch_size": 32, "subset_fraction": 0.5, "num_subsets": 2}
LOSING |= {"region": RegionConfig(mode="fixed", steps_per_round=5)}
LOSING |= {"embedding_max_age": 0, "learned_embedding_max_age": 0, "lookahead_steps": 1, "embed_dtype": "float32"}
LOSING |= {"payoff": "govern", "payoff_segment_steps": 5, "payoff_every": 4, "payoff_window": 3, "deadline_s": 60.0}
LOSING |= {"payoff_control_scale": 1}  # segments of equal steps: a schedule that does not move with the clock


@pytest.fixture(scope="module")
def data() -> tuple[FashionMNIST, FashionMNIST]:
    return FashionMNIST("train", limit=2000), FashionMNIST("test", limit=300)


def _run(
    client: SelectionClient,
    data: tuple[FashionMNIST, FashionMNIST],
    config: LoaderConfig,
    steps: range,
    state: dict[str, Any] | None = None,
    **kwargs: Any,
) -> tuple[list[tuple[str, list[int], list[float]]], CoresetLoader, dict[str, Any]]:
    """Train ``steps`` (from ``state``'s checkpoint when given): every step's (arm, ids, weights), the closed loader
    (its session kept), and the checkpoint at the end."""
    train, probe = data
    torch.manual_seed(0)
    model = SmallCNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loader = CoresetLoader(train, model, client, train.targets.numpy(), config=config, probe=probe, **kwargs)
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        loader.load_state_dict(state["loader"])
    seen = []
    for _, (x, y, w) in zip(steps, loader, strict=False):
        loss = weighted_loss(model(x), y, w)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        seen.append((loader.last_arm, loader.last_ids.tolist(), w.tolist()))
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "loader": loader.state_dict()}, buffer)
    buffer.seek(0)
    loader.close(end_session=False)
    return seen, loader, torch.load(buffer, weights_only=True)


def test_measuring_interleaves_control_segments_and_reports_the_payoff(
    client: SelectionClient, data: tuple[FashionMNIST, FashionMNIST]
) -> None:
    """Measurements of 3 segments of 5 steps every 20 steps from step 5: the middle segment trains on weight-1
    control batches with the region paused, and the workers fetch the batches a run without them trains on."""
    config = LoaderConfig(**MEASURE)  # type: ignore[arg-type]
    base, loader, _ = _run(client, data, config, range(85))
    arms = "".join("c" if arm == "control" else "s" for arm, _, _ in base)
    assert arms == ("s" * 10 + "c" * 5 + "s" * 5) * 4 + "s" * 5
    assert all(w == [1.0] * 32 for arm, _, w in base if arm == "control")
    stats = loader.stats
    assert stats.control_steps == 20 and stats.payoff_measurements == 4 and stats.payoff_spoiled == 0
    assert stats.fallback_batches == 0 and stats.regions >= 3 and stats.payoff_arm == "selection"
    assert stats.probe_s > 0 and np.isfinite(stats.payoff_per_step) and np.isfinite(stats.payoff_per_second)
    assert loader.payoff_decisions == []  # measure mode decides nothing
    pairs = loader.payoff_state["governor"]["pairs"]  # type: ignore[index]
    assert len(pairs) == 4 and loader.payoff_state == loader.state_dict()["payoff"]
    # Each StartRound told the service: its session holds the payoff as of the last round asked for.
    assert loader.session is not None
    state = client.session_state(loader.session.session_id)
    assert state.payoff_measurements >= 3 and state.payoff_arm == "selection"
    assert state.trainer_control_steps >= 15 and state.trainer_fallback_batches == 0
    # The forecast knows the arms: the workers fetch every step's batch as the run without them trains on it.
    fed, ahead, _ = _run(client, data, config, range(85), num_workers=2)
    assert fed == base and ahead.stats.input_misses <= 2 * ahead.stats.regions


def test_a_run_where_selection_loses_is_governed_onto_the_control(
    client: SelectionClient, data: tuple[FashionMNIST, FashionMNIST], caplog: pytest.LogCaptureFixture
) -> None:
    config = LoaderConfig(**LOSING)  # type: ignore[arg-type]
    with caplog.at_level(logging.INFO, logger="trainer_client.loader"):
        seen, loader, _ = _run(client, data, config, range(160))
    moved = next(d for d in loader.payoff_decisions if d.arm == "control")
    assert moved.verdict == "loses" and moved.per_second_hi is not None and moved.per_second_hi < 1
    assert f"step {moved.step}: payoff loses" in caplog.text
    stats = loader.stats
    assert stats.payoff_arm == "control" and stats.fallback_batches == 0 and stats.payoff_spoiled == 0
    after = "".join("c" if arm == "control" else "s" for arm, _, _ in seen[moved.step :])
    # Training stays on the control, with a 5-step selection probe in the middle of each measurement, 40 steps apart.
    assert after.count("s") <= 5 * (-(-len(after) // 40)) and after.startswith("ccccc")
    assert stats.control_steps > len(seen) / 2
    # A round is asked for only ahead of a selection segment: one per selection probe, none for the paused regions.
    probes = after.count("cs")
    rounds = [r for r in caplog.messages if "round" in r and "requested" in r]
    late = [int(r.split(":")[0].split()[1]) for r in rounds]
    assert len([s for s in late if s > moved.step]) == probes


def test_control_segments_are_scaled_to_the_arms_cost_ratio_in_a_real_run(
    client: SelectionClient, data: tuple[FashionMNIST, FashionMNIST]
) -> None:
    """payoff_control_scale 0 where a selection step costs several control steps: each measurement's control
    segment is its recorded scale times 5 steps, and the scale is the run's cost ratio, rounded down."""
    config = LoaderConfig(**{**LOSING, "payoff": "measure", "payoff_control_scale": 0})  # type: ignore[arg-type]
    seen, loader, _ = _run(client, data, config, range(200))
    governor = loader.payoff_state["governor"]  # type: ignore[index]
    scales = governor["scales"]
    arms = "".join("c" if arm == "control" else "s" for arm, _, _ in seen)
    runs = [len(r) for r in arms.replace("s", " ").split()]
    assert scales and runs[: len(scales)] == [5 * k for k in scales]
    assert max(scales) > 1
    selection_s, control_s = ArmCosts(**governor["costs"]).per_step()  # type: ignore[misc]
    assert abs(scales[-1] - selection_s / control_s) < 0.5 + 0.5 * selection_s / control_s
    assert loader.stats.payoff_measurements == len(scales) and loader.stats.fallback_batches == 0
    k = governor["scale"]  # the summary names the last measurement's scale when it is above 1
    assert (f"control segments of {5 * k} steps, the time of 5 selection steps" in loader.payoff_summary()) == (k > 1)


def test_a_resumed_governed_run_repeats_the_uninterrupted_runs_decisions_and_batches(
    local_server: RunningServer, data: tuple[FashionMNIST, FashionMNIST]
) -> None:
    config = LoaderConfig(**LOSING)  # type: ignore[arg-type]
    full, whole, _ = _run(SelectionClient(local_server.target), data, config, range(150))
    head, first, state = _run(SelectionClient(local_server.target), data, config, range(93))  # mid-measurement
    assert state["loader"]["payoff"]["governor"]["open"] is not None
    rest, resumed, _ = _run(SelectionClient(local_server.target), data, config, range(93, 150), state)
    assert head + rest == full
    # The decisions (the per-second bounds read this run's clock; the arms do not move with it).
    decided = [[(d.step, d.arm, d.verdict) for d in run.payoff_decisions] for run in (whole, resumed)]
    assert decided[0] == decided[1]
    saved = first.payoff_decisions
    assert len(saved) == 4 and resumed.payoff_decisions[:4] == saved  # those taken before the checkpoint
    assert any(d.arm == "control" for d in whole.payoff_decisions)
    assert resumed.stats.sessions_opened == 1 and resumed.stats.fallback_batches == 0


def test_bad_payoff_settings_are_refused_naming_what_was_received(
    client: SelectionClient, data: tuple[FashionMNIST, FashionMNIST]
) -> None:
    train, probe = data
    labels = train.targets.numpy()
    with pytest.raises(ValueError, match="probe=dataset"):
        CoresetLoader(train, SmallCNN(), client, labels, config=LoaderConfig(payoff="measure"))
    with pytest.raises(ValueError, match="selection='uniform' has none"):
        CoresetLoader(train, SmallCNN(), None, labels, config=LoaderConfig(payoff="govern", selection="uniform"))
    with pytest.raises(ValueError, match="received 0, 10, 4, 0"):
        LoaderConfig(payoff="measure", payoff_segment_steps=0)
    with pytest.raises(ValueError, match="payoff must be one of off, measure, govern, received 'on'"):
        LoaderConfig(payoff="on")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="probe set is empty"):
        CoresetLoader(train, SmallCNN(), client, labels, config=LoaderConfig(payoff="measure"), probe=Empty())
    # A checkpoint of other payoff settings is refused before anything is loaded.
    _, _, state = _run(client, data, LoaderConfig(**MEASURE), range(6))  # type: ignore[arg-type]
    other = LoaderConfig(**{**MEASURE, "payoff_every": 5})  # type: ignore[arg-type]
    loader = CoresetLoader(train, SmallCNN(), client, labels, config=other, probe=probe)
    refused = r"settings \['measure', 5, 4, 2, 4, 1\].*this loader's are 4 and \['measure', 5, 5, 2, 4, 1\]"
    with pytest.raises(ValueError, match=refused):
        loader.load_state_dict(state["loader"])
    assert loader.stats.steps == 0 and loader.stats.payoff_measurements == 0 and loader.controller.steps_since_fit == 0
    loader.close()


class Empty(Dataset):
    def __len__(self) -> int:
        return 0

    def __getitem__(self, i: int) -> Any:
        raise IndexError(i)


def test_control_batches_are_class_balanced_when_the_labels_are_skewed() -> None:
    labels = np.repeat(np.arange(4), [700, 200, 80, 20])  # the largest class 35x the smallest
    classes = class_index(labels, 4)
    assert classes is not None and [len(c) for c in classes] == [700, 200, 80, 20]
    rng = np.random.default_rng(0)
    for _ in range(50):
        ids = control_batch(rng, len(labels), 30, classes, 0, 1)
        counts = np.bincount(labels[ids], minlength=4)
        assert sorted(counts) == [7, 7, 8, 8] and len(ids) == 30  # 30 = 4 x 7, and 1 more of 2 drawn classes
        assert np.all(np.diff(ids) >= 0)
    assert class_index(np.repeat(np.arange(3), [100, 90, 60]), 3) is None  # within 2x: uniform batches
    uniform = control_batch(np.random.default_rng(0), 250, 32, None, 0, 1)
    assert len(np.unique(uniform)) == 32 and uniform.max() < 250
    # Every rank draws the same batch and keeps its share.
    shares = [control_batch(np.random.default_rng(1), 250, 32, None, r, 2) for r in (0, 1)]
    whole = control_batch(np.random.default_rng(1), 250, 32, None, 0, 1)
    assert np.array_equal(np.sort(np.concatenate(shares)), whole) and len(shares[0]) == len(shares[1]) == 16
