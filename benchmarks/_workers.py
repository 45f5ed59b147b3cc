"""Long-lived benchmark workers: each library in its own process, answering timing requests on a pipe.

A parent that alternates its requests between the libraries times them in the same stretches of time, so a
slow minute on a shared box moves every library's figure instead of one library's.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
from collections.abc import Callable
from typing import Any


class WorkerFailed(RuntimeError):
    """A worker did not answer: it timed out, died, or reported an exception (the message says which)."""


class Worker:
    """Runs ``target(*args, conn)`` in a fresh spawned process; ``target`` answers each request with a dict,
    or with ``{"error": ...}``, and returns when it receives ``None``."""

    def __init__(self, target: Callable[..., None], args: tuple[Any, ...], timeout_s: float) -> None:
        ctx = mp.get_context("spawn")
        self.timeout_s = timeout_s
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=target, args=(*args, child), daemon=True)
        self.proc.start()
        child.close()

    def receive(self) -> dict[str, Any]:
        """The worker's next answer; ``WorkerFailed`` when there is none within ``timeout_s`` or it is an error."""
        if not self.conn.poll(self.timeout_s):
            raise WorkerFailed(f"no answer within {self.timeout_s:.0f} s")
        try:
            reply: dict[str, Any] = self.conn.recv()
        except EOFError as exc:
            self.proc.join(timeout=10)
            raise WorkerFailed(
                f"worker exited with code {self.proc.exitcode} before answering (out of memory?)"
            ) from exc
        if "error" in reply:
            raise WorkerFailed(reply["error"])
        return reply

    def ask(self, request: Any) -> dict[str, Any]:
        self.conn.send(request)
        return self.receive()

    def close(self) -> None:
        """Ask the worker to exit; kill it if it has not within 10 s."""
        with contextlib.suppress(OSError):  # the worker may be gone already
            self.conn.send(None)
        self.proc.join(timeout=10)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()
        self.conn.close()


def serve(conn: Any, answer: Callable[[Any], dict[str, Any]]) -> None:
    """Worker side: answer requests until ``None``; an exception is sent back as ``{"error": ...}``."""
    try:
        while (request := conn.recv()) is not None:
            conn.send(answer(request))
    except BaseException as exc:
        conn.send({"error": f"{type(exc).__name__}: {exc}"})
