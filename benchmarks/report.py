"""Shared by the benchmark scripts: the machine they ran on, and result files written atomically (a reader never
sees half of one)."""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

# CPU features that change what a step costs here (the bfloat16 embedding pass needs one of the first three).
CPU_FLAGS = ("avx512_bf16", "amx_bf16", "amx_tile", "avx512f", "avx2")


def machine() -> dict[str, Any]:
    """Where a benchmark ran: platform string, CPU count and model (with the flags of ``CPU_FLAGS`` it has, from
    /proc/cpuinfo where there is one), Python version. Results measured on two CPU models are not comparable in
    seconds, only in the ratios each run measures side by side."""
    model, flags = "", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and not model:
                    model = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "cpu_model": model or platform.processor(),
        "cpu_flags": [f for f in CPU_FLAGS if f in flags],
        "python": sys.version.split()[0],
    }


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename, creating the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def write_json(path: Path, doc: dict[str, Any]) -> None:
    """Write ``doc`` as indented JSON, atomically."""
    write_atomic(path, json.dumps(doc, indent=2))
