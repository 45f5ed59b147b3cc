"""`crest serve` in a child process: started, awaited until it serves, stopped. Used by `crest demo`, the
benchmarks and the process-level tests."""

from __future__ import annotations

import queue
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from typing import IO

READY_PREFIX = "READY "


def _pump(stream: IO[str] | None, lines: queue.Queue[str]) -> None:
    """Forward a child's stdout lines into ``lines`` (in a thread, so the reader can time out)."""
    for line in stream or ():
        lines.put(line)


class ServiceProcess:
    """A running ``crest serve`` child; ``target`` is the HOST:PORT it printed once serving."""

    def __init__(self, proc: subprocess.Popen[str], target: str) -> None:
        self.proc, self.target = proc, target

    def stop(self, timeout_s: float = 30.0) -> int:
        """SIGTERM (graceful), SIGKILL after ``timeout_s``; returns the exit status."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                return self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()

    def __enter__(self) -> ServiceProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def spawn_service(
    serve_args: Sequence[str],
    *,
    log_level: str = "WARNING",
    env: Mapping[str, str] | None = None,
    timeout_s: float = 120.0,
    stderr: IO[str] | None = None,
) -> ServiceProcess:
    """Start ``crest serve <serve_args>`` and wait until it prints ``READY host:port``.

    The child logs on ``stderr`` (an open file; default: this process's stderr). Raises ``RuntimeError`` naming
    what the child printed (or that it printed nothing) when it is not serving in ``timeout_s``; the child is
    stopped then. Serving includes the warm-up of the selection kernels: seconds on a fresh numba cache.
    """
    cmd = [sys.executable, "-m", "selector_service.cli", "--log-level", log_level, "serve", *serve_args]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=stderr, text=True, env=None if env is None else dict(env)
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True).start()
    try:
        line = lines.get(timeout=timeout_s)
    except queue.Empty:
        ServiceProcess(proc, "").stop()
        raise RuntimeError(f"the selection service did not report ready within {timeout_s:.0f} s") from None
    if not line.startswith(READY_PREFIX):
        ServiceProcess(proc, "").stop()
        raise RuntimeError(f"unexpected output from the selection service: {line!r}")
    return ServiceProcess(proc, line[len(READY_PREFIX) :].strip())
