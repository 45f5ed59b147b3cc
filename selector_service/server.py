"""Builds and runs the gRPC server: the selector service, standard health checking and reflection."""

from __future__ import annotations

import hmac
import ipaddress
import logging
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from crest.selector.v1 import codec
from crest.selector.v1 import selector_pb2 as pb
from crest.selector.v1 import selector_pb2_grpc as pb_grpc
from selector_service.backends import SelectionBackend, make_backend
from selector_service.manager import SessionManager
from selector_service.metrics import Metrics
from selector_service.persistence import SessionStore
from selector_service.provenance import ProvenanceLog
from selector_service.servicer import SelectorServicer
from selector_service.session import Limits
from selector_service.warmup import warm_subset_drawing

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["SelectorService"].full_name
# Methods callable without a token, so load balancers and grpcurl can probe the server.
_PUBLIC_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", codec.MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", codec.MAX_MESSAGE_BYTES),
]


@dataclass(frozen=True, kw_only=True)
class ServerConfig:
    """How ``crest serve`` runs."""

    # Address to bind; loopback by default. Any other address requires ``auth_token``.
    host: str = "127.0.0.1"
    # TCP port; 0 picks a free one (printed on start).
    port: int = 50051
    # Selection backend: "ray" (actors) or "local" (threads in the server process).
    backend: str = "ray"
    # Ray cluster to attach to ("auto" or HOST:PORT); None starts an embedded local Ray.
    ray_address: str | None = None
    # Selector workers (Ray actors or threads); 0: with Ray, follow the cluster's CPUs as nodes join.
    num_workers: int = 2
    # CPUs each Ray actor reserves; fractional so several fit on a small machine.
    cpus_per_worker: float = 0.5
    # GPUs each Ray actor reserves (FAISS on the GPU when the actor sees one); 0 on CPU clusters.
    gpus_per_worker: float = 0.0
    # Threads of the gRPC server; each open stream holds one.
    grpc_threads: int = 16
    # Bearer token clients must send as "authorization: Bearer <token>"; None disables auth (loopback only).
    auth_token: str | None = None
    # Directory for session checkpoints and provenance logs; a restarted service resumes every session found
    # there. None: sessions live in memory only and no provenance is kept.
    state_dir: str | None = None
    # Port of the Prometheus /metrics endpoint on ``host``; None: no endpoint, 0: any free port.
    metrics_port: int | None = None
    # PEM files of the server's TLS certificate chain and key; both None: plaintext.
    tls_cert: str | None = None
    tls_key: str | None = None
    # PEM file of the CA that signs client certificates; set: mutual TLS, clients without one are refused.
    tls_client_ca: str | None = None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class _TokenAuth(grpc.ServerInterceptor):
    """Rejects calls without the configured bearer token (health and reflection stay open)."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    def intercept_service(self, continuation: Callable[..., Any], details: grpc.HandlerCallDetails) -> Any:
        if details.method.startswith(_PUBLIC_PREFIXES):
            return continuation(details)
        sent = dict(details.invocation_metadata or ()).get("authorization", "")
        if hmac.compare_digest(str(sent).encode(), self._expected):
            return continuation(details)
        reason = "missing" if not sent else "invalid"

        def deny(request: Any, context: grpc.ServicerContext) -> Any:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, f"{reason} bearer token in 'authorization' metadata")

        handler = continuation(details)
        if handler is None:
            return None
        if handler.request_streaming:
            if handler.response_streaming:
                return grpc.stream_stream_rpc_method_handler(deny)
            return grpc.stream_unary_rpc_method_handler(deny)
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(deny)
        return grpc.unary_unary_rpc_method_handler(deny)


class RunningServer:
    """A started server. ``stop()`` ends it and closes the backend."""

    def __init__(
        self,
        server: grpc.Server,
        port: int,
        host: str,
        manager: SessionManager,
        health_servicer: health.HealthServicer,
        metrics: Metrics,
    ) -> None:
        self.server, self.port, self.host, self.manager = server, port, host, manager
        self._health = health_servicer
        self.metrics = metrics

    @property
    def target(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def stop(self, grace: float = 2.0) -> None:
        self._health.enter_graceful_shutdown()
        self.server.stop(grace).wait()
        self.metrics.close()
        self.manager.backend.close()


def _server_credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    """TLS credentials from the configured PEM files (None for plaintext); a missing file names itself."""
    if (config.tls_cert is None) != (config.tls_key is None):
        raise ValueError("TLS needs both --tls-cert and --tls-key, received only one of them")
    if config.tls_cert is None or config.tls_key is None:
        if config.tls_client_ca:
            raise ValueError("--tls-client-ca needs --tls-cert and --tls-key as well")
        return None

    def read(flag: str, path: str) -> bytes:
        try:
            return Path(path).read_bytes()
        except OSError as exc:
            raise ValueError(f"cannot read {flag} {path}: {exc.strerror}") from exc

    client_ca = read("--tls-client-ca", config.tls_client_ca) if config.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(read("--tls-key", config.tls_key), read("--tls-cert", config.tls_cert))],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


def _warm_up(backend: SelectionBackend) -> None:
    """Before SERVING, compile or load every numba kernel a round calls (``warmup``): otherwise a fresh install's
    first round waits for the compiler (12.6 s measured). The backend's workers warm while this process warms the
    subset drawing its sessions run."""
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="warm-up") as pool:
        drawing = pool.submit(warm_subset_drawing)
        backend.warm_up()
        drawing.result()
    log.debug("warmed up in %.2f s", time.perf_counter() - start)


def start_server(
    config: ServerConfig, backend: SelectionBackend | None = None, limits: Limits | None = None
) -> RunningServer:
    """Build the backend (unless given), bind, warm the backend's workers up (``SelectionBackend.warm_up``), start,
    and mark the service SERVING."""
    if not is_loopback(config.host) and not config.auth_token:
        raise ValueError(
            f"refusing to bind {config.host} without an auth token: set --auth-token (or "
            "CREST_AUTH_TOKEN) to serve beyond this machine"
        )
    credentials = _server_credentials(config)
    if backend is None:
        options: dict[str, Any] = {"num_workers": config.num_workers}
        if config.backend == "ray":
            options |= {
                "address": config.ray_address,
                "cpus_per_worker": config.cpus_per_worker,
                "gpus_per_worker": config.gpus_per_worker,
            }
        backend = make_backend(config.backend, **options)
    store = SessionStore(config.state_dir) if config.state_dir else None
    provenance = ProvenanceLog(config.state_dir) if config.state_dir else None
    manager = SessionManager(backend, limits, store, provenance)
    metrics = Metrics(manager)
    manager.batch_hooks.append(metrics.on_batch)
    interceptors = [_TokenAuth(config.auth_token)] if config.auth_token else []
    server = grpc.server(
        ThreadPoolExecutor(max_workers=config.grpc_threads, thread_name_prefix="grpc"),
        interceptors=interceptors,
        options=GRPC_OPTIONS,
    )
    pb_grpc.add_SelectorServiceServicer_to_server(SelectorServicer(manager), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    try:
        address = f"{config.host}:{config.port}"
        port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    except RuntimeError as exc:
        backend.close()
        raise OSError(f"cannot bind {config.host}:{config.port}: {exc}") from exc
    try:
        _warm_up(backend)
    except BaseException:
        server.stop(None)
        backend.close()
        raise
    server.start()
    if config.metrics_port is not None:
        metrics_port = metrics.serve(config.host, config.metrics_port)
        log.info("metrics on http://%s:%d/metrics", config.host, metrics_port)
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("serving %s on %s:%d (%s)", SERVICE_NAME, config.host, port, backend.describe())
    return RunningServer(server, port, config.host, manager, health_servicer, metrics)


def serve_forever(config: ServerConfig, on_ready: Callable[[RunningServer], None] | None = None) -> None:
    """Run until SIGTERM or SIGINT, then stop gracefully."""
    running = start_server(config)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        if on_ready:
            on_ready(running)
        stop.wait()
    finally:
        log.info("shutting down")
        running.stop()
