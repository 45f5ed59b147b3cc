"""Prometheus metrics of a running service (``crest serve --metrics-port``).

Counts are read from the ``SessionManager`` at scrape time; selection latency is a histogram fed per
delivered batch. Each server gets its own registry, so several servers (tests) can run in one process.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from selector_service.manager import SessionManager
from selector_service.tasks import Batch


class _ManagerCollector(Collector):
    def __init__(self, manager: SessionManager) -> None:
        self.manager = manager

    def collect(self) -> Iterator[Any]:
        totals = self.manager.totals()
        yield GaugeMetricFamily("crest_sessions", "Open selection sessions", value=totals["sessions"])
        yield GaugeMetricFamily(
            "crest_rounds_in_flight",
            "Rounds started and not yet delivered (queue depth)",
            value=totals["rounds_in_flight"],
        )
        yield CounterMetricFamily("crest_rounds_started", "Selection rounds started", value=totals["rounds_started"])
        yield CounterMetricFamily(
            "crest_rounds_completed", "Selection rounds fully delivered", value=totals["rounds_completed"]
        )
        yield CounterMetricFamily(
            "crest_batches_delivered", "Weighted batches delivered", value=totals["batches_delivered"]
        )
        yield CounterMetricFamily(
            "crest_examples_delivered", "Examples in delivered batches", value=totals["examples_delivered"]
        )
        yield GaugeMetricFamily(
            "crest_excluded_examples", "Examples excluded as learned, over open sessions", value=totals["excluded"]
        )
        yield GaugeMetricFamily(
            "crest_trainer_wait_seconds",
            "Seconds trainers spent blocked on coresets, summed over open sessions (as reported by the trainers)",
            value=totals["trainer_wait_s"],
        )
        backend = self.manager.backend.describe()
        yield GaugeMetricFamily(
            "crest_selector_workers", "Selector workers of the backend", value=backend.get("workers", 0)
        )
        yield GaugeMetricFamily(
            "crest_selector_warmup_seconds",
            "Seconds the backend's start-up warm-up took (compiling or loading the selection kernels in every "
            "worker); 0 when nothing was left to warm (a local backend in a process warmed before), NaN before it ran",
            value=float("nan") if backend.get("warmup_s") is None else backend["warmup_s"],
        )


class Metrics:
    """A registry for one server and the hook the manager calls per delivered batch."""

    def __init__(self, manager: SessionManager) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_ManagerCollector(manager))
        self.selection_seconds = Histogram(
            "crest_selection_seconds",
            "Wall time of the selector call that produced each delivered batch, from the worker starting on its "
            "share of the round until the share's batches were ready (batches selected together share the time)",
            registry=self.registry,
            buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5),
        )
        self._server: Any = None
        self.port: int | None = None  # bound port of the /metrics endpoint, once serving

    def on_batch(self, batch: Batch) -> None:
        self.selection_seconds.observe(batch.selection_ms / 1e3)

    def serve(self, host: str, port: int) -> int:
        """Expose /metrics over HTTP on ``host:port`` (0 picks a free port); returns the bound port."""
        self._server, _ = start_http_server(port, addr=host, registry=self.registry)
        self.port = int(self._server.server_port)
        return self.port

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
