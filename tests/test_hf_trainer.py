"""The Hugging Face integration against a real server: a tiny ViT (built from its config, no download) on
Fashion-MNIST under ``CoresetTrainer``, in one process and in two gloo processes under torchrun and under
``accelerate launch``; a checkpoint, a kill and a ``resume_from_checkpoint`` continue with the batches of an
uninterrupted run; bad use fails clearly."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers", reason="the hf extra is not installed")

from loader_settings import loader_settings
from torch.utils.data import Dataset
from transformers import TrainingArguments, ViTConfig, ViTForImageClassification, ViTModel

from selector_service.server import RunningServer
from trainer_client.data import FashionMNIST
from trainer_client.integrations.hf import LOADER_STATE_NAME, CoresetTrainer
from trainer_client.integrations.steps import split_batch
from trainer_client.loader import SelectionUnavailable

STEPS, SAVE_AT = 14, 6

# One worker for every run: phase "full" trains STEPS steps; "first" trains until the checkpoint at SAVE_AT and
# is killed there (SIGKILL, after every rank has saved); "rest" resumes from that checkpoint.
WORKER = textwrap.dedent(
    """
    import json, os, signal, sys
    import torch
    import torch.distributed as dist
    from torch.utils.data import Dataset
    from transformers import ResNetConfig, ResNetForImageClassification, TrainerCallback, TrainingArguments
    from trainer_client.data import FashionMNIST
    from trainer_client.integrations.hf import CoresetTrainer
    from trainer_client.loader import LoaderConfig
    from trainer_client.region import RegionConfig

    target, out, phase, run_dir = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
    steps, save_at, accumulation, per_device = (int(a) for a in sys.argv[5:9])
    rank = int(os.environ.get("RANK", "0"))
    out = out.format(rank=rank)
    torch.set_num_threads(1)

    class Pixels(Dataset):
        def __init__(self):
            self.data = FashionMNIST("train", limit=600)
        def __len__(self):
            return len(self.data)
        def __getitem__(self, i):
            x, y = self.data[i]
            return {"pixel_values": x, "labels": y}

    class Record(TrainerCallback):
        def __init__(self):
            self.ids = {}
        def on_step_end(self, args, state, control, **kwargs):
            self.ids[state.global_step] = trainer.coreset_loader.last_ids.tolist()
        def on_save(self, args, state, control, **kwargs):
            if phase == "first" and state.global_step == save_at:
                report(state.global_step)
                if dist.is_initialized():
                    dist.barrier()  # every rank has written its part of the checkpoint
                os.kill(os.getpid(), signal.SIGKILL)  # preempted: no cleanup, the session stays on the service

    def report(step):
        digest = float(sum(p.detach().double().sum() for p in trainer.model.parameters()))
        stats = vars(trainer.coreset_loader.stats)
        with open(out, "w") as f:
            json.dump({"ids": record.ids, "digest": digest, "stats": stats, "step": step}, f)

    torch.manual_seed(0)
    # A ResNet: transformers 5.24 resumes a ViT checkpoint with its weights missing (renamed keys).
    config = ResNetConfig(num_channels=1, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=10)
    model = ResNetForImageClassification(config)
    args = TrainingArguments(output_dir=run_dir, max_steps=steps, per_device_train_batch_size=per_device,
                             gradient_accumulation_steps=accumulation, learning_rate=2e-3, save_strategy="steps",
                             save_steps=save_at, report_to=[], logging_steps=1000, use_cpu=True, seed=0,
                             dataloader_pin_memory=False, disable_tqdm=True,
                             ddp_backend="gloo" if "WORLD_SIZE" in os.environ else None)
    loader_config = LoaderConfig.from_recipe("released", subset_fraction=0.1, num_subsets=2, lookahead_steps=1,
                                             region=RegionConfig(mode="fixed", steps_per_round=4), deadline_s=60.0)
    record = Record()
    trainer = CoresetTrainer(model=model, args=args, train_dataset=Pixels(), endpoint=target,
                             loader_config=loader_config, callbacks=[record])
    trainer.train(resume_from_checkpoint=True if phase == "rest" else None)
    report(trainer.state.global_step)
    if torch.distributed.is_initialized():  # gloo's threads must not outlive the interpreter
        torch.distributed.destroy_process_group()
    # They do under DDP (torch 2.13), and a rank then aborts now and then in the interpreter's teardown, after its
    # work ("terminate called without an active exception"; examples/ddp_train.py ends the same way).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
    """
)
ENV = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "GLOO_SOCKET_IFNAME": os.environ.get("GLOO_SOCKET_IFNAME", "lo")}


# accelerate's multi-process launch without MPI is its "multi-GPU" one, torch's elastic launcher whatever the device;
# the worker's TrainingArguments (use_cpu, ddp_backend="gloo") make it CPU gloo DDP. The config file is ours, so that
# the user's default (~/.cache/huggingface/accelerate) is never read; the flags give every other setting.
ACCELERATE_CONFIG = "compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_GPU\nuse_cpu: true\n"


def _launcher(name: str, world: int, tmp_path: Path) -> list[str]:
    """The command that starts ``world`` processes of a script: ``name`` is "torchrun" or "accelerate"."""
    if name == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}"]
    assert name == "accelerate", name
    config = tmp_path / "accelerate.yaml"
    config.write_text(ACCELERATE_CONFIG)
    launch = [sys.executable, "-m", "accelerate.commands.launch", f"--config_file={config}", "--multi_gpu"]
    return [*launch, f"--num_processes={world}", "--num_machines=1", "--main_process_port=0", "--mixed_precision=no"]


def _run(
    tmp_path: Path,
    target: str,
    phase: str,
    *,
    world: int,
    accumulation: int,
    per_device: int,
    launcher: str = "torchrun",
) -> list[dict]:
    """One phase on ``world`` processes (under ``launcher`` when more than one); each rank's report, in rank
    order."""
    script = tmp_path / "hf_worker.py"
    script.write_text(WORKER)
    run_dir = tmp_path / ("full" if phase == "full" else "resumed")
    out = tmp_path / f"{phase}-rank{{rank}}.json"
    launch = [sys.executable] if world == 1 else _launcher(launcher, world, tmp_path)
    args = [str(script), target, str(out), phase, str(run_dir), str(STEPS), str(SAVE_AT), str(accumulation)]
    proc = subprocess.run(
        [*launch, *args, str(per_device)], capture_output=True, text=True, env=ENV, timeout=300, check=False
    )
    logs = proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.returncode != 0 if phase == "first" else proc.returncode == 0, logs  # "first" is killed
    return [json.loads((tmp_path / f"{phase}-rank{r}.json").read_text()) for r in range(world)]


def _check_resume(full: list[dict], head: list[dict], rest: list[dict]) -> None:
    """The resumed run trained on the batches of the uninterrupted one, and ended with the same weights."""
    for f, h, r in zip(full, head, rest, strict=True):
        assert h["step"] == SAVE_AT and r["step"] == f["step"] == STEPS
        assert {k: h["ids"][k] for k in h["ids"]} == {k: f["ids"][k] for k in h["ids"]}
        after = {k: v for k, v in f["ids"].items() if int(k) > SAVE_AT}
        assert len(after) == STEPS - SAVE_AT and r["ids"] == after  # the next batches, not a fresh start
        assert r["digest"] == f["digest"]
        assert f["stats"]["fallback_batches"] == r["stats"]["fallback_batches"] == 0
        assert r["stats"]["steps"] == f["stats"]["steps"] == STEPS  # the counters travelled with the state
        assert r["stats"]["regions"] == f["stats"]["regions"] >= 2


@pytest.mark.slow
def test_one_process_with_accumulation_resumes_with_the_batches_of_an_uninterrupted_run(
    local_server: RunningServer, tmp_path: Path
) -> None:
    run = {"world": 1, "accumulation": 2, "per_device": 8}
    full = _run(tmp_path, local_server.target, "full", **run)
    head = _run(tmp_path, local_server.target, "first", **run)
    assert (tmp_path / "resumed" / f"checkpoint-{SAVE_AT}" / LOADER_STATE_NAME).is_file()
    rest = _run(tmp_path, local_server.target, "rest", **run)
    _check_resume(full, head, rest)
    # One coreset batch (2 x 8 examples) per optimizer step, and every batch came from the service.
    assert all(len(ids) == 16 for ids in full[0]["ids"].values())
    assert local_server.manager.totals()["sessions"] == 0  # both finished runs closed their session


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_two_gloo_processes_share_each_step_and_resume(
    local_server: RunningServer, tmp_path: Path, launcher: str
) -> None:
    run = {"world": 2, "accumulation": 2, "per_device": 8, "launcher": launcher}
    full = _run(tmp_path, local_server.target, "full", **run)
    head = _run(tmp_path, local_server.target, "first", **run)
    rest = _run(tmp_path, local_server.target, "rest", **run)
    _check_resume(full, head, rest)
    assert full[0]["digest"] == full[1]["digest"]  # DDP kept the replicas identical
    assert full[0]["stats"]["sessions_opened"] == 1  # rank 0's session, mirrored
    for step, ids in full[0]["ids"].items():  # each rank its own share of the step's coreset batch
        other = full[1]["ids"][step]
        assert ids and other and not set(ids) & set(other), step


# -- in-process: the pieces, and bad use ------------------------------------------------------------------------


class Pixels(Dataset):
    """Fashion-MNIST as Hugging Face dict examples; ``key`` None drops the label."""

    def __init__(self, limit: int = 200, key: str | None = "labels") -> None:
        self.data, self.key = FashionMNIST("train", limit=limit), key

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        x, y = self.data[i]
        return {"pixel_values": x} if self.key is None else {"pixel_values": x, self.key: y}


VIT = {
    "image_size": 28,
    "patch_size": 7,
    "num_channels": 1,
    "hidden_size": 16,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 32,
}


def _trainer(
    tmp_path: Path,
    model: torch.nn.Module,
    dataset: Dataset,
    endpoint: str,
    training: dict[str, object] | None = None,
    **kwargs: object,
) -> CoresetTrainer:
    """A ``CoresetTrainer`` of 3 steps of 16 examples (``training`` overrides the ``TrainingArguments``) on the
    released recipe with one subset of 20% (``kwargs`` override the loader settings)."""
    args = TrainingArguments(
        **{
            "output_dir": str(tmp_path),
            "max_steps": 3,
            "per_device_train_batch_size": 16,
            "report_to": [],
            "use_cpu": True,
            "save_strategy": "no",
            "disable_tqdm": True,
            "dataloader_pin_memory": False,
            **(training or {}),
        }
    )
    settings = {"subset_fraction": 0.2, "num_subsets": 1, "first_batch_timeout_s": 5.0, "deadline_s": 30.0}
    config = loader_settings(**{**settings, **kwargs})  # type: ignore[arg-type]
    return CoresetTrainer(model=model, args=args, train_dataset=dataset, endpoint=endpoint, loader_config=config)


def test_micro_batches_add_up_to_the_weighted_mean_of_the_step() -> None:
    torch.manual_seed(0)
    n = 11
    batch = {"x": torch.randn(n, 3), "labels": torch.arange(n) % 3, "weights": torch.rand(n) + 0.5}
    losses = torch.rand(n)
    whole = (losses * batch["weights"]).mean()
    parts = split_batch(batch, 3)
    assert [len(p["x"]) for p in parts] == [4, 4, 3]
    assert torch.equal(torch.cat([p["labels"] for p in parts]), batch["labels"])
    lo = 0
    accumulated = torch.tensor(0.0)
    for p in parts:  # what the Trainer does: each micro-batch's weighted mean, divided by the accumulation
        hi = lo + len(p["x"])
        accumulated += (losses[lo:hi] * p["weights"]).mean() / 3
        lo = hi
    torch.testing.assert_close(accumulated, whole)
    (single,) = split_batch((batch["x"], batch["labels"], batch["weights"]), 1)
    assert single[2] is batch["weights"]
    with pytest.raises(ValueError, match="fewer than the 12"):
        split_batch(batch, 12)


def test_a_short_run_trains_on_coresets_from_the_server(local_server: RunningServer, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = ViTForImageClassification(ViTConfig(**VIT, num_labels=10))
    trainer = _trainer(tmp_path, model, Pixels(), local_server.target, steps_per_round=2, lookahead_steps=0)
    trainer.train()
    stats = trainer.coreset_loader.stats
    assert stats.steps == 3 and stats.fallback_batches == 0 and stats.regions >= 1
    assert local_server.manager.totals()["sessions"] == 0  # closed when train() returned


class ReadBy(Pixels):
    """``Pixels`` that appends the id of every example it reads, and the reading process, to ``log``."""

    def __init__(self, log: Path) -> None:
        super().__init__()
        self.log = log
        self.targets = self.data.targets  # the labels without reading the examples

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        with self.log.open("a") as f:
            f.write(f"{os.getpid()} {i}\n")
        return super().__getitem__(i)


def _steps_read(tmp_path: Path, endpoint: str, workers: int) -> tuple[list[list[int]], set[int], CoresetTrainer]:
    """8 steps with ``dataloader_num_workers=workers``: each training forward's ids, and the pids that read them."""
    torch.manual_seed(0)
    model = ViTForImageClassification(ViTConfig(**VIT, num_labels=10))
    training = {"max_steps": 8, "dataloader_num_workers": workers}
    log = tmp_path / f"reads-{workers}.txt"
    trainer = _trainer(tmp_path, model, ReadBy(log), endpoint, training, steps_per_round=3)
    seen: list[list[int]] = []
    model.register_forward_pre_hook(
        lambda m, _: seen.append(trainer.coreset_loader.last_ids.tolist()) if m.training else None
    )
    trainer.train()
    return seen, {int(line.split()[0]) for line in log.read_text().splitlines()}, trainer


