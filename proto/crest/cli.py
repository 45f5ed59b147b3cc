"""The ``crest`` command: a composition root with a lazy table of commands.

Each side keeps its commands in its own package; this module only names them (``COMMANDS``) and imports the one
module a command line runs, by name. So ``crest serve`` loads the service side alone (no torch, no benchmarks),
and runs where neither is installed; ``crest --help`` builds every installed side's parser, and a side that is not
installed keeps its command names, which then say what to install.

A command module registers its commands with ``add_commands(sub)`` (``sub`` an ``add_subparsers`` result) and
runs the parsed ones with ``run(args) -> int``. ``args.argv`` holds the exact command line, for the results that
record it. Environment read here: none (each side reads its own).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from types import ModuleType

# command -> (the module that registers and runs it, the extras that install it)
COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("selector_service.cli", "cpu"),
    "inspect": ("selector_service.cli", "cpu"),
    "train": ("trainer_client.cli", "trainer"),
    "demo": ("crest_bench.demo", "trainer,cpu"),
    "bench": ("crest_bench.cli", "trainer,cpu,bench"),
}


def add_log_level(parser: argparse.ArgumentParser) -> None:
    """The global ``--log-level`` flag of every ``crest`` entry point."""
    parser.add_argument(
        "--log-level",
        default=None,
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="logging verbosity on stderr; default INFO (WARNING for bench, whose progress bars it would break)",
    )


def setup_logging(args: argparse.Namespace) -> None:
    """Logging on stderr at ``--log-level`` (INFO, or WARNING for ``bench``)."""
    args.log_level = args.log_level or ("WARNING" if args.command == "bench" else "INFO")
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def build_parser(commands: tuple[str, ...] | None = None) -> argparse.ArgumentParser:
    """The ``crest`` parser with ``commands`` (default: all), importing only the modules that register them."""
    parser = argparse.ArgumentParser(prog="crest", description="CREST data selection as a service.")
    add_log_level(parser)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    wanted = commands or tuple(COMMANDS)
    done: set[str] = set()
    for command in wanted:
        module_name, extras = COMMANDS[command]
        if module_name in done:
            continue
        done.add(module_name)
        module, _ = _load(module_name)
        if module is not None:
            module.add_commands(sub)
        else:
            for name, (other, _) in COMMANDS.items():
                if other == module_name and name in wanted:
                    _add_missing(sub, name, extras)
    return parser


def _load(module_name: str) -> tuple[ModuleType | None, str]:
    """The command module, or (None, why) when it or its side's dependencies cannot be imported."""
    try:
        return importlib.import_module(module_name), ""
    except ImportError as exc:
        return None, str(exc)


def _add_missing(sub: argparse._SubParsersAction, name: str, extras: str) -> None:
    p = sub.add_parser(name, help=f"(not installed: needs the [{extras}] extras)", add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER, help="not available: its side is not installed")


def _command(argv: list[str]) -> str | None:
    """The command word of ``argv`` (after the global ``--log-level LEVEL``), None when there is none."""
    words = iter(argv)
    for word in words:
        if word == "--log-level":
            next(words, None)
        elif not word.startswith("-"):
            return word
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # Before torch loads anywhere: OpenMP spin-waiting slows torch 10-70x next to other busy processes.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    command = _command(argv)
    known = command in COMMANDS
    parser = build_parser((command,) if known else None)  # type: ignore[arg-type]
    args = parser.parse_args(argv)
    module, why = _load(COMMANDS[args.command][0])
    if module is None:
        module_name, extras = COMMANDS[args.command]
        print(
            f"crest {args.command}: its side is not installed ({module_name}: {why}); install it: "
            f"pip install '.[{extras}]' from a checkout, or the wheel that `make wheel` builds with the same extras",
            file=sys.stderr,
        )
        return 2
    args.argv = argv
    setup_logging(args)
    return int(module.run(args))


if __name__ == "__main__":
    sys.exit(main())
