"""The in-process transport of ``crest.selector.v1.api.SelectionService``: the service's sessions and selection
engine in the trainer's process, with no server.

    from selector_service import InProcessSelection
    loader = CoresetLoader(dataset, model, InProcessSelection(), labels)

Each call goes to the ``SessionManager`` that ``crest serve`` runs behind its gRPC servicer, so a session draws
the same subsets and selects the same coresets as over gRPC for the same seed; selection runs on the backend's
threads (``LocalBackend``, by default), beside the trainer's loader thread. Errors are the service's own,
turned into the status the servicer would answer (``servicer.status_of``) and raised as ``CallError``: the
loader's failure policy sees the same codes on both transports.

What only the service gives: several trainer ranks or jobs sharing selectors, selectors on other machines (Ray),
a session that outlives the trainer process (``--state-dir``), provenance and Prometheus metrics, and a selector
failure isolated from the training process.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import numpy as np

from crest.selector.v1 import codec
from crest.selector.v1 import selector_pb2 as pb
from crest.selector.v1.api import CallError, RoundPlan, SessionInfo, TrainerReport, WeightedBatch
from crest.selector.v1.settings import SelectionSettings
from selector_service.backends import make_backend
from selector_service.errors import InvalidArgument
from selector_service.manager import SessionManager
from selector_service.rounds import EmbeddingPart
from selector_service.servicer import snapshot_to_proto, status_of
from selector_service.session import Limits, SessionConfig

log = logging.getLogger(__name__)

__all__ = ["InProcessSelection"]

T = TypeVar("T")

# The client name an in-process session is owned by (for Limits.max_sessions_per_client).
OWNER = "in-process"


def _as_call_error(fn: Callable[..., T]) -> Callable[..., T]:
    """Raise what ``fn`` raises as the ``CallError`` of the status the gRPC servicer would answer."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        try:
            return fn(*args, **kwargs)
        except CallError:
            raise
        except Exception as exc:
            raise CallError(*status_of(exc)) from exc

    return wrapper


def _rows(name: str, values: np.ndarray | None, dtype: np.dtype, n: int) -> np.ndarray | None:
    """A private copy of ``values`` as ``dtype`` (n,), or None; a wrong shape is refused, naming what came."""
    if values is None:
        return None
    out = np.array(values, dtype=dtype, copy=True)
    if out.shape != (n,):
        raise InvalidArgument(f"{name}: received shape {tuple(out.shape)}, expected ({n},), one per id")
    return out


