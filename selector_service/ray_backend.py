"""Selection on Ray actors: the only module that imports ``ray``.

With no address the backend starts a local Ray bound to 127.0.0.1 (the embedded default); with an address
(``auto`` or ``HOST:PORT``) it attaches to a running cluster. Each ``SelectorWorker`` actor selects its share of a
round's random subsets per call (a ``tasks.SelectionTask``, stacked once); Ray restarts a dead actor and retries
its calls.

Warm-up (``warm_up``, which ``start_server`` calls before the service reports ready): every actor selects the
synthetic shares of ``warmup`` through its ``select`` method, the call real shares take, so it compiles (or loads
from numba's on-disk cache) the kernels with the argument types of real work: Ray hands actors read-only arrays,
a separate numba specialisation. After ``warm_up``, an actor the cluster adds (``num_workers=0``) warms the same
way before it joins the pool, so no round is dealt to a cold actor. An actor Ray restarts after a crash starts
cold; its first call loads the kernels from the on-disk cache its node already holds.
Environment: an embedded Ray's workers inherit this process's environment (``NUMBA_CACHE_DIR`` among it); on a
cluster they have the environment of the node's ``ray start``.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import threading
import time
import uuid
from concurrent.futures import Future
from typing import Any

import ray

from selector_service.errors import SelectorFailure
from selector_service.hedge import HEDGE_AFTER_S, MAX_ATTEMPTS, hedged
from selector_service.tasks import Batch, RoundInput, SelectionTask, chunks, fan_out, run_task
from selector_service.warmup import warmup_tasks

log = logging.getLogger(__name__)

# Object store of an embedded Ray: selection inputs are a few MB per round, so keep it small on small boxes.
EMBEDDED_OBJECT_STORE_BYTES = 512 * 1024 * 1024


class SelectorWorker:
    """A Ray actor that selects mini-batch coresets. Stateless: any call can be retried on any worker."""

    def __init__(self, name: str, num_threads: int) -> None:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        from selector_service._faiss import faiss, use_gpus

        faiss().omp_set_num_threads(num_threads)
        # FAISS on a GPU only when Ray reserved one for this actor (Ray then sets CUDA_VISIBLE_DEVICES to it).
        use_gpus(range(len(ray.get_gpu_ids())))
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
# How often an actor set aside (it did not answer a share in time) is probed until it answers again.
PROBE_INTERVAL_S = 5.0
# Auto mode (num_workers=0): how often the cluster size is checked, and the most actors it creates.
SCALE_INTERVAL_S = 2.0
MAX_AUTO_WORKERS = 256
# Longest a group of new actors may take to start and warm up (on a fresh cache the first actor compiled for 16 s
# on 2 cores); past it they are reported as unable to start, as when the cluster lacks the resources they reserve.
WARMUP_TIMEOUT_S = 300.0


def _select_on(actors: list[Any], task: SelectionTask, index: int) -> Future[list[Batch]]:
    """Select ``task`` on ``actors[index]``."""
    return actors[index].select.remote(task).future()


def _known(node: Future[str]) -> str | None:
    """The node id an actor reported, or None while it has not (or could not)."""
    return node.result() if node.done() and node.exception() is None else None


def _hedge_order(live: list[int], first: int, nodes: list[str | None]) -> list[int]:
    """The actors a share tries, at most ``MAX_ATTEMPTS``: ``live[first]``, then the next live actors on other
    nodes than those already in the order (a node that died takes all its actors with it), then the rest, each
    group in pool order from ``first``."""
    ring = [live[(first + j) % len(live)] for j in range(len(live))]
    order = ring[:1]
    for i in ring[1:]:
        if len(order) == MAX_ATTEMPTS:
            return order
        if nodes[i] is None or all(nodes[i] != nodes[o] for o in order):
            order.append(i)
    return (order + [i for i in ring if i not in order])[:MAX_ATTEMPTS]


class RayBackend:
    """A pool of ``SelectorWorker`` actors, used round-robin, spread over the cluster's nodes.

    Actors are named ``crest-selector-<instance>-<i>`` in namespace ``crest``. A selection call survives the
    death of its actor: Ray restarts the actor and retries the call (tasks are stateless and idempotent), and the
    session delivers each subset's batch once because it collects one result per subset. A round is dealt out
    in contiguous shares (``tasks.chunks``), one call per actor, starting where the last round stopped.

    A share that has not come back after ``hedge.HEDGE_AFTER_S`` goes to another actor too (``hedge.hedged``), on
    another node first (``_hedge_order``): an actor whose node died would hold it until Ray noticed, and its
    restart may find no free CPU. Such an actor is set aside (dealt no shares) until it answers a probe.
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
        self._nodes: list[Future[str]] = []  # each actor's node id, as first reported (a restart may move it)
        self._turn = 0
        self._set_aside: set[int] = set()  # indices of actors that did not answer in time, until a probe answers
        self._lock = threading.Lock()  # the pool (actors, turn, set-aside): held briefly, by submit
        self._growing = threading.Lock()  # held by _grow and warm_up throughout: one of them at a time
        self._warm_joiners = False  # set by warm_up: actors added later warm before they join the pool
        self._warmup_s: float | None = None
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
        """Add actors up to ``target``. After ``warm_up`` they warm first, outside the pool's lock, so rounds keep
        flowing to the others meanwhile; an actor joins the pool only once it is warm."""
        with self._growing:
            with self._lock:
                first = len(self._actors)
            names = [f"crest-selector-{self.instance}-{i}" for i in range(first, target)]
            handles = [
                self._actor_class.options(
                    name=name, num_cpus=self._cpus, num_gpus=self._gpus, scheduling_strategy="SPREAD"
                ).remote(f"selector-{i}", self._threads)
                for i, name in enumerate(names, start=first)
            ]
            try:
                if self._warm_joiners:
                    self._warm(handles)
            except BaseException:
                for h in handles:
                    ray.kill(h)
                raise
            with self._lock:
                if self._stop.is_set():  # closed while they warmed
                    for h in handles:
                        ray.kill(h)
                    return
                self._actors += handles
                self.actor_names += names
                # Each actor's node, for hedging on another node (an answer arrives once the actor has started).
                self._nodes += [h.node_id.remote().future() for h in handles]

    def _warm(self, actors: list[Any]) -> None:
        """Select the warm-up shares on each of ``actors``: the first alone, so that on a fresh cache it compiles
        once and fills its node's on-disk cache, then the others together, loading it."""
        tasks = warmup_tasks()
        for group in (actors[:1], actors[1:]):
            try:
                ray.get([a.select.remote(t) for a in group for t in tasks], timeout=WARMUP_TIMEOUT_S)
            except ray.exceptions.GetTimeoutError:
                raise SelectorFailure(
                    f"{len(group)} selector actors did not start and warm up within {WARMUP_TIMEOUT_S:.0f} s; each "
                    f"reserves {self._cpus} CPU and {self._gpus} GPU: does the cluster have them free?"
                ) from None

    def warm_up(self) -> float:
        """Warm every actor of the pool, and from now on every actor added later before it joins the pool."""
        start = time.perf_counter()
        with self._growing:
            self._warm_joiners = True
            with self._lock:
                actors = list(self._actors)
            self._warm(actors)
            self._warmup_s = time.perf_counter() - start
        log.info("warmed %d selector actors in %.1f s", len(actors), self._warmup_s)
        return self._warmup_s

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
                start = time.perf_counter()
                try:
                    self._grow(target)
                except Exception as exc:  # the new actors were removed; try again next time
                    if not self._stop.is_set():
                        log.warning("cannot add selector actors %d -> %d: %s", before, target, exc)
                    continue
                if self._stop.is_set():
                    return
                log.info(
                    "cluster grew: selector actors %d -> %d (started%s in %.1f s)",
                    before,
                    len(self._actors),
                    " and warmed" if self._warm_joiners else "",
                    time.perf_counter() - start,
                )

    def submit(self, work: RoundInput) -> list[Future[Batch]]:
        with self._lock:
            actors = list(self._actors)
            nodes = [_known(f) for f in self._nodes]
            live = [i for i in range(len(actors)) if i not in self._set_aside] or list(range(len(actors)))
            shares = chunks(work.sizes, len(live))
            turn, self._turn = self._turn, self._turn + len(shares)
        futures: list[Future[Batch]] = []
        for k, subsets in enumerate(shares):
            task = work.share(subsets)
            order = _hedge_order(live, (turn + k) % len(live), nodes)
            call: Future[list[Batch]] = hedged(
                functools.partial(_select_on, actors, task), order, HEDGE_AFTER_S, self._set_aside_slow
            )
            futures += fan_out(call, task.num_subsets)
        return futures

    def _set_aside_slow(self, index: int) -> None:
        """Deal no more shares to actor ``index``, which did not answer in time, until it answers a probe."""
        with self._lock:
            if index in self._set_aside or index >= len(self._actors):
                return
            self._set_aside.add(index)
            actor, name = self._actors[index], self.actor_names[index]
        log.warning(
            "selector actor %s did not answer within %.1f s: its shares go to the others until it answers",
            name,
            HEDGE_AFTER_S,
        )
        self._probe(index, name, actor)

    def _probe(self, index: int, name: str, actor: Any) -> None:
        actor.node_id.remote().future().add_done_callback(lambda done: self._probed(index, name, actor, done))

    def _probed(self, index: int, name: str, actor: Any, probe: Future[Any]) -> None:
        """Put actor ``index`` back in the pool when its probe answered; probe it again later when it could not
        answer yet (its node may come back, or Ray may restart it where CPUs free up)."""
        error = probe.exception()
        if error is None:
            with self._lock:
                self._set_aside.discard(index)
            log.info("selector actor %s answers again: back in the pool", name)
        elif isinstance(error, ray.exceptions.ActorDiedError):  # out of restarts: it will never answer
            log.warning("selector actor %s is gone for good: %s", name, error)
        elif not self._stop.is_set():
            log.info("selector actor %s does not answer yet; probing it again in %.0f s", name, PROBE_INTERVAL_S)
            timer = threading.Timer(PROBE_INTERVAL_S, self._probe, args=(index, name, actor))
            timer.daemon = True
            timer.start()

    def describe(self) -> dict[str, Any]:
        with self._lock:
            return {
                "backend": self.name,
                "workers": len(self._actors),
                "set_aside": len(self._set_aside),
                "embedded": self._started_ray,
                "follows_cluster": self._auto,
                "actors": list(self.actor_names),
                "warmup_s": self._warmup_s,
            }

    def close(self) -> None:
        self._stop.set()
        if self._scaler is not None:
            self._scaler.join(timeout=10)
        with self._lock:
            for a in self._actors:
                ray.kill(a)
            self._actors, self.actor_names, self._nodes = [], [], []
        if self._started_ray:
            ray.shutdown()
