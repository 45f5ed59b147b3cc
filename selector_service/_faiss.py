"""Lazy FAISS import. faiss ships in the mutually exclusive extras ``[cpu]`` and ``[gpu]``."""

from __future__ import annotations

import functools
from types import ModuleType

from selector_service.errors import SELECTOR_INSTALL, MissingExtra


@functools.cache
def faiss() -> ModuleType:
    """Return the faiss module, or raise ``MissingExtra`` naming the extra to install."""
    try:
        import faiss as _faiss
    except ImportError as exc:
        raise MissingExtra(f"faiss is not installed; {SELECTOR_INSTALL}") from exc
    return _faiss


def num_gpus() -> int:
    """Number of GPUs FAISS can use (0 with faiss-cpu, or faiss-gpu on a machine without a GPU)."""
    f = faiss()
    return int(f.get_num_gpus()) if hasattr(f, "get_num_gpus") else 0