class InProcessSelection:
    """Selection with no service: a ``SessionManager`` on a backend of this process.

    Args:
        num_workers: selector threads (``LocalBackend``; 0 is one per core).
        backend: ``"local"`` (threads, the default) or ``"ray"`` (actors of a Ray this process starts or joins).
        limits: the service's limits on sessions, rounds and sizes (default ``Limits()``, as ``crest serve``).
        warm_up: compile the selection kernels now (numba; about 13 s in a fresh cache, cached on disk after)
            rather than in the first round.
        **backend_options: passed to the backend (``selector_service.backends.make_backend``).
    """

    target = "in-process"

    def __init__(
        self,
        num_workers: int = 2,
        *,
        backend: str = "local",
        limits: Limits | None = None,
        warm_up: bool = True,
        **backend_options: Any,
    ) -> None:
        self.manager = SessionManager(make_backend(backend, num_workers=num_workers, **backend_options), limits)
        self._session_tokens: dict[str, str] = {}
        if warm_up:
            try:
                log.info("in-process selection warmed up in %.2f s", self.manager.backend.warm_up())
            except BaseException:
                self.manager.backend.close()  # no selector thread outlives a failed start
                raise

    def _authorize(self, session_id: str) -> None:
        self.manager.authorize(session_id, self._session_tokens.get(session_id))

    def attach_session(self, session: SessionInfo) -> None:
        if session.token:
            self._session_tokens[session.session_id] = session.token

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        """Ready as soon as it is built (its warm-up, if any, ran then)."""

    def create_session(
        self,
        labels: np.ndarray,
        *,
        num_classes: int = 0,
        settings: SelectionSettings | None = None,
        client_name: str = "",
        timeout_s: float | None = None,
        **fields: Any,
    ) -> SessionInfo:
        """See ``SelectionService.create_session``. Settings are checked here, as ``SelectionClient`` checks them
        before its call: both settings= and fields raise ``TypeError``, a value outside the wire's ``WireError``."""
        # Through the wire's form, so that a zero field means the wire's default exactly as over gRPC.
        wire = SelectionSettings.from_proto(SelectionSettings.of_call(settings, fields).to_proto())
        return self._create(np.array(labels, dtype=codec.INT64, copy=True), num_classes, wire, client_name)

    @_as_call_error
    def _create(self, labels: np.ndarray, num_classes: int, wire: SelectionSettings, client_name: str) -> SessionInfo:
        if labels.ndim != 1:
            raise InvalidArgument(f"labels: received shape {tuple(labels.shape)}, expected (N,)")
        new = self.manager.create(labels, num_classes, SessionConfig.from_settings(wire), client_name, OWNER)
        s = new.session
        info = SessionInfo(s.id, s.num_classes, s.subset_size, s.config.batch_size, s.config.num_subsets, new.token)
        self.attach_session(info)
        return info

    @_as_call_error
    def close_session(self, session_id: str, timeout_s: float | None = None) -> int:
        self._authorize(session_id)
        completed = self.manager.close(session_id)
        self._session_tokens.pop(session_id, None)
        return completed

    @_as_call_error
    def start_round(
        self,
        session_id: str,
        round_id: int,
        trainer_step: int,
        timeout_s: float | None = None,
        num_subsets: int = 0,
        trainer_wait_s: float = 0.0,
        report: TrainerReport | None = None,
    ) -> RoundPlan:
        self._authorize(session_id)
        plan = self.manager.start_round(session_id, round_id, trainer_step, num_subsets, trainer_wait_s, report)
        return RoundPlan(plan.round_id, np.array(plan.ids, dtype=codec.INT64), plan.num_subsets)

    @_as_call_error
    def submit_embeddings(
        self,
        session_id: str,
        round_id: int,
        ids: np.ndarray,
        embeddings: np.ndarray,
        labels: np.ndarray | None = None,
        losses: np.ndarray | None = None,
    ) -> int:
        self._authorize(session_id)
        ids = np.array(ids, dtype=codec.INT64, copy=True)
        emb = np.array(embeddings, dtype=codec.FLOAT32, copy=True)
        if ids.ndim != 1 or emb.ndim != 2 or len(emb) != len(ids):
            raise InvalidArgument(
                f"received ids of shape {tuple(ids.shape)} and embeddings of shape {tuple(emb.shape)}; expected "
                "(n,) and (n, d), one row per id"
            )
        if emb.shape[1] == 0:
            raise InvalidArgument("embeddings have 0 columns; send the embedding dimension's d columns")
        part = EmbeddingPart(
            session_id,
            round_id,
            ids,
            emb,
            _rows("labels", labels, codec.INT64, len(ids)),
            _rows("losses", losses, codec.FLOAT32, len(ids)),
        )
        return self.manager.submit_embeddings([part])[2]

    def stream_batches(self, session_id: str, round_id: int, received: Iterable[int] = ()) -> Iterator[WeightedBatch]:
        try:
            self._authorize(session_id)
            for b in self.manager.batches(session_id, round_id, sorted(received)):
                yield WeightedBatch(
                    b.round_id,
                    b.subset_index,
                    np.array(b.ids, dtype=codec.INT64),
                    np.array(b.weights, dtype=codec.FLOAT32),
                    b.trainer_step,
                    b.selection_ms,
                    b.worker,
                )
        except CallError:
            raise
        except Exception as exc:
            raise CallError(*status_of(exc)) from exc

    @_as_call_error
    def session_state(self, session_id: str, timeout_s: float | None = None) -> pb.SessionState:
        self._authorize(session_id)
        return snapshot_to_proto(self.manager.snapshot(session_id))

    def close(self) -> None:
        """Stop the selector threads (or leave the Ray backend's actors)."""
        self.manager.backend.close()

    def __enter__(self) -> InProcessSelection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
