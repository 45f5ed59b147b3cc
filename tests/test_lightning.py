"""The Lightning integration against a real server: a real ``LightningModule`` (the project's SmallCNN) fitted on
Fashion-MNIST through ``CoresetDataModule``, in one process and under Lightning's DDP strategy on two CPU
processes; a checkpoint, a kill and ``fit(ckpt_path=...)`` continue with the batches of an uninterrupted fit; bad
use fails clearly."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip("lightning", reason="the lightning extra is not installed")

import lightning.pytorch as pl
from lightning.pytorch.loggers import CSVLogger
from loader_settings import loader_settings
from torch.utils.data import Dataset

from selector_service.server import RunningServer
from trainer_client.data import FashionMNIST
from trainer_client.embeddings import weighted_loss
from trainer_client.integrations.lightning import CoresetDataModule
from trainer_client.loader import LoaderConfig, SelectionUnavailable
from trainer_client.models import SmallCNN

STEPS, SAVE_AT = 14, 6

# Phase "full" fits STEPS steps; "first" is killed (SIGKILL, every rank) once the checkpoint of step SAVE_AT is
# on disk; "rest" resumes from that checkpoint. Each rank writes the ids it trained per loader step.
WORKER = textwrap.dedent(
    """
    import json, os, signal, sys
    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.callbacks import ModelCheckpoint
    from trainer_client.data import FashionMNIST
    from trainer_client.embeddings import weighted_loss
    from trainer_client.integrations.lightning import CoresetDataModule
    from trainer_client.loader import LoaderConfig
    from trainer_client.region import RegionConfig
    from trainer_client.models import SmallCNN

    target, out, phase, run_dir = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
    steps, save_at, accumulation, devices, batch = (int(a) for a in sys.argv[5:10])
    torch.set_num_threads(1)

    class Classifier(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = SmallCNN()
        def forward(self, x):
            return self.net(x)
        def training_step(self, batch, batch_idx):
            x, y, w = batch
            return weighted_loss(self(x), y, w)
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    class Record(pl.Callback):
        def __init__(self):
            self.ids = {}
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            self.ids[data.loader.stats.steps] = data.loader.last_ids.tolist()
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if phase == "first" and trainer.global_step == save_at:
                report(trainer)
                trainer.strategy.barrier()  # every rank is past the checkpoint
                os.kill(os.getpid(), signal.SIGKILL)  # preempted: no cleanup, the session stays on the service

    def report(trainer):
        digest = float(sum(p.detach().double().sum() for p in trainer.lightning_module.parameters()))
        with open(out.format(rank=trainer.global_rank), "w") as f:
            json.dump({"ids": record.ids, "digest": digest, "stats": vars(data.loader.stats),
                       "step": trainer.global_step}, f)

    pl.seed_everything(0)
    model = Classifier()
    config = LoaderConfig.from_recipe("released", subset_fraction=0.1, num_subsets=2, lookahead_steps=1,
                                      deadline_s=60.0, region=RegionConfig(mode="fixed", steps_per_round=4))
    data = CoresetDataModule(FashionMNIST("train", limit=600), target, batch_size=batch, loader_config=config)
    record = Record()
    saver = ModelCheckpoint(dirpath=run_dir, filename="{step}", every_n_train_steps=save_at, save_top_k=-1)
    trainer = pl.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto",
                         max_steps=steps, accumulate_grad_batches=accumulation, callbacks=[record, saver],
                         logger=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    ckpt = os.path.join(run_dir, f"step={save_at}.ckpt") if phase == "rest" else None
    trainer.fit(model, datamodule=data, ckpt_path=ckpt)
    report(trainer)
    """
)
ENV = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "GLOO_SOCKET_IFNAME": os.environ.get("GLOO_SOCKET_IFNAME", "lo")}


def _run(tmp_path: Path, target: str, phase: str, *, devices: int, accumulation: int, batch: int) -> list[dict]:
    """One phase on ``devices`` processes (Lightning launches the others); each rank's report, in rank order."""
    script = tmp_path / "lightning_worker.py"
    script.write_text(WORKER)
    run_dir = tmp_path / ("full" if phase == "full" else "resumed")
    out = tmp_path / f"{phase}-rank{{rank}}.json"
    args = [str(script), target, str(out), phase, str(run_dir), str(STEPS), str(SAVE_AT), str(accumulation)]
    proc = subprocess.run(
        [sys.executable, *args, str(devices), str(batch)], capture_output=True, text=True, env=ENV, timeout=300
    )
    logs = proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.returncode != 0 if phase == "first" else proc.returncode == 0, logs  # "first" is killed
    return [json.loads((tmp_path / f"{phase}-rank{r}.json").read_text()) for r in range(devices)]


def _check_resume(full: list[dict], head: list[dict], rest: list[dict]) -> None:
    """The resumed fit trained on the batches of the uninterrupted one, and ended with the same weights."""
    for f, h, r in zip(full, head, rest, strict=True):
        assert h["step"] == SAVE_AT and r["step"] == f["step"] == STEPS
        assert h["ids"] == {k: f["ids"][k] for k in h["ids"]} and len(h["ids"]) == SAVE_AT
        after = {k: v for k, v in f["ids"].items() if int(k) > SAVE_AT}
        assert len(after) == STEPS - SAVE_AT and r["ids"] == after  # the next batches, not a fresh start
        assert r["digest"] == f["digest"]
        assert f["stats"]["fallback_batches"] == r["stats"]["fallback_batches"] == 0
        assert r["stats"]["steps"] == f["stats"]["steps"] == STEPS  # the counters travelled with the state
        assert r["stats"]["regions"] == f["stats"]["regions"] >= 2


@pytest.mark.slow
def test_one_process_with_accumulation_resumes_with_the_batches_of_an_uninterrupted_fit(
    local_server: RunningServer, tmp_path: Path
) -> None:
    run = {"devices": 1, "accumulation": 2, "batch": 32}
    full = _run(tmp_path, local_server.target, "full", **run)
    head = _run(tmp_path, local_server.target, "first", **run)
    rest = _run(tmp_path, local_server.target, "rest", **run)
    _check_resume(full, head, rest)
    assert all(len(ids) == 32 for ids in full[0]["ids"].values())  # one coreset batch per optimizer step
    assert local_server.manager.totals()["sessions"] == 0  # both finished fits closed their session


@pytest.mark.slow
def test_two_cpu_processes_under_the_ddp_strategy_share_each_step_and_resume(
    local_server: RunningServer, tmp_path: Path
) -> None:
    run = {"devices": 2, "accumulation": 2, "batch": 32}
    full = _run(tmp_path, local_server.target, "full", **run)
    head = _run(tmp_path, local_server.target, "first", **run)
    rest = _run(tmp_path, local_server.target, "rest", **run)
    _check_resume(full, head, rest)
    assert full[0]["digest"] == full[1]["digest"]  # DDP kept the replicas identical
    assert full[0]["stats"]["sessions_opened"] == 1  # rank 0's session, mirrored
    for step, ids in full[0]["ids"].items():  # each rank its own share of the step's coreset batch
        other = full[1]["ids"][step]
        assert ids and other and not set(ids) & set(other), step


# -- in-process: a short fit, and bad use --------------------------------------------------------------------------


class Classifier(pl.LightningModule):
    def __init__(self, net: torch.nn.Module | None = None) -> None:
        super().__init__()
        self.net = net or SmallCNN()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        x, y, w = batch
        return weighted_loss(self(x), y, w)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


class Unlabelled(Dataset):
    def __init__(self) -> None:
        self.images = FashionMNIST("train", limit=200).images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]


