"""Resume: train N steps, checkpoint model, optimizer and loader, restore in a new process; the next batches
equal those of an uninterrupted run with the same seed (against one real server, CREST region control)."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from loader_settings import loader_settings

from selector_service.server import RunningServer
from trainer_client.client import SelectionClient
from trainer_client.data import FashionMNIST
from trainer_client.embeddings import weighted_loss
from trainer_client.loader import CoresetLoader
from trainer_client.models import SmallCNN

SCRIPT = textwrap.dedent(
    """
    import json, os, signal, sys
    import torch
    from trainer_client.client import SelectionClient
    from trainer_client.data import FashionMNIST
    from trainer_client.embeddings import weighted_loss
    from trainer_client.loader import CoresetLoader, LoaderConfig
    from trainer_client.models import SmallCNN

    target, phase, ckpt, first, total = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
    workers = int(sys.argv[6])
    torch.set_num_threads(1)
    torch.manual_seed(0)
    data = FashionMNIST("train", limit=1000)
    model = SmallCNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    config = LoaderConfig.from_recipe("released", batch_size=32, subset_fraction=0.05, num_subsets=2,
                          check_examples=128, lookahead_steps=2, deadline_s=60.0)
    client = SelectionClient(target, timeout_s=60)
    loader = CoresetLoader(data, model, client, data.targets.numpy(), config=config, num_workers=workers)
    start, stop = {"full": (0, total), "first": (0, first), "rest": (first, total)}[phase]
    if phase == "rest":
        state = torch.load(ckpt, weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        loader.load_state_dict(state["loader"])
    ids = []
    for step, (x, y, w) in zip(range(start, stop), loader):
        loss = weighted_loss(model(x), y, w)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ids.append(loader.last_ids.tolist())
    if phase == "first":
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "loader": loader.state_dict()}, ckpt)
        if workers:  # preempted while the workers fetch the next steps' batches: no cleanup at all
            print(json.dumps({"ids": ids}), flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        loader.close(end_session=False)  # as if preempted: the session stays on the service
    else:
        loader.close()
    print(json.dumps({"ids": ids, "regions": loader.stats.regions, "checks": loader.stats.checks,
                      "fallback": loader.stats.fallback_batches}))
    """
)


def _run(tmp_path: Path, target: str, phase: str, first: int, total: int, workers: int = 0) -> dict:
    script = tmp_path / "resume_run.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    out = subprocess.run(
        [sys.executable, str(script), target, phase, str(tmp_path / "ckpt.pt"), str(first), str(total), str(workers)],
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
        check=False,
    )
    killed = phase == "first" and workers > 0
    assert out.returncode == (-signal.SIGKILL if killed else 0), out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_restored_loader_continues_with_the_batches_of_an_uninterrupted_run(
    local_server: RunningServer, tmp_path: Path
) -> None:
    first, total = 14, 30
    full = _run(tmp_path, local_server.target, "full", first, total)
    head = _run(tmp_path, local_server.target, "first", first, total)
    rest = _run(tmp_path, local_server.target, "rest", first, total)
    assert full["fallback"] == head["fallback"] == rest["fallback"] == 0
    assert head["ids"] == full["ids"][:first]
    assert rest["ids"] == full["ids"][first:]  # the next batches, not a fresh start
    assert full["regions"] >= 3 and rest["regions"] == full["regions"]  # regions switched after the restore too
    assert rest["checks"] == full["checks"]  # counters travelled with the state


def test_a_run_with_workers_killed_and_resumed_has_the_batches_of_an_uninterrupted_run_without_them(
    local_server: RunningServer, tmp_path: Path
) -> None:
    """Two DataLoader workers; the process is SIGKILLed right after the checkpoint, with batches in flight."""
    first, total = 14, 30
    full = _run(tmp_path, local_server.target, "full", first, total)
    head = _run(tmp_path, local_server.target, "first", first, total, workers=2)
    rest = _run(tmp_path, local_server.target, "rest", first, total, workers=2)
    assert head["ids"] == full["ids"][:first]
    assert rest["ids"] == full["ids"][first:] and rest["fallback"] == 0
    assert rest["regions"] == full["regions"] >= 3


def _fixed_run(
    target: str, steps: range, state: dict | None = None, *, ahead: bool = True, max_age: int = 0
) -> tuple[list[list[int]], dict, CoresetLoader]:
    """Train ``steps`` in this process (fixed rule: a round asked for every 5 steps, switched to 1 later) from
    ``state`` (model, optimizer, loader) or from the seed; the ids of every step and the state after the last."""
    torch.manual_seed(0)
    data = FashionMNIST("train", limit=1000)
    model = SmallCNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    config = loader_settings(
        batch_size=32,
        subset_fraction=0.05,
        num_subsets=2,
        steps_per_round=6,
        lookahead_steps=1,
        deadline_s=60.0,
        prefetch_rounds=ahead,
        embedding_max_age=max_age,
    )
    loader = CoresetLoader(data, model, SelectionClient(target, timeout_s=60), data.targets.numpy(), config=config)
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        loader.load_state_dict(state["loader"])
    ids = []
    for _, (x, y, w) in zip(steps, loader, strict=False):
        loss = weighted_loss(model(x), y, w)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ids.append(loader.last_ids.tolist())
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "loader": loader.state_dict()}, buffer)
    buffer.seek(0)
    loader.close(end_session=False)  # as if preempted: the session stays on the service
    return ids, torch.load(buffer, weights_only=True), loader


def test_a_checkpoint_with_a_round_started_ahead_resumes_with_the_batches_of_an_uninterrupted_run(
    local_server: RunningServer,
) -> None:
    """The checkpoint is taken between a switch (where the next round was started ahead, on the stream thread) and
    the step that asks for that round: the service has started it, and the checkpoint carries its plan, which the
    restored loader trains on. A checkpoint from before rounds were started ahead (no "prefetched") still loads."""
    first, total = 8, 24
    full, _, whole = _fixed_run(local_server.target, range(total))
    assert whole.stats.rounds_prefetched == whole.stats.rounds_started - 1 >= 3 and whole.stats.fallback_batches == 0

    head, state, _ = _fixed_run(local_server.target, range(first))
    saved = state["loader"]["prefetched"]
    assert saved is not None and saved["session_round"] == state["loader"]["session_round"] == 2  # switched at 6
    rest, _, resumed = _fixed_run(local_server.target, range(first, total), state)
    assert head == full[:first] and rest == full[first:]
    assert resumed.stats.sessions_opened == 1 and resumed.stats.fallback_batches == 0  # the session was kept
    assert resumed.stats.rounds_prefetched == whole.stats.rounds_prefetched  # the saved plan was taken

    _, state, _ = _fixed_run(local_server.target, range(first), ahead=False)
    assert state["loader"]["prefetched"] is None
    del state["loader"]["prefetched"]  # as written before rounds were started ahead
    rest, _, resumed = _fixed_run(local_server.target, range(first, total), state)
    assert rest == full[first:] and resumed.stats.sessions_opened == 1 and resumed.stats.rounds_prefetched > 0


def test_a_checkpoint_carries_the_reusable_embeddings(local_server: RunningServer) -> None:
    """With embedding_max_age, the rounds after a restore reuse the rows embedded before it, as the uninterrupted
    run does: the same batches. Without the saved rows the restored loader embeds those ids again."""
    first, total, age = 13, 30, 24
    full, _, whole = _fixed_run(local_server.target, range(total), max_age=age)
    head, state, _ = _fixed_run(local_server.target, range(first), max_age=age)
    assert len(state["loader"]["embedding_cache"]["ids"]) > 0
    rest, _, resumed = _fixed_run(local_server.target, range(first, total), state, max_age=age)
    assert head == full[:first] and rest == full[first:]
    assert resumed.stats.embeddings_reused == whole.stats.embeddings_reused > 0
    assert resumed.stats.examples_embedded == whole.stats.examples_embedded

    del state["loader"]["embedding_cache"]  # as saved with the cache off
    _, _, cold = _fixed_run(local_server.target, range(first, total), state, max_age=age)
    assert cold.stats.examples_embedded > whole.stats.examples_embedded
