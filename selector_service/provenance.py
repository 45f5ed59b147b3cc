"""Provenance: an append-only log of every weighted batch the service delivered, per session.

``<state_dir>/provenance/<session_id>.jsonl``, one JSON object per batch: session, round, subset, the trainer
step its embeddings were computed at, how many rounds ahead of the newest it was delivered (staleness), the
worker that selected it, its ids and weights. ``crest inspect`` reads it back and exports CSV or JSON lines
(``pandas.read_csv`` / ``pandas.read_json(lines=True)``).
"""

from __future__ import annotations

import csv
import json
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # for the annotation only: ``crest inspect`` reads logs without loading the selection engine
    from selector_service.tasks import Batch

FIELDS = (
    "session_id",
    "round_id",
    "subset_index",
    "trainer_step",
    "rounds_behind",
    "worker",
    "selection_ms",
    "delivered_at",
    "size",
    "ids",
    "weights",
)


def batch_record(batch: Batch, rounds_behind: int) -> dict[str, Any]:
    """The record of one delivered batch (``FIELDS`` but ``delivered_at``); weights to 6 decimals."""
    return {
        "session_id": batch.session_id,
        "round_id": batch.round_id,
        "subset_index": batch.subset_index,
        "trainer_step": batch.trainer_step,
        "rounds_behind": rounds_behind,
        "worker": batch.worker,
        "selection_ms": round(batch.selection_ms, 3),
        "size": len(batch.ids),
        "ids": batch.ids.tolist(),
        "weights": [round(float(w), 6) for w in batch.weights],
    }


class ProvenanceLog:
    """Per-session JSON-lines files under ``<root>/provenance``; appends are serialised and flushed."""

    def __init__(self, root: Path | str) -> None:
        self.dir = Path(root) / "provenance"
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def path(self, session_id: str) -> Path:
        if not session_id.isalnum():
            raise ValueError(f"session id {session_id!r} is not alphanumeric")
        return self.dir / f"{session_id}.jsonl"

    def append(self, record: dict[str, Any]) -> None:
        """Append one delivered batch (keys: ``FIELDS`` except ``delivered_at``, which is set here)."""
        line = json.dumps({**record, "delivered_at": time.time()}, separators=(",", ":"))
        with self._lock, open(self.path(record["session_id"]), "a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()

    def read(self, session_id: str, step: int | None = None) -> list[dict[str, Any]]:
        """Every record of a session (or those whose embeddings were computed at trainer ``step``).

        A last line cut short by a crash is skipped; a session without a log raises ``FileNotFoundError``.
        """
        path = self.path(session_id)
        if not path.exists():
            raise FileNotFoundError(f"no provenance for session {session_id!r} in {self.dir}")
        records = []
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a torn final append
                if step is None or record["trainer_step"] == step:
                    records.append(record)
        return records

    @staticmethod
    def export(records: list[dict[str, Any]], out: Path | str) -> None:
        """Write ``records`` as CSV (ids and weights space-separated) or, for ``.jsonl``/``.json``, JSON lines."""
        out = Path(out)
        if out.suffix in (".jsonl", ".json"):
            out.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
            return
        with open(out, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=FIELDS)
            writer.writeheader()
            for r in records:
                writer.writerow(
                    {**r, "ids": " ".join(map(str, r["ids"])), "weights": " ".join(f"{w:.6g}" for w in r["weights"])}
                )
