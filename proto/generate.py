"""Regenerate the Python wire code from the .proto contract.

    python proto/generate.py            # rewrite proto/crest/selector/v1/selector_pb2*.py(i)
    python proto/generate.py --check    # exit 1 if the committed copy is stale

The generated modules live beside the .proto and are importable as ``crest.selector.v1``; they are never
edited by hand. ``tests/test_proto_fresh.py`` runs the check.
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
PROTO_FILES = ("crest/selector/v1/selector.proto",)
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def generated_paths(root: Path) -> list[Path]:
    """Paths of every generated file under ``root`` (one per proto file and suffix)."""
    return [root / f"{p.removesuffix('.proto')}{s}" for p in PROTO_FILES for s in GENERATED_SUFFIXES]


def generate(out_root: Path) -> None:
    """Run protoc (from grpcio-tools) on every proto file, writing the Python copy under ``out_root``."""
    from grpc_tools import protoc  # dev dependency; imported here so --help works without it

    for proto in PROTO_FILES:
        args = [
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"--python_out={out_root}",
            f"--pyi_out={out_root}",
            f"--grpc_python_out={out_root}",
            str(PROTO_ROOT / proto),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {proto}: {' '.join(args)}")


def stale_files() -> list[str]:
    """Generated files whose committed copy differs from a fresh generation (empty when fresh)."""
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        fresh = generated_paths(Path(tmp))
        committed = generated_paths(PROTO_ROOT)
        return [
            str(c.relative_to(PROTO_ROOT))
            for f, c in zip(fresh, committed, strict=True)
            if not c.exists() or not filecmp.cmp(f, c, shallow=False)
        ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only report stale files; exit 1 if any")
    args = parser.parse_args()
    if args.check:
        stale = stale_files()
        for name in stale:
            print(f"stale: proto/{name} (run: python proto/generate.py)", file=sys.stderr)
        return 1 if stale else 0
    generate(PROTO_ROOT)
    print("regenerated: " + ", ".join(str(p.relative_to(PROTO_ROOT)) for p in generated_paths(PROTO_ROOT)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