def test_dataloader_num_workers_fetch_the_coreset_batches_in_workers(
    local_server: RunningServer, tmp_path: Path
) -> None:
    """dataloader_num_workers=2: every example is read in a worker process, and every step trains on the ids of a
    run without workers."""
    plain, plain_readers, _ = _steps_read(tmp_path, local_server.target, 0)
    ahead, readers, trainer = _steps_read(tmp_path, local_server.target, 2)
    assert plain_readers == {os.getpid()} and os.getpid() not in readers and len(readers) == 2
    assert len(ahead) == 8 and ahead == plain
    stats = trainer.coreset_loader.stats
    assert stats.fallback_batches == 0 and stats.regions >= 2


def test_a_wrong_endpoint_is_loud_in_the_log_and_the_logged_metrics(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Nothing listens at the endpoint: the run trains on uniform batches (not strict), logs an ERROR that names
    the endpoint once 50 steps had no coreset, and the Trainer's logged metrics carry the fallback count."""
    torch.manual_seed(0)
    model = ViTForImageClassification(ViTConfig(**VIT, num_labels=10))
    training = {"max_steps": 55, "logging_steps": 5}
    trainer = _trainer(tmp_path, model, Pixels(), "127.0.0.1:1", training, reconnect_initial_s=0.01)
    with caplog.at_level(logging.ERROR, logger="trainer_client"):
        trainer.train()
    stats = trainer.coreset_loader.stats
    assert stats.fallback_batches == 55 and stats.regions == 0 and stats.service_errors >= 1
    (error,) = [r.getMessage() for r in caplog.records if "no coreset yet" in r.getMessage()]
    assert "all 50 batches so far were uniform fallbacks" in error and "127.0.0.1:1" in error
    assert "UNAVAILABLE" in error and "CREST_AUTH_TOKEN" in error
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["crest/fallback_batches"] for h in logged] == [5.0 * k for k in range(1, 12)]
    assert all(h["crest/regions"] == 0 and h["crest/service_errors"] >= 1 for h in logged)


