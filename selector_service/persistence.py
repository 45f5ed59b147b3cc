"""Session checkpoints on disk, so a restarted service resumes every session where it was.

One file per session, ``<state_dir>/sessions/<session_id>.npz``: numpy arrays plus one JSON document, no
pickle. Writes are atomic (temporary file, fsync, rename, fsync of the directory), and the checkpoint they
replace is kept as ``<session_id>.prev.npz``. Each file carries a SHA-256 of its content (the JSON document and
every array's name, dtype, shape and bytes), verified on load.

Only a checkpoint proven corrupt (not a checkpoint archive, truncated, a zip CRC or checksum mismatch: its
bytes were read and are wrong) is moved aside as ``.corrupt`` and reported, and the previous checkpoint is used
instead. A read that fails (an ``OSError``: a disk or network-filesystem error, a file not yet readable) says
nothing about the content: it is tried again, and if it still fails the file is left where it is, the session
is reported as not restored, and a later restart restores it. The previous checkpoint is not used then, since
it is older than the file that could not be read. Neither stops the service.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

_META = "__meta__"
_SHA256 = "__sha256__"
# What decoding bytes that are not a checkpoint raises (numpy's format, zipfile, json); OSError is not one of them.
_DECODE_ERRORS = (ValueError, EOFError, KeyError, OverflowError, NotImplementedError, zipfile.BadZipFile)


class CorruptCheckpoint(ValueError):
    """A checkpoint file whose bytes were read and are not a valid checkpoint."""


def _checksum(meta_bytes: bytes, arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256(meta_bytes)
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _split(state: dict[str, Any], prefix: str = "") -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Separate a nested state dict into its JSON part and its arrays (keys joined with '/')."""
    meta: dict[str, Any] = {}
    arrays: dict[str, np.ndarray] = {}
    for key, value in state.items():
        if isinstance(value, np.ndarray):
            arrays[prefix + key] = value
        elif isinstance(value, dict):
            sub_meta, sub_arrays = _split(value, prefix + key + "/")
            meta[key] = sub_meta
            arrays.update(sub_arrays)
        else:
            meta[key] = value
    return meta, arrays


def _join(meta: dict[str, Any], arrays: dict[str, np.ndarray], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in meta.items():
        out[key] = _join(value, arrays, prefix + key + "/") if isinstance(value, dict) else value
    for name, array in arrays.items():
        if name.startswith(prefix) and "/" not in name[len(prefix) :]:
            out[name[len(prefix) :]] = array
    return out


class SessionStore:
    """Atomic per-session checkpoint files under ``root``.

    Args:
        root: the state directory; checkpoints go in its ``sessions`` folder.
        read_attempts: reads of a checkpoint before a failing read (``OSError``) is given up for this start.
        retry_delay_s: wait before the second read, doubled before each later one.
    """

    def __init__(self, root: Path | str, *, read_attempts: int = 3, retry_delay_s: float = 0.2) -> None:
        self.dir = Path(root) / "sessions"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.read_attempts = max(1, read_attempts)
        self.retry_delay_s = retry_delay_s

    def path(self, session_id: str, previous: bool = False) -> Path:
        if not session_id.isalnum():
            raise ValueError(f"session id {session_id!r} is not alphanumeric")
        return self.dir / (f"{session_id}.prev.npz" if previous else f"{session_id}.npz")

    def save(self, state: dict[str, Any]) -> None:
        """Write one session's ``state_dict`` atomically (must hold a ``session_id``)."""
        final = self.path(state["session_id"])
        meta, arrays = _split(state)
        tmp = final.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            meta_bytes = json.dumps(meta).encode()
            entries = {
                **arrays,
                _META: np.frombuffer(meta_bytes, dtype=np.uint8),
                _SHA256: np.frombuffer(_checksum(meta_bytes, arrays).encode(), dtype=np.uint8),
            }
            np.savez(f, **entries)  # type: ignore[arg-type]
            f.flush()
            os.fsync(f.fileno())
        if final.exists():
            os.replace(final, self.path(state["session_id"], previous=True))
        os.replace(tmp, final)  # a crash between the two renames leaves the previous checkpoint to load
        fd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def load(self, path: Path) -> dict[str, Any]:
        """Read and verify one checkpoint file.

        Raises:
            CorruptCheckpoint: the file was read and is not a valid checkpoint.
            OSError: the file could not be read.
        """
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {name: data[name] for name in data.files if name not in (_META, _SHA256)}
                meta_bytes = bytes(data[_META])
                stored = bytes(data[_SHA256]).decode() if _SHA256 in data.files else "none"
            computed = _checksum(meta_bytes, arrays)
            if stored != computed:
                raise CorruptCheckpoint(
                    f"checksum mismatch in {path.name}: stored {stored[:16]}, content hashes to {computed[:16]}"
                )
            return _join(json.loads(meta_bytes.decode()), arrays)
        except CorruptCheckpoint:
            raise
        except _DECODE_ERRORS as exc:
            raise CorruptCheckpoint(f"{path.name} is not a valid checkpoint: {type(exc).__name__}: {exc}") from exc

    def _read(self, path: Path) -> dict[str, Any]:
        """``load``, reading again (with a growing wait) while the read fails with ``OSError``."""
        delay = self.retry_delay_s
        for attempt in range(1, self.read_attempts):
            try:
                return self.load(path)
            except OSError as exc:
                log.warning("cannot read %s (%s), attempt %d of %d", path, exc, attempt, self.read_attempts)
                time.sleep(delay)
                delay *= 2
        return self.load(path)  # the last attempt: its error is the caller's

    def _load_session(self, session_id: str) -> dict[str, Any] | None:
        """The newest valid checkpoint of one session; None (reported) when there is none to restore now."""
        for path in (self.path(session_id), self.path(session_id, previous=True)):
            if not path.exists():
                continue
            try:
                state = self._read(path)
            except CorruptCheckpoint as exc:
                aside = path.with_name(path.name.removesuffix(".npz") + ".corrupt")
                os.replace(path, aside)
                log.error("session checkpoint %s is corrupt (%s); moved to %s", path, exc, aside)
                continue
            except Exception as exc:  # not proven corrupt: a failing disk, a file not readable yet
                log.error(
                    "session %s not restored: cannot read %s (%s: %s); the file is left in place and the next "
                    "start tries it again",
                    session_id,
                    path,
                    type(exc).__name__,
                    exc,
                )
                return None
            if path.name.endswith(".prev.npz"):
                log.warning("session %s restored from its previous checkpoint %s", session_id, path)
            return state
        return None

    def load_all(self) -> list[dict[str, Any]]:
        """The newest valid checkpoint of every session (the previous one when the newest is corrupt)."""
        states = []
        for session_id in sorted({p.name.split(".", 1)[0] for p in self.dir.glob("*.npz")}):
            if (state := self._load_session(session_id)) is not None:
                states.append(state)
        for stale in self.dir.glob("*.tmp"):  # a write interrupted before its rename
            stale.unlink()
        return states

    def delete(self, session_id: str) -> None:
        self.path(session_id).unlink(missing_ok=True)
        self.path(session_id, previous=True).unlink(missing_ok=True)