def _fit(model: pl.LightningModule, data: CoresetDataModule, steps: int = 3) -> pl.Trainer:
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(model, datamodule=data)
    return trainer


def _config(**kwargs: object) -> LoaderConfig:
    return loader_settings(subset_fraction=0.2, num_subsets=1, first_batch_timeout_s=5.0, deadline_s=30.0, **kwargs)


def test_a_short_fit_trains_on_coresets_from_the_server(local_server: RunningServer) -> None:
    data = CoresetDataModule(
        FashionMNIST("train", limit=200), local_server.target, batch_size=16, loader_config=_config(steps_per_round=2)
    )
    trainer = _fit(Classifier(), data)
    assert data.loader is not None
    assert trainer.global_step == 3 and data.loader.stats.steps == 3 and data.loader.stats.fallback_batches == 0
    assert local_server.manager.totals()["sessions"] == 0  # closed at teardown


def test_a_fit_logs_the_loaders_counters_to_its_loggers(local_server: RunningServer, tmp_path: Path) -> None:
    data = CoresetDataModule(
        FashionMNIST("train", limit=200), local_server.target, batch_size=16, loader_config=_config(steps_per_round=2)
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=6,
        logger=CSVLogger(tmp_path),
        log_every_n_steps=2,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(Classifier(), datamodule=data)
    with open(Path(trainer.logger.log_dir) / "metrics.csv") as f:  # type: ignore[union-attr]
        rows = [r for r in csv.DictReader(f) if r.get("crest/regions")]
    assert [int(r["step"]) for r in rows] == [0, 2, 4]
    assert all(float(r["crest/fallback_batches"]) == 0 for r in rows) and float(rows[-1]["crest/regions"]) >= 1
    assert {"crest/service_errors", "crest/coreset_wait_s", "crest/embed_s", "crest/input_wait_s"} <= set(rows[0])


class MainReads(Dataset):
    """Fashion-MNIST examples, counting those read in the process that built the dataset."""

    def __init__(self) -> None:
        self.data, self.main = FashionMNIST("train", limit=200), os.getpid()
        self.targets, self.main_reads = self.data.targets, 0

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        self.main_reads += os.getpid() == self.main
        return self.data[i]


def _fit_steps(target: str, workers: int) -> tuple[list[list[int]], int, CoresetDataModule]:
    """6 steps with ``num_workers=workers``: each training forward's ids, the examples read in this process."""
    torch.manual_seed(0)
    dataset = MainReads()
    data = CoresetDataModule(
        dataset, target, batch_size=16, loader_config=_config(steps_per_round=2), num_workers=workers
    )
    model = Classifier()
    steps: list[list[int]] = []
    model.net.register_forward_pre_hook(
        lambda m, _: steps.append(data.loader.last_ids.tolist()) if m.training and data.loader else None
    )
    _fit(model, data, steps=6)
    return steps, dataset.main_reads, data


def test_a_fit_with_workers_reads_every_example_in_them(local_server: RunningServer) -> None:
    """num_workers=2: the coreset batches and the embedding pass's examples are read in worker processes, and the
    fit trains on the steps of a fit without workers."""
    plain, plain_reads, _ = _fit_steps(local_server.target, 0)
    ahead, reads, data = _fit_steps(local_server.target, 2)
    assert plain_reads > 0 and reads == 0
    assert len(ahead) == 6 and ahead == plain
    assert data.loader is not None and data.loader.stats.fallback_batches == 0 and data.loader.stats.regions >= 2


def test_a_model_without_logits_is_refused(local_server: RunningServer) -> None:
    features = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10), torch.nn.Flatten(0))  # (n·10,)
    dataset = FashionMNIST("train", limit=200)
    data = CoresetDataModule(dataset, local_server.target, batch_size=16, loader_config=_config())
    with pytest.raises(TypeError, match=r"Classifier returned logits of shape \(\d+,\) for \d+ targets"):
        _fit(Classifier(features), data)


