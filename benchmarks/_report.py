"""Shared by the benchmark scripts: the machine they ran on, and result files written atomically (a reader never
sees half of one)."""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path
from typing import Any


def machine() -> dict[str, Any]:
    """Where a benchmark ran: platform string, CPU count, Python version."""
    return {"platform": platform.platform(), "cpus": os.cpu_count(), "python": sys.version.split()[0]}


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename, creating the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def write_json(path: Path, doc: dict[str, Any]) -> None:
    """Write ``doc`` as indented JSON, atomically."""
    write_atomic(path, json.dumps(doc, indent=2))
