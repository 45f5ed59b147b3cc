"""Prometheus metrics of a running service (``crest serve --metrics-port``).

Counts are read from the ``SessionManager`` at scrape time; selection latency is a histogram fed per
delivered batch. Each server gets its own registry, so several servers (tests) can run in one process.

Totals are unlabelled sums over the open sessions. What each trainer reports of itself with StartRound
(``TrainerReport``: its fallback batches, failed calls, control steps and payoff) is exported per open session,
labelled ``session`` (its id) and ``client`` (the name it was created with; "unnamed" when none), and leaves the
exposition when the session closes.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from selector_service.manager import SessionManager, SessionReport
from selector_service.tasks import Batch

# Labels of the per-session families.
SESSION_LABELS = ("session", "client")
# The per-session families of the trainers' reports: (metric, kind, TrainerReport field, help). The cumulative
# counts are counters (exposed as NAME_total); the payoff, the latest the trainer sent, gauges.
REPORT_FAMILIES = (
    (
        "crest_trainer_fallback_batches",
        "counter",
        "trainer_fallback_batches",
        "Uniform batches the trainer trained on instead of coresets, as reported by the trainer",
    ),
    (
        "crest_trainer_service_errors",
        "counter",
        "trainer_service_errors",
        "Failed calls to the service the trainer rode out, as reported by the trainer",
    ),
    (
        "crest_trainer_control_steps",
        "counter",
        "trainer_control_steps",
        "Steps the trainer took on the payoff's control arm, as reported by the trainer",
    ),
    ("crest_payoff_measurements", "gauge", "payoff_measurements", "A B A payoff measurements the trainer has taken"),
    (
        "crest_payoff_per_second",
        "gauge",
        "payoff_per_second",
        "Selection's speedup per wall-second over the control arm (a ratio; NaN when not known)",
    ),
    (
        "crest_payoff_per_second_lo",
        "gauge",
        "payoff_per_second_lo",
        "Lower bound of the payoff's 90% interval (-Inf when unbounded, NaN when not known)",
    ),
    (
        "crest_payoff_per_second_hi",
        "gauge",
        "payoff_per_second_hi",
        "Upper bound of the payoff's 90% interval (+Inf when unbounded, NaN when not known)",
    ),
)
_FAMILY = {"counter": CounterMetricFamily, "gauge": GaugeMetricFamily}


def _per_session(reports: list[SessionReport]) -> Iterator[Any]:
    """The families of the trainers' reports (``REPORT_FAMILIES`` and ``crest_payoff_on_control``), one sample per
    open session."""
    for name, kind, field, about in REPORT_FAMILIES:
        family = _FAMILY[kind](name, about, labels=SESSION_LABELS)
        for r in reports:
            family.add_metric([r.session_id, r.client_name], float(getattr(r.report, field)))
        yield family
    on_control = GaugeMetricFamily(
        "crest_payoff_on_control",
        "1 when the trainer's payoff governor trains on the control arm, else 0",
        labels=SESSION_LABELS,
    )
    for r in reports:
        on_control.add_metric([r.session_id, r.client_name], float(r.report.payoff_arm == "control"))
    yield on_control


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
        yield from _per_session(self.manager.trainer_reports())
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
