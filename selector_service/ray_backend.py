"""Selection on Ray actors: the only module that imports ``ray``.

With no address the backend starts a local Ray bound to 127.0.0.1 (the embedded default); with an address
(``auto`` or ``HOST:PORT``) it attaches to a running cluster. Each ``SelectorWorker`` actor selects its share of a
round's random subsets per call (a ``tasks.SelectionTask``, stacked once); Ray restarts a dead actor and retries
its calls.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from concurrent.futures import Future
from typing import Any

import ray

from selector_service.tasks import Batch, RoundInput, SelectionTask, chunks, fan_out, run_task

log = logging.getLogger(__name__)

# Object store of an embedded Ray: selection inputs are a few MB per round, so keep it small on small boxes.
EMBEDDED_OBJECT_STORE_BYTES = 512 * 1024 * 1024


class SelectorWorker:
    """A Ray actor that selects mini-batch coresets. Stateless: any call can be retried on any worker."""

    def __init__(self, name: str, num_threads: int) -> None:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        from selector_service._faiss import faiss

        faiss().omp_set_num_threads(num_threads)
        node = ray.get_runtime_context().get_node_id()[:12]
        self.name = f"{name}@{socket.gethostname()}:{os.getpid()}/node-{node}"

    def select(self, task: SelectionTask) -> list[Batch]:
        return run_task(task, self.name)

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def pid(self) -> int:
        """The operating-system process this actor runs in (for operators and fault-injection tests)."""
        return os.getpid()


# Namespace of the named selector actors, so operators and tests can find them (ray.util.list_named_actors).
NAMESPACE = "crest"
# An actor that dies (its process or node) is restarted, and the calls it was running are retried, this often.
MAX_RESTARTS = 5
# Auto mode (num_workers=0): how often the cluster size is checked, and the most actors it creates.
SCALE_INTERVAL_S = 2.0
MAX_AUTO_WORKERS = 256


class RayBackend:
    """A pool of ``SelectorWorker`` actors, used round-robin, spread over the cluster's nodes.

    Actors are named ``crest-selector-<instance>-<i>`` in namespace ``crest``. A selection call survives the
    death of its actor: Ray restarts the actor and retries the call (tasks are stateless and idempotent), and the
    session delivers each subset's batch once because it collects one result per subset. A round is dealt out
    in contiguous shares (``tasks.chunks``), one call per actor, starting where the last round stopped.
    """

    name = "ray"

    def __init__(
        self,
        address: str | None = None,
        num_workers: int = 2,
        cpus_per_worker: float = 0.5,
        threads_per_worker: int = 1,
        gpus_per_worker: float = 0.0,
    ) -> None:
        self._started_ray = False
        if not ray.is_initialized():
            if address:
                ray.init(address=address, namespace=NAMESPACE, log_to_driver=False)
            else:
                # Embedded: loopback only, so the disabled token auth exposes nothing beyond this machine.
                os.environ.setdefault("RAY_AUTH_MODE", "disabled")
                ray.init(
                    address="local",  # a new instance: never attach to another Ray found on this machine
                    namespace=NAMESPACE,
                    _node_ip_address="127.0.0.1",
                    object_store_memory=EMBEDDED_OBJECT_STORE_BYTES,
                    include_dashboard=False,
                    log_to_driver=False,
                )
                self._started_ray = True
        self._actor_class: Any = ray.remote(max_restarts=MAX_RESTARTS, max_task_retries=MAX_RESTARTS)(SelectorWorker)
        self._cpus, self._threads, self._gpus = cpus_per_worker, threads_per_worker, gpus_per_worker
        self.instance = uuid.uuid4().hex[:8]
        self.actor_names: list[str] = []
        self._actors: list[Any] = []
        self._turn = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._auto = num_workers == 0
        self._grow(self._target() if self._auto else num_workers)
        self._scaler: threading.Thread | None = None
        if self._auto:
            self._scaler = threading.Thread(target=self._follow_cluster, name="crest-scaler", daemon=True)
            self._scaler.start()
        log.info(
            "ray backend: %d selector actors (%.2f CPU each%s), address=%s",
            len(self._actors),
            cpus_per_worker,
            ", following the cluster size" if self._auto else "",
            address or "embedded",
        )

    def _target(self) -> int:
        """Actors the cluster's CPUs hold now (auto mode): one per ``cpus_per_worker``, at least one."""
        cpus = float(ray.cluster_resources().get("CPU", 0.0))
        return max(1, min(MAX_AUTO_WORKERS, int(cpus / self._cpus)))

    def _grow(self, target: int) -> None:
        with self._lock:
            for i in range(len(self._actors), target):
                name = f"crest-selector-{self.instance}-{i}"
                handle = self._actor_class.options(
                    name=name, num_cpus=self._cpus, num_gpus=self._gpus, scheduling_strategy="SPREAD"
                ).remote(f"selector-{i}", self._threads)
                self._actors.append(handle)
                self.actor_names.append(name)

    def _follow_cluster(self) -> None:
        """Add actors when nodes join (auto mode); checks every ``SCALE_INTERVAL_S`` until closed."""
        while not self._stop.wait(SCALE_INTERVAL_S):
            try:
                target = self._target()
            except Exception as exc:  # the cluster may be briefly unreachable; try again next time
                log.warning("cannot read the Ray cluster size: %s", exc)
                continue
            if target > len(self._actors):
                before = len(self._actors)
                self._grow(target)
                log.info("cluster grew: selector actors %d -> %d", before, target)

    def submit(self, work: RoundInput) -> list[Future[Batch]]:
        with self._lock:
            shares = chunks(work.sizes, len(self._actors))
            actors = [self._actors[(self._turn + i) % len(self._actors)] for i in range(len(shares))]
            self._turn += len(shares)
        futures: list[Future[Batch]] = []
        for actor, subsets in zip(actors, shares, strict=True):
            task = work.share(subsets)
            futures += fan_out(actor.select.remote(task).future(), task.num_subsets)
        return futures

    def describe(self) -> dict[str, Any]:
        with self._lock:
            return {
                "backend": self.name,
                "workers": len(self._actors),
                "embedded": self._started_ray,
                "follows_cluster": self._auto,
                "actors": list(self.actor_names),
            }

    def close(self) -> None:
        self._stop.set()
        if self._scaler is not None:
            self._scaler.join(timeout=10)
        with self._lock:
            for a in self._actors:
                ray.kill(a)
            self._actors, self.actor_names = [], []
        if self._started_ray:
            ray.shutdown()