def test_a_short_run_logs_the_loaders_counters(local_server: RunningServer, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = ViTForImageClassification(ViTConfig(**VIT, num_labels=10))
    training = {"max_steps": 4, "logging_steps": 2}
    trainer = _trainer(tmp_path, model, Pixels(), local_server.target, training, steps_per_round=2)
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 2 and all(h["crest/fallback_batches"] == 0 for h in logged)
    assert logged[-1]["crest/regions"] >= 1 and logged[-1]["crest/embed_s"] > 0
    assert {"crest/coreset_wait_s", "crest/input_wait_s", "crest/service_errors"} <= set(logged[-1])


def test_a_model_without_logits_is_refused_by_name(local_server: RunningServer, tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, ViTModel(ViTConfig(**VIT)), Pixels(), local_server.target)
    with pytest.raises(TypeError, match="ViTModel returned no logits"):
        trainer.train()


def test_a_dataset_without_labels_is_refused(local_server: RunningServer, tmp_path: Path) -> None:
    model = ViTForImageClassification(ViTConfig(**VIT, num_labels=10))
    trainer = _trainer(tmp_path, model, Pixels(key=None), local_server.target)
    with pytest.raises(ValueError, match=r"no class label: example 0 has keys \['pixel_values'\]"):
        trainer.train()


def test_an_unreachable_endpoint_raises_in_strict_mode(tmp_path: Path) -> None:
    model = ViTForImageClassification(ViTConfig(**VIT, num_labels=10))
    trainer = _trainer(tmp_path, model, Pixels(), "127.0.0.1:1", strict=True)
    with pytest.raises(SelectionUnavailable, match=r"127\.0\.0\.1:1"):
        trainer.train()


def test_the_quadratic_model_is_fitted_in_the_trainers_micro_batches(
    local_server: RunningServer, tmp_path: Path
) -> None:
    """With gradient accumulation the loader's batch is the whole step's (4 x 8 here); the fit's forward and double
    backward run on the Trainer's micro-batch, which is what the device was sized for."""
    torch.manual_seed(0)
    model = ViTForImageClassification(ViTConfig(**VIT, num_labels=10))
    sizes: list[int] = []
    model.register_forward_pre_hook(
        lambda m, args, kwargs: (
            sizes.append(len(kwargs["pixel_values"])) if not m.training and torch.is_grad_enabled() else None
        ),
        with_kwargs=True,
    )
    training = {"max_steps": 4, "per_device_train_batch_size": 8, "gradient_accumulation_steps": 4}
    trainer = _trainer(tmp_path, model, Pixels(), local_server.target, training, num_subsets=2)
    trainer.train()
    loader = trainer.coreset_loader
    assert loader.config.batch_size == 32 and loader.config.fit_batch_size == 8
    assert loader.controller.stats.fits >= 1 and sizes and max(sizes) == 8


def test_a_loader_batch_size_other_than_the_trainers_is_refused(local_server: RunningServer, tmp_path: Path) -> None:
    model = ViTForImageClassification(ViTConfig(**VIT, num_labels=10))
    trainer = _trainer(tmp_path, model, Pixels(), local_server.target, batch_size=7)
    with pytest.raises(ValueError, match=r"loader_config\.batch_size is 7, the Trainer's total train batch size 16"):
        trainer.train()


def test_training_logits_are_refused_not_ignored(tmp_path: Path) -> None:
    model = ViTForImageClassification(ViTConfig(**VIT, num_labels=10))
    with pytest.raises(ValueError, match=r"CoresetTrainer does not hand the loader .* \(received True\)"):
        _trainer(tmp_path, model, Pixels(), "127.0.0.1:1", embedding_max_age=4, training_logits=True)


@pytest.mark.slow
def test_bench_integrations_quick_reports_each_frameworks_ratios(tmp_path: Path) -> None:
    pytest.importorskip("lightning", reason="the lightning extra is not installed")
    out = tmp_path / "integrations.json"
    cmd = [sys.executable, "-m", "crest_bench.cli", "bench", "integrations", "--quick", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())["results"]
    for framework in ("hf", "lightning"):
        r = results[framework]
        assert r["plain"]["ratio_to_plain"] == 1.0 and r["plain"]["measured_steps"] > 0
        assert r["uniform"]["ratio_to_plain"] > 0 and r["crest"]["ratio_to_plain"] > 0
        assert r["crest"]["embedding_ms_per_step"] > 0 and r["crest"]["fallback_batches"] == 0
        # Every block holds a round started after its warm-up: the round's first steps are timed by position.
        cost = r["crest"]["round_cost"]
        assert sorted(cost["extra_ms_by_position"]) == ["0", "1", "2", "3"] and cost["settled_median_ms"] > 0
        assert cost["five_percent_at_step_ms"] >= 0
        assert f"{framework}: plain" in proc.stdout and f"{framework}, a round's first steps" in proc.stdout


def test_import_trainer_client_loads_no_framework_and_a_missing_extra_is_named() -> None:
    light = "import sys, trainer_client, trainer_client.integrations; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", light], capture_output=True, text=True, env=ENV, check=True)
    assert out.stdout.strip() == "False"
    missing = "import sys; sys.modules['transformers'] = None; import trainer_client.integrations.hf"
    out = subprocess.run([sys.executable, "-c", missing], capture_output=True, text=True, env=ENV, check=False)
    assert out.returncode != 0 and "pip install '.[hf]'" in out.stderr, out.stderr[-2000:]


