"""Container health probe: exit 0 when the gRPC server at HOST:PORT answers SERVING on grpc.health.v1.

    python healthcheck.py [HOST:PORT] [SERVICE]    # defaults: 127.0.0.1:50051, "" (the whole server)

Health checking stays open when the server requires a bearer token, so the probe needs none. Used by the
selector images' HEALTHCHECK, the compose file and the Kubernetes probes (grpc_health_probe does the same, but
is not a Python package).
"""

from __future__ import annotations

import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def probe(target: str, service: str = "", timeout_s: float = 3.0) -> int:
    """0 when ``target`` reports SERVING for ``service``, else 1 (with the reason on stderr)."""
    try:
        with grpc.insecure_channel(target) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s
            )
    except grpc.RpcError as exc:
        print(f"{target}: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        print(f"{target}: {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    args = sys.argv[1:]
    sys.exit(probe(args[0] if args else "127.0.0.1:50051", args[1] if len(args) > 1 else ""))
