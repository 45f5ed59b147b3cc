"""The loader's background thread: submits a round's embeddings and streams its weighted batches back, and
starts the session's next round ahead of time (``PlanJob``), after the jobs queued before it.

Every item it puts on the queue carries the loader's round number, so the consumer can drop what belongs to
a round it gave up on (the session's round id cannot tell: a reopened session counts from 0 again). Errors are
queued as ``StreamFailure`` and handled by the service link (``_link.py``) on the training loop's thread; the
thread itself survives them and serves the next job.
"""

from __future__ import annotations

import logging
import queue
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field

import grpc
import numpy as np

from crest.selector.v1.api import RoundPlan, SelectionService, TrainerReport, WeightedBatch
from trainer_client._failures import Failure, kind_of

log = logging.getLogger(__name__)

# A stream that breaks with a TRANSIENT failure (``_failures.KIND_OF``) is resumed, naming the subsets already
# received, after each of these delays; then the failure goes to the loader.
RETRY_BACKOFF_S = (0.2, 0.5, 1.0)


@dataclass(frozen=True)
class StreamJob:
    round: int  # the loader's round number (survives reconnects, unlike the session's round id)
    session_id: str
    session_round: int
    ids: np.ndarray  # int64 (n,)
    embeddings: np.ndarray  # float32 (n, d)
    labels: np.ndarray  # int64 (n,)
    losses: np.ndarray  # float32 (n,)


@dataclass(frozen=True)
class PlanJob:
    """StartRound of the session's next round, run on the stream thread (``ServiceLink.prefetch``); the plan,
    or the call's exception, lands in ``plan``."""

    session_id: str
    session_round: int
    num_subsets: int
    trainer_step: int  # sent as StartRound's trainer_step: the step the embeddings are expected at
    trainer_wait_s: float  # the loader's wait so far, reported for the service's metrics
    report: TrainerReport | None  # the trainer's report when the job was created (None: nothing to report)
    plan: Future[RoundPlan] = field(default_factory=Future, compare=False)


@dataclass(frozen=True)
class StreamBatch:
    round: int  # the loader's round number of the job
    batch: WeightedBatch  # as received: the pending round keeps it as is


@dataclass(frozen=True)
class StreamEnd:
    round: int


@dataclass(frozen=True)
class StreamFailure:
    round: int
    error: BaseException


StreamItem = StreamBatch | StreamEnd | StreamFailure


class RoundStreamer:
    """Owns the thread; ``submit`` a job, read ``items``. Jobs run one at a time, in the order submitted."""

    def __init__(self, client: SelectionService, queue_size: int) -> None:
        self.client = client
        self.items: queue.Queue[StreamItem] = queue.Queue(queue_size)
        self._jobs: queue.Queue[StreamJob | PlanJob | None] = queue.Queue()
        self.stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="crest-stream", daemon=True)
        self._thread.start()

    def submit(self, job: StreamJob | PlanJob) -> None:
        self._jobs.put(job)

    def _put(self, item: StreamItem) -> bool:
        """Queue an item, giving up when the loader is stopping (nobody will read it)."""
        while not self.stopping.is_set():
            try:
                self.items.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            if isinstance(job, PlanJob):
                self._start_round(job)
                continue
            try:
                self.client.submit_embeddings(
                    job.session_id, job.session_round, job.ids, job.embeddings, job.labels, job.losses
                )
                if not self._stream(job):
                    return
                self._put(StreamEnd(job.round))
            except BaseException as exc:  # handed to the training loop
                if self.stopping.is_set():
                    return
                log.debug("round %d stream failed: %s", job.round, exc)
                if not self._put(StreamFailure(job.round, exc)):
                    return

    def _start_round(self, job: PlanJob) -> None:
        """Run ``job``'s StartRound and settle its future; cancel it when the loader is stopping."""
        if self.stopping.is_set() or not job.plan.set_running_or_notify_cancel():
            job.plan.cancel()
            return
        try:
            plan = self.client.start_round(
                job.session_id,
                job.session_round,
                job.trainer_step,
                num_subsets=job.num_subsets,
                trainer_wait_s=job.trainer_wait_s,
                report=job.report,
            )
        except BaseException as exc:  # the training loop reads it from the future
            log.debug("starting round %d of session %s ahead failed: %s", job.session_round, job.session_id, exc)
            job.plan.set_exception(exc)
        else:
            job.plan.set_result(plan)

    def _stream(self, job: StreamJob) -> bool:
        """Queue the round's batches, resuming a broken stream from the subsets received; False when stopping."""
        received: set[int] = set()
        for attempt in range(len(RETRY_BACKOFF_S) + 1):
            try:
                for batch in self.client.stream_batches(job.session_id, job.session_round, received):
                    if batch.subset_index in received:
                        continue  # cannot happen with a conforming service; never hand a batch over twice
                    received.add(batch.subset_index)
                    if not self._put(StreamBatch(job.round, batch)):
                        return False
                return True
            except grpc.RpcError as exc:
                last = attempt == len(RETRY_BACKOFF_S)
                if kind_of(exc) is not Failure.TRANSIENT or last or self.stopping.is_set():
                    raise
                log.warning(
                    "round %d: stream broke after %d batches (%s); resuming",
                    job.round,
                    len(received),
                    exc.code().name,
                )
                if self.stopping.wait(RETRY_BACKOFF_S[attempt]):
                    return False
        return True

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the thread (it may be blocked in an rpc until that rpc ends)."""
        self.stopping.set()
        self._jobs.put(None)
        self._thread.join(timeout_s)
        while True:  # jobs the thread left: nobody may wait on their rounds for ever
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                return
            if isinstance(job, PlanJob):
                job.plan.cancel()