def test_the_payoff_is_measured_on_the_eval_dataset_and_logged(local_server: RunningServer, tmp_path: Path) -> None:
    """``payoff="measure"`` with no probe given takes the eval_dataset's first examples; after two measurements the
    Trainer's logs carry selection's speedup per second and its interval."""
    torch.manual_seed(0)
    model = ViTForImageClassification(ViTConfig(**VIT, num_labels=10))
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=17, logging_steps=17, per_device_train_batch_size=16, report_to=[],
        use_cpu=True, save_strategy="no", disable_tqdm=True, dataloader_pin_memory=False,
    )  # fmt: skip
    payoff = {"payoff": "measure", "payoff_segment_steps": 2, "payoff_every": 4}
    config = loader_settings(subset_fraction=0.2, num_subsets=1, steps_per_round=2, **payoff)  # type: ignore[arg-type]
    trainer = CoresetTrainer(
        model=model, args=args, train_dataset=Pixels(), eval_dataset=Pixels(limit=40), endpoint=local_server.target,
        loader_config=config,
    )  # fmt: skip
    trainer.train()
    stats = trainer.coreset_loader.stats
    assert stats.payoff_measurements == 2 and stats.control_steps == 4 and stats.fallback_batches == 0
    (logged,) = [h for h in trainer.state.log_history if "loss" in h]
    assert logged["crest/payoff_measurements"] == 2 and logged["crest/control_steps"] == 4
    assert logged["crest/payoff_per_second"] == stats.payoff_per_second and logged["crest/probe_s"] > 0
    assert {"crest/payoff_per_second_lo", "crest/payoff_per_second_hi", "crest/payoff_on_control"} <= set(logged)
    with pytest.raises(ValueError, match=r"payoff_probe=dataset .* or an eval_dataset"):
        CoresetTrainer(model=model, args=args, train_dataset=Pixels(), endpoint="127.0.0.1:1", loader_config=config)
