"""The service side's commands: ``crest serve`` and ``crest inspect``.

``add_commands`` registers them on the ``crest`` parser (``crest.cli``, the composition root, loads this module
alone for them);
``python -m selector_service.cli serve ...`` runs them without the trainer side or the benchmarks installed
(what ``selector_service.process.spawn_service`` and the selector images run). Environment read here:
CREST_AUTH_TOKEN (the default of ``--auth-token``). Imports neither torch nor the trainer side.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from crest.cli import add_log_level, setup_logging
from selector_service.process import READY_PREFIX

COMMANDS = ("serve", "inspect")


def add_selector_flags(p: argparse.ArgumentParser) -> None:
    """Where selection runs: the flags ``crest serve`` shares with ``crest demo``."""
    p.add_argument(
        "--backend",
        choices=["ray", "local"],
        default="ray",
        help="where selection runs: Ray actors (default) or threads inside the server process",
    )
    p.add_argument(
        "--ray-address",
        default=None,
        help="Ray cluster to attach to ('auto' or HOST:PORT); default: start an embedded local Ray",
    )
    p.add_argument(
        "--num-workers",
        type=int,
        default=2,
        help="selector workers (Ray actors or threads); default 2. With Ray, 0 follows the cluster: one actor "
        "per --cpus-per-worker of its CPUs, growing as nodes join",
    )
    p.add_argument(
        "--cpus-per-worker",
        type=float,
        default=0.5,
        help="CPUs each Ray selector actor reserves (fractional fits several on a small box); default 0.5",
    )
    p.add_argument(
        "--gpus-per-worker",
        type=float,
        default=0.0,
        help="GPUs each Ray selector actor reserves, so FAISS runs on its GPU (e.g. 0.25); default 0",
    )


def selector_serve_args(args: argparse.Namespace) -> list[str]:
    """The ``crest serve`` flags that reproduce ``add_selector_flags``' values (for a service started by a
    command that took them, such as ``crest demo``)."""
    out = ["--backend", args.backend, "--num-workers", str(args.num_workers)]
    out += ["--cpus-per-worker", str(args.cpus_per_worker), "--gpus-per-worker", str(args.gpus_per_worker)]
    return out + (["--ray-address", args.ray_address] if args.ray_address else [])


def add_commands(sub: Any) -> None:
    """Register ``serve`` and ``inspect`` on ``sub`` (an ``add_subparsers`` result)."""
    serve = sub.add_parser(
        "serve",
        help="run the selection service",
        description="Run the gRPC selection service until SIGTERM/SIGINT. Prints "
        f"'{READY_PREFIX}HOST:PORT' on stdout once it serves, after every selector worker has compiled (or loaded "
        "from numba's cache, NUMBA_CACHE_DIR) the selection kernels.",
    )
    serve.add_argument(
        "--host", default="127.0.0.1", help="address to bind; default 127.0.0.1. Other addresses require an auth token"
    )
    serve.add_argument("--port", type=int, default=50051, help="TCP port, 0 for any free port; default 50051")
    serve.add_argument("--grpc-threads", type=int, default=16, help="gRPC server threads; default 16")
    serve.add_argument(
        "--auth-token",
        default=os.environ.get("CREST_AUTH_TOKEN"),
        help="bearer token clients must send (default: $CREST_AUTH_TOKEN; none on loopback)",
    )
    serve.add_argument("--tls-cert", default=None, help="PEM certificate chain: serve over TLS (with --tls-key)")
    serve.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert")
    serve.add_argument(
        "--tls-client-ca", default=None, help="PEM CA of client certificates: require mutual TLS (with --tls-cert)"
    )
    serve.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="serve Prometheus metrics at http://HOST:PORT/metrics (0: any free port; default: off)",
    )
    serve.add_argument(
        "--state-dir",
        default=None,
        help="directory for session checkpoints and provenance logs; a restarted service resumes the sessions "
        "it finds there (default: sessions live in memory only, no provenance)",
    )
    add_selector_flags(serve)

    inspect = sub.add_parser(
        "inspect",
        help="show which batches a session was served (provenance)",
        description="Read a session's provenance log from the service's --state-dir: every delivered batch "
        "with its round, the trainer step its embeddings came from, staleness, worker, ids and weights. An open "
        "session's checkpoint there is described first: its rounds and what its trainer last reported (fallback "
        "batches, failed calls, control steps, payoff).",
    )
    inspect.add_argument("--state-dir", required=True, help="the --state-dir the service ran with")
    inspect.add_argument("--session", required=True, help="session id (as logged by the service and the trainer)")
    inspect.add_argument(
        "--step", type=int, default=None, help="only batches whose embeddings were computed at this trainer step"
    )
    inspect.add_argument(
        "--export", default=None, help="write the records to this file: .csv, or .jsonl for JSON lines"
    )


def run(args: argparse.Namespace) -> int:
    """Run the parsed ``serve`` or ``inspect`` command."""
    return _serve(args) if args.command == "serve" else _inspect(args)


def _serve(args: argparse.Namespace) -> int:
    try:
        from selector_service.server import ServerConfig, serve_forever
    except ImportError as exc:  # a trainer-only install: no numba, Ray or the gRPC reflection service
        from selector_service.errors import SELECTOR_INSTALL

        print(f"crest serve: {exc}; {SELECTOR_INSTALL}", file=sys.stderr)
        return 2

    config = ServerConfig(
        host=args.host,
        port=args.port,
        backend=args.backend,
        ray_address=args.ray_address,
        num_workers=args.num_workers,
        cpus_per_worker=args.cpus_per_worker,
        gpus_per_worker=args.gpus_per_worker,
        grpc_threads=args.grpc_threads,
        state_dir=args.state_dir,
        metrics_port=args.metrics_port,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca,
        auth_token=args.auth_token,
    )
    serve_forever(config, on_ready=lambda running: print(f"{READY_PREFIX}{running.target}", flush=True))
    return 0


def _describe_session(state_dir: str, session_id: str) -> None:
    """Print the session's checkpoint in ``state_dir`` in two lines, when it has one (an open session's)."""
    from selector_service import trainer_report
    from selector_service.persistence import CorruptCheckpoint, SessionStore

    try:
        store = SessionStore(state_dir)
        path = store.path(session_id)
        if not path.exists():
            print(f"session {session_id}: no checkpoint in {store.dir} (closed, or never saved)")
            return
        state = store.load(path)
        report = trainer_report.from_state(state.get("trainer_report"))
    except (CorruptCheckpoint, OSError, ValueError, TypeError) as exc:
        print(f"crest inspect: cannot read the checkpoint of session {session_id!r}: {exc}", file=sys.stderr)
        return
    print(
        f"session {session_id} ({state['client_name']}): next round {state['next_round_id']}, "
        f"{state['rounds_completed']} completed, {state['batches_delivered']} batches delivered, "
        f"trainer waited {state['trainer_wait_s']:.1f} s"
    )
    print(trainer_report.describe(report))


def _inspect(args: argparse.Namespace) -> int:
    from selector_service.provenance import ProvenanceLog

    log = ProvenanceLog(args.state_dir)
    try:
        records = log.read(args.session, step=args.step)
    except (FileNotFoundError, ValueError) as exc:
        print(f"crest inspect: {exc}", file=sys.stderr)
        return 2
    _describe_session(args.state_dir, args.session)
    print(f"{'round':>6} {'subset':>6} {'step':>7} {'behind':>6} {'size':>5} {'sel ms':>7}  worker")
    for r in records:
        print(
            f"{r['round_id']:>6} {r['subset_index']:>6} {r['trainer_step']:>7} {r['rounds_behind']:>6} "
            f"{r['size']:>5} {r['selection_ms']:>7.1f}  {r['worker']}"
        )
    print(f"{len(records)} batches, {sum(r['size'] for r in records)} examples")
    if args.export:
        log.export(records, args.export)
        print(f"wrote {args.export}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m selector_service.cli {serve,inspect} ...``: the service side alone."""
    parser = argparse.ArgumentParser(prog="crest", description="CREST selection service: serve and inspect.")
    add_log_level(parser)
    add_commands(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    args = parser.parse_args(argv)
    setup_logging(args)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
