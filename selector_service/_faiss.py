"""Lazy FAISS import, and the GPUs this process may use. faiss ships in the mutually exclusive extras ``[cpu]`` and
``[gpu]``.

A process uses at most one GPU, with one FAISS resource object (a cuBLAS handle, temporary and pinned memory) kept
for its life: ``index_cpu_to_all_gpus`` would build new resources on every call and spread each index over every
visible GPU, a co-located trainer's included. A Ray selector actor calls ``use_gpus`` with what Ray reserved for
it, so an actor that reserved none searches on the CPU.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from types import ModuleType

from selector_service.errors import SELECTOR_INSTALL, MissingExtra

# FAISS's GPU k-selection takes k below this (GPU_MAX_SELECTION_K); a larger kNN search runs on the CPU.
GPU_MAX_K = 2048

_allowed: tuple[int, ...] | None = None  # devices this process may use; None: the first one FAISS sees


@functools.cache
def faiss() -> ModuleType:
    """Return the faiss module, or raise ``MissingExtra`` naming the extra to install."""
    try:
        import faiss as _faiss
    except ImportError as exc:
        raise MissingExtra(f"faiss is not installed; {SELECTOR_INSTALL}") from exc
    return _faiss


def use_gpus(devices: Sequence[int]) -> None:
    """Restrict this process's FAISS to ``devices`` (CUDA ordinals as this process sees them; empty: the CPU)."""
    global _allowed
    _allowed = tuple(int(d) for d in devices)


def num_gpus() -> int:
    """Number of GPUs this process's FAISS uses: 0 with faiss-cpu, faiss-gpu on a machine without a GPU, or a Ray
    actor that reserved none; else 1 (one device per process)."""
    f = faiss()
    seen = int(f.get_num_gpus()) if hasattr(f, "get_num_gpus") else 0
    usable = seen if _allowed is None else len([d for d in _allowed if d < seen])
    return min(usable, 1)


def gpu_device() -> int:
    """The CUDA ordinal this process's FAISS runs on (call only when ``num_gpus() > 0``)."""
    return 0 if not _allowed else _allowed[0]


@functools.cache
def gpu_resources(device: int) -> object:
    """The process's one ``StandardGpuResources`` for ``device``, built on first use and kept."""
    return faiss().StandardGpuResources()


def to_gpu(index: object) -> object:
    """``index`` copied to this process's GPU, on its kept resources."""
    device = gpu_device()
    return faiss().index_cpu_to_gpu(gpu_resources(device), device, index)
