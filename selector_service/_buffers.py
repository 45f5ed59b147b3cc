"""Reuse of the dense kernel's memory between selections.

A fresh n x n array pays a page fault and a kernel zero-fill per page on first touch: for the 200 MB fixed-point
kernel of 10,000 points that measured 0.02-0.3 s on the 2-core box, up to half of the whole selection. A selector
runs the same group sizes round after round, so the engine keeps the last kernel's memory for the next call, like
torch's caching allocator. At most one idle buffer is held (the largest seen, at most 2 x DENSE_MAX^2 bytes =
512 MiB); ``release()`` drops it.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import numpy as np

_lock = threading.Lock()
_idle: np.ndarray | None = None


@contextlib.contextmanager
def borrowed(n: int) -> Iterator[np.ndarray]:
    """A uint16 (n, n) C-contiguous array with arbitrary content, returned to the pool on exit.

    Callers must not keep a reference to it after the ``with`` block. Concurrent callers each get their own.
    """
    global _idle
    with _lock:
        flat, _idle = _idle, None
    if flat is None or flat.size < n * n:
        flat = np.empty(n * n, dtype=np.uint16)
    try:
        yield flat[: n * n].reshape(n, n)
    finally:
        with _lock:
            if _idle is None or _idle.size < flat.size:
                _idle = flat


def release() -> None:
    """Drop the idle buffer, returning its memory."""
    global _idle
    with _lock:
        _idle = None
