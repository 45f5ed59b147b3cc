"""The ``crest`` command: ``serve``, ``train``, ``inspect``, ``demo`` and ``bench train``. All flags are parsed
here, and this is the only place that reads environment variables (CREST_AUTH_TOKEN, CREST_DATA_DIR)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

from selector_service.process import READY_PREFIX


def _add_server_flags(p: argparse.ArgumentParser) -> None:
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


def _add_train_flags(p: argparse.ArgumentParser, steps_per_round: int | None = None) -> None:
    p.add_argument("--steps", type=int, default=1000, help="optimizer steps (one coreset batch each); default 1000")
    p.add_argument("--lr", type=float, default=0.05, help="peak SGD learning rate, cosine-annealed; default 0.05")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum; default 0.9")
    p.add_argument("--batch-size", type=int, default=128, help="coreset size m = training batch size; default 128")
    p.add_argument(
        "--subset-fraction",
        type=float,
        default=0.01,
        help="random-subset size r as a fraction of the dataset; default 0.01 (CREST)",
    )
    p.add_argument("--num-subsets", type=int, default=5, help="random subsets (coresets) per round P; default 5")
    p.add_argument(
        "--steps-per-round",
        type=int,
        default=steps_per_round,
        help="use the fixed rule: every region lasts this many steps "
        + (
            f"(default {steps_per_round}; 0: CREST's Taylor check decides)"
            if steps_per_round
            else "(default: CREST's Taylor check decides)"
        ),
    )
    p.add_argument(
        "--lookahead-steps",
        type=int,
        default=4,
        help="steps between asking for the next round and switching to it; default 4",
    )
    p.add_argument(
        "--tau",
        type=float,
        default=0.1,
        help="CREST check threshold: reselect when the quadratic model is off by more than tau x loss; default 0.1",
    )
    p.add_argument(
        "--check-examples",
        type=int,
        default=256,
        help="random-subset ids the check evaluates (a fixed sample per round; 0: all, as CREST); default 256",
    )
    p.add_argument(
        "--embedding",
        choices=["logit_gradient", "last_layer_gradient"],
        default="logit_gradient",
        help="selection feature: softmax(z) - onehot(y) (default) or its outer product with the last features",
    )
    p.add_argument(
        "--similarity",
        choices=["exp", "maxdist"],
        default="exp",
        help="facility-location kernel: exp(-dist/d) as in CREST, or max-dist minus dist as in CRAIG",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of model init, subset sampling and shuffling")
    p.add_argument(
        "--data-dir",
        default=os.environ.get("CREST_DATA_DIR"),
        help="directory with the four Fashion-MNIST .gz files (default: $CREST_DATA_DIR, then "
        "/usr/share/datasets/fashion-mnist)",
    )
    p.add_argument("--train-limit", type=int, default=None, help="use only the first N training examples")
    p.add_argument("--test-limit", type=int, default=None, help="evaluate on only the first N test examples")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the trainer; default 1")
    p.add_argument("--log-every", type=int, default=100, help="log progress every N steps (0: never)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="crest", description="CREST data selection as a service.")
    parser.add_argument(
        "--log-level",
        default=None,
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="logging verbosity on stderr; default INFO (WARNING for bench, whose progress bars it would break)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser(
        "serve",
        help="run the selection service",
        description="Run the gRPC selection service until SIGTERM/SIGINT. Prints "
        f"'{READY_PREFIX}HOST:PORT' on stdout once it serves.",
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
    _add_server_flags(serve)

    train = sub.add_parser(
        "train",
        help="train the Fashion-MNIST CNN against a running service",
        description="Train a small CNN on Fashion-MNIST with CREST coresets from the service "
        "at --endpoint, then print test accuracy and cost.",
    )
    train.add_argument("--endpoint", default="127.0.0.1:50051", help="service address HOST:PORT")
    train.add_argument(
        "--token",
        default=os.environ.get("CREST_AUTH_TOKEN"),
        help="bearer token for the service (default: $CREST_AUTH_TOKEN)",
    )
    _add_train_flags(train)

    inspect = sub.add_parser(
        "inspect",
        help="show which batches a session was served (provenance)",
        description="Read a session's provenance log from the service's --state-dir: every delivered batch "
        "with its round, the trainer step its embeddings came from, staleness, worker, ids and weights.",
    )
    inspect.add_argument("--state-dir", required=True, help="the --state-dir the service ran with")
    inspect.add_argument("--session", required=True, help="session id (as logged by the service and the trainer)")
    inspect.add_argument(
        "--step", type=int, default=None, help="only batches whose embeddings were computed at this trainer step"
    )
    inspect.add_argument(
        "--export", default=None, help="write the records to this file: .csv, or .jsonl for JSON lines"
    )

    demo = sub.add_parser(
        "demo",
        help="start a local service and train against it",
        description="Start the service on localhost (embedded Ray), train the Fashion-MNIST "
        "CNN through it over gRPC, print the results, stop the service. The demo trains 50 steps on each "
        "round's coresets so it finishes in a few minutes on 2 CPU cores; --steps-per-round 0 switches to "
        "CREST's adaptive Taylor check (several times slower on CPU, where every reselection costs a "
        "forward pass over the round's random subsets and a Hessian estimate).",
    )
    _add_server_flags(demo)
    _add_train_flags(demo, steps_per_round=50)

    bench = sub.add_parser("bench", help="benchmarks", description="Benchmarks that start their own service.")
    benches = bench.add_subparsers(dest="bench", required=True, metavar="BENCHMARK")
    _add_bench_train(benches)
    return parser


def _add_bench_train(benches: Any) -> None:
    p = benches.add_parser(
        "train",
        help="time to accuracy: CREST against full data, random batches and InfoBatch",
        description="Train the same model under full data, uniform random batches, CREST through a local service "
        "(embedded Ray) and InfoBatch-style pruning, for the same steps and seeds; write JSON, a markdown table "
        "and PNG plots (accuracy vs time and vs examples, difficulty of the selected examples, fraction of the "
        "data left out). Defaults: Fashion-MNIST with a small CNN, 1,000 steps, 3 seeds (about 30 minutes on 2 "
        "cores). See benchmarks/train.py.",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="the first 6,000/1,000 examples (CREST subsets of 10%% so r stays 600), 150 steps, 1 seed, every method "
        "(about 2 minutes; the test suite's mode)",
    )
    p.add_argument(
        "--demo",
        action="store_true",
        help="full and crest only, 1 seed, results/demo.json (what make demo runs; about 5 minutes on 2 cores)",
    )
    p.add_argument("--seeds", type=int, default=None, help="seeds per method (default 3; --quick and --demo 1)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 1000, --quick 150)")
    p.add_argument(
        "--methods",
        default=None,
        help="comma-separated subset of full,random,crest,infobatch; full is required (default all; --demo full,crest)",
    )
    p.add_argument(
        "--crest-adaptive", action="store_true", help="CREST's Taylor check ends regions (default: 50-step regions)"
    )
    p.add_argument(
        "--drop-learned",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="CREST: the service's learned-example exclusion (loss <= 0.1 over 5 visits; floor 0.8 N); default on",
    )
    p.add_argument("--prune", type=float, default=0.5, help="InfoBatch: pruned fraction of low-loss examples")
    p.add_argument("--num-workers", type=int, default=2, help="selector actors of the service; default 2")
    p.add_argument(
        "--dataset",
        default="benchmarks.train_data:fashion_mnist",
        help="MODULE:FUNCTION or FILE.py:FUNCTION returning a benchmarks.train_data.BenchData (map-style train/test "
        "datasets and a model factory); default Fashion-MNIST with the SmallCNN",
    )
    p.add_argument(
        "--data-dir",
        default=os.environ.get("CREST_DATA_DIR"),
        help="passed to the dataset hook; Fashion-MNIST: the directory of its four .gz files (default: "
        "$CREST_DATA_DIR, then /usr/share/datasets/fashion-mnist)",
    )
    p.add_argument(
        "--out",
        default=None,
        help="JSON output; the .md table and the PNGs go next to it (default results/train.json, --demo "
        "results/demo.json)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar (it shows only on a terminal)")


def _train_config(args: argparse.Namespace) -> Any:
    from trainer_client.loader import LoaderConfig
    from trainer_client.region import RegionConfig
    from trainer_client.train import TrainConfig

    loader = LoaderConfig(
        batch_size=args.batch_size,
        subset_fraction=args.subset_fraction,
        num_subsets=args.num_subsets,
        similarity=args.similarity,
        seed=args.seed,
        steps_per_round=args.steps_per_round or None,
        lookahead_steps=args.lookahead_steps,
        region=RegionConfig(tau=args.tau),
        check_examples=args.check_examples,
        embedding=args.embedding,
        client_name=f"crest-{args.command}",
    )
    return TrainConfig(
        steps=args.steps,
        lr=args.lr,
        momentum=args.momentum,
        loader=loader,
        seed=args.seed,
        data_dir=args.data_dir,
        train_limit=args.train_limit,
        test_limit=args.test_limit,
        threads=args.threads,
        log_every=args.log_every,
    )


def _run_serve(args: argparse.Namespace) -> int:
    from selector_service.server import ServerConfig, serve_forever

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


def _run_train(args: argparse.Namespace, endpoint: str, token: str | None) -> int:
    from trainer_client.client import SelectionClient
    from trainer_client.train import train

    config = _train_config(args)
    with SelectionClient(endpoint, token=token) as client:
        client.wait_ready(timeout_s=60)
        result = train(config, client)
    n = config.train_limit or 60000
    rows = [
        ("test accuracy", f"{result.test_accuracy:.4f}"),
        ("wall time", f"{result.wall_s:.1f} s"),
        ("optimizer steps", f"{result.steps}"),
        (
            "examples back-propagated",
            f"{result.examples_backpropagated:,} ({result.examples_backpropagated / n:.2f} epochs)",
        ),
        ("examples embedded (forward only)", f"{result.examples_embedded:,}"),
        ("selection rounds", f"{result.rounds}"),
        ("trainer wait for coresets", f"{result.wait_s:.2f} s ({100 * result.wait_s / result.wall_s:.1f}% of wall)"),
        ("embedding time", f"{result.embed_s:.2f} s"),
        ("Taylor checks / reselections", f"{result.checks} / {result.reselections}"),
        ("check time / quadratic-model time", f"{result.check_s:.2f} s / {result.fit_s:.2f} s"),
        ("uniform fallback batches (late rounds)", f"{result.fallback_batches} ({result.late_steps})"),
        ("service errors ridden out", f"{result.service_errors}"),
    ]
    width = max(len(k) for k, _ in rows)
    print(f"\nCREST on Fashion-MNIST via {endpoint}")
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")
    return 0


def _run_demo(args: argparse.Namespace) -> int:
    from selector_service.process import spawn_service

    serve = ["--port", "0", "--backend", args.backend, "--num-workers", str(args.num_workers)]
    serve += ["--cpus-per-worker", str(args.cpus_per_worker), "--gpus-per-worker", str(args.gpus_per_worker)]
    if args.ray_address:
        serve += ["--ray-address", args.ray_address]
    with spawn_service(serve, log_level=args.log_level) as service:
        logging.getLogger("crest").info("service ready at %s (pid %d)", service.target, service.proc.pid)
        return _run_train(args, service.target, None)


def _run_inspect(args: argparse.Namespace) -> int:
    from selector_service.provenance import ProvenanceLog

    log = ProvenanceLog(args.state_dir)
    try:
        records = log.read(args.session, step=args.step)
    except (FileNotFoundError, ValueError) as exc:
        print(f"crest inspect: {exc}", file=sys.stderr)
        return 2
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


def _run_bench(args: argparse.Namespace) -> int:
    from benchmarks.train import run

    return run(args)


def main(argv: list[str] | None = None) -> int:
    # Before torch loads anywhere: OpenMP spin-waiting slows torch 10-70x next to other busy processes.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    args = build_parser().parse_args(argv)
    args.log_level = args.log_level or ("WARNING" if args.command == "bench" else "INFO")
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "bench":
        return _run_bench(args)
    if args.command == "serve":
        return _run_serve(args)
    if args.command == "train":
        return _run_train(args, args.endpoint, args.token)
    if args.command == "inspect":
        return _run_inspect(args)
    return _run_demo(args)


if __name__ == "__main__":
    sys.exit(main())