def test_a_dataset_without_labels_is_refused(local_server: RunningServer) -> None:
    data = CoresetDataModule(Unlabelled(), local_server.target, batch_size=16, loader_config=_config())
    with pytest.raises(ValueError, match="cannot find the class labels of a dataset whose examples are Tensor"):
        _fit(Classifier(), data)


def test_an_unreachable_endpoint_raises_in_strict_mode() -> None:
    data = CoresetDataModule(
        FashionMNIST("train", limit=200), "127.0.0.1:1", batch_size=16, loader_config=_config(strict=True)
    )
    with pytest.raises(SelectionUnavailable, match=r"127\.0\.0\.1:1"):
        _fit(Classifier(), data)


def test_training_logits_are_refused_not_ignored() -> None:
    config = _config(embedding_max_age=4, training_logits=True)
    with pytest.raises(ValueError, match=r"CoresetDataModule does not hand the loader .* \(received True\)"):
        CoresetDataModule(FashionMNIST("train", limit=200), "127.0.0.1:1", batch_size=16, loader_config=config)


def test_import_trainer_client_loads_no_framework_and_a_missing_extra_is_named() -> None:
    light = "import sys, trainer_client, trainer_client.integrations; print('lightning' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", light], capture_output=True, text=True, env=ENV, check=True)
    assert out.stdout.strip() == "False"
    missing = "import sys; sys.modules['lightning'] = None; import trainer_client.integrations.lightning"
    out = subprocess.run([sys.executable, "-c", missing], capture_output=True, text=True, env=ENV, check=False)
    assert out.returncode != 0 and "pip install '.[lightning]'" in out.stderr, out.stderr[-2000:]


def test_a_fit_measures_the_payoff_on_its_probe_set_and_logs_it(local_server: RunningServer, tmp_path: Path) -> None:
    payoff = {"payoff": "measure", "payoff_segment_steps": 2, "payoff_every": 4}
    config = _config(steps_per_round=2, **payoff)
    train = FashionMNIST("train", limit=200)
    with pytest.raises(ValueError, match="payoff_probe=dataset"):
        CoresetDataModule(train, local_server.target, batch_size=16, loader_config=config)
    probe = FashionMNIST("test", limit=40)
    data = CoresetDataModule(train, local_server.target, batch_size=16, loader_config=config, payoff_probe=probe)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=17, logger=CSVLogger(tmp_path), log_every_n_steps=16,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
    )  # fmt: skip
    trainer.fit(Classifier(), datamodule=data)
    assert data.loader is not None and data.loader.stats.payoff_measurements == 2
    with open(Path(trainer.logger.log_dir) / "metrics.csv") as f:  # type: ignore[union-attr]
        rows = [r for r in csv.DictReader(f) if r.get("crest/regions")]
    assert [int(r["step"]) for r in rows] == [0, 16]
    assert float(rows[-1]["crest/payoff_measurements"]) == 2 and float(rows[-1]["crest/control_steps"]) == 4
    assert float(rows[-1]["crest/payoff_per_second"]) == pytest.approx(data.loader.stats.payoff_per_second)
