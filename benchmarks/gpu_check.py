"""The GPU check: one call that proves the GPU path on a CUDA machine, and runs its CPU parts anywhere.

    python -m crest_bench.gpu_check --out benchmarks/results/gpu_check_<gpu>_<date>.json

It runs, in order:

1. the GPU tests (``tests/test_gpu.py``, FAISS on the GPU against the CPU; ``tests/test_gpu_path.py``, the loader's
   passes with a half-precision model, tensor labels, state loaded with ``map_location``, an RNN's fit) from a source
   checkout;
2. the demo's CNN trained on the device for ``--steps`` steps through a ``crest serve`` started here, with the
   recommended recipe, and the same number of full-data steps from a plain ``DataLoader``;
3. a 2-process NCCL DDP job (``examples/ddp_train.py`` under torchrun) when the machine has two GPUs.

It prints and writes a JSON of what it measured: step times, the embedding pass's share of the CREST run, the
trainer's wait, test accuracy, the GPU memory peak, and the FAISS path the service's selection took. On a machine
without CUDA the GPU parts are recorded as skipped with the reason, and the training runs on the CPU, so
``make test`` keeps the script itself working (tests/test_gpu_check.py).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from selector_service.process import spawn_service
from trainer_client import LoaderConfig, SelectionClient
from trainer_client.data import FashionMNIST
from trainer_client.models import SmallCNN
from trainer_client.train import TrainConfig, evaluate, pick_device, train

ROOT = Path(__file__).resolve().parent.parent  # the source checkout, when run from one
GPU_TESTS = ("tests/test_gpu.py", "tests/test_gpu_path.py")


def _faiss_gpus() -> int | str:
    """The GPUs FAISS uses in a process like the service's, or why none can be counted here."""
    from selector_service.errors import MissingExtra
    from selector_service.similarity import num_gpus

    try:
        return num_gpus()
    except MissingExtra as exc:
        return str(exc)


def run_gpu_tests(timeout_s: float) -> dict[str, Any]:
    """pytest on the GPU test files of a source checkout: its exit status and summary line."""
    files = [str(ROOT / f) for f in GPU_TESTS]
    if not all(Path(f).is_file() for f in files):
        return {"skipped": f"not a source checkout: {', '.join(GPU_TESTS)} are not under {ROOT}"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", *files]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, cwd=ROOT, check=False)
    lines = proc.stdout.strip().splitlines()
    return {"returncode": proc.returncode, "summary": lines[-1] if lines else "", "tail": proc.stdout[-3000:]}


def _memory_peak(device: torch.device) -> int | None:
    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def run_crest(target: str, device: torch.device, steps: int, train_limit: int | None) -> dict[str, Any]:
    """The demo's CNN trained on ``device`` with the recommended recipe, through the service at ``target``."""
    _reset_peak(device)
    config = TrainConfig(steps=steps, loader=LoaderConfig(), train_limit=train_limit, device=str(device))
    with SelectionClient(target, timeout_s=60) as client:
        client.wait_ready(timeout_s=120)
        result = train(config, client)
    return {
        "test_accuracy": result.test_accuracy,
        "wall_s": result.wall_s,
        "step_ms": 1000 * result.wall_s / max(result.steps, 1),
        "embed_share": result.embed_s / result.wall_s if result.wall_s else None,
        "wait_share": result.wait_s / result.wall_s if result.wall_s else None,
        "wait_s": result.wait_s,
        "fit_s": result.fit_s,
        "check_s": result.check_s,
        "rounds": result.rounds,
        "fallback_batches": result.fallback_batches,
        "service_errors": result.service_errors,
        "memory_peak_bytes": _memory_peak(device),
    }


def run_full(device: torch.device, steps: int, train_limit: int | None) -> dict[str, Any]:
    """The same CNN and schedule on full data (a shuffled plain DataLoader), the same number of steps."""
    torch.manual_seed(0)
    _reset_peak(device)
    train_set, test_set = FashionMNIST("train", limit=train_limit), FashionMNIST("test")
    model = SmallCNN().to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    loader = DataLoader(train_set, batch_size=LoaderConfig().batch_size, shuffle=True, pin_memory=device.type == "cuda")
    start, done = time.perf_counter(), 0
    while done < steps:
        for x, y in loader:
            loss = F.cross_entropy(model(x.to(device, non_blocking=True)), y.to(device, non_blocking=True))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
            done += 1
            if done == steps:
                break
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall = time.perf_counter() - start
    return {
        "test_accuracy": evaluate(model, test_set.images, test_set.targets),
        "wall_s": wall,
        "step_ms": 1000 * wall / steps,
        "memory_peak_bytes": _memory_peak(device),
    }


def run_ddp(target: str, steps: int, timeout_s: float) -> dict[str, Any]:
    """``examples/ddp_train.py`` on two ranks (NCCL on two GPUs)."""
    if torch.cuda.device_count() < 2:
        return {"skipped": f"needs 2 CUDA devices; torch sees {torch.cuda.device_count()}"}
    example = ROOT / "examples" / "ddp_train.py"
    if not example.is_file():
        return {"skipped": f"not a source checkout: {example} is missing"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(example)]
    cmd += ["--steps", str(steps), "--endpoint", target]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
    return {
        "returncode": proc.returncode,
        "wall_s": time.perf_counter() - start,
        "tail": (proc.stdout + proc.stderr)[-3000:],
    }


def machine(device: torch.device) -> dict[str, Any]:
    out: dict[str, Any] = {
        "device": str(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        out.update(gpu=props.name, gpu_memory_bytes=int(props.total_memory), gpus=torch.cuda.device_count())
        out["bf16"] = torch.cuda.is_bf16_supported()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300, help="training steps of each run; default 300")
    p.add_argument("--train-limit", type=int, default=None, help="use only the first N training examples")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu or cuda[:N]")
    p.add_argument("--no-tests", action="store_true", help="skip the GPU test files (make test runs them already)")
    p.add_argument("--out", default=None, help="write the JSON here too")
    args = p.parse_args(argv)
    device = pick_device(args.device)
    report: dict[str, Any] = {"machine": machine(device), "steps": args.steps, "train_limit": args.train_limit}
    report["tests"] = {"skipped": "--no-tests"} if args.no_tests else run_gpu_tests(timeout_s=300)
    if device.type != "cuda":
        report["cuda"] = f"skipped: torch {torch.__version__} sees no CUDA device; the runs below are on the CPU"
    faiss_gpus = _faiss_gpus()
    report["faiss"] = {
        "gpus_here": faiss_gpus,
        "path": "GPU (one device per selector process)" if faiss_gpus == 1 else "CPU (no GPU FAISS here)",
        "note": "the demo's per-class groups are small: they take the dense kernel, not FAISS kNN; "
        "tests/test_gpu.py runs the FAISS kNN and IVF paths on the GPU",
    }
    serve = ["--backend", "local", "--num-workers", "2", "--port", "0"]
    with spawn_service(serve, log_level="WARNING") as service:
        report["crest"] = run_crest(service.target, device, args.steps, args.train_limit)
        report["full_data"] = run_full(device, args.steps, args.train_limit)
        report["ddp_nccl"] = run_ddp(service.target, min(args.steps, 200), timeout_s=300)
    crest, full = report["crest"], report["full_data"]
    report["crest_step_time_ratio"] = crest["step_ms"] / full["step_ms"]
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    failed = report["tests"].get("returncode", 0) != 0 or report["ddp_nccl"].get("returncode", 0) != 0
    return 1 if failed or crest["fallback_batches"] or crest["service_errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
