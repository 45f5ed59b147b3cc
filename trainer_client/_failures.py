"""How the trainer reads a failed call to the selection service: one table from gRPC status to a kind.

The stream thread (``_stream.py``) resumes a broken stream on a ``TRANSIENT`` failure only; the service link
(``_link.py``) decides from the kind whether to fall back, reopen the session, count the failure or raise.
"""

from __future__ import annotations

import enum
import re

import grpc


class Failure(enum.Enum):
    """What a failed call says about the service, and so what the trainer does about it."""

    # The service or the network is down, slow or busy, or a stream broke: the same call may succeed later.
    # The stream is resumed from the subsets received; a round is retried after a backoff, on uniform batches.
    TRANSIENT = "transient"
    # NOT_FOUND: the service no longer has the session (it restarted without its state): open a new one.
    SESSION_LOST = "session lost"
    # The service failed on its side and will fail the same way again (a selector that cannot import faiss,
    # a bug): retrying only hides it. Logged as an error and counted; repeated, it stops the run.
    PERSISTENT = "persistent"
    # The service refused the request itself (a wrong argument, a bad token, an rpc it does not have), or the
    # error is not the service's at all (a bug in this process): raised at once, as retrying cannot help.
    FATAL = "fatal"


KIND_OF: dict[grpc.StatusCode, Failure] = {
    grpc.StatusCode.UNAVAILABLE: Failure.TRANSIENT,
    grpc.StatusCode.DEADLINE_EXCEEDED: Failure.TRANSIENT,
    grpc.StatusCode.CANCELLED: Failure.TRANSIENT,  # a stream cut by a proxy, or a session closed mid-stream
    grpc.StatusCode.RESOURCE_EXHAUSTED: Failure.TRANSIENT,  # too many rounds or sessions in flight for now
    grpc.StatusCode.ABORTED: Failure.TRANSIENT,
    grpc.StatusCode.NOT_FOUND: Failure.SESSION_LOST,
    grpc.StatusCode.INTERNAL: Failure.PERSISTENT,
    grpc.StatusCode.UNKNOWN: Failure.PERSISTENT,  # an exception the service did not map: a bug there
    grpc.StatusCode.DATA_LOSS: Failure.PERSISTENT,
}  # every other code (INVALID_ARGUMENT, FAILED_PRECONDITION, UNAUTHENTICATED, UNIMPLEMENTED, ...) is FATAL

# Round numbers, counts and session ids (uuid4 hex) in a message change from one attempt to the next.
_VARYING = re.compile(r"[0-9a-f]{32}|\d+")


def kind_of(exc: BaseException) -> Failure:
    """The kind of ``exc``: by its status code for a ``grpc.RpcError``, ``FATAL`` for anything else."""
    if not isinstance(exc, grpc.RpcError):
        return Failure.FATAL
    return KIND_OF.get(exc.code(), Failure.FATAL)


def signature(exc: grpc.RpcError) -> tuple[str, str]:
    """(status code name, details with their numbers and session ids masked): equal for two failures that are
    the same failure of two rounds ("selection of round 3 of session 9f.. failed: ..." and of round 4)."""
    return exc.code().name, _VARYING.sub("#", exc.details() or "")


def describe(exc: BaseException) -> str:
    """``CODE: details`` of a failed call, or the exception's type and message."""
    if isinstance(exc, grpc.RpcError):
        return f"{exc.code().name}: {exc.details()}"
    return f"{type(exc).__name__}: {exc}"
