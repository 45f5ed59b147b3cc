"""Numpy arrays to and from the little-endian ``bytes`` fields of the wire contract.

Shared by the service and the trainer client so both sides agree on dtype, byte order and shape checks.
Decoding validates the byte length and raises ``ValueError`` naming the field, what was received and what
was expected; callers turn that into INVALID_ARGUMENT.
"""

from __future__ import annotations

import numpy as np

INT64 = np.dtype("<i8")
FLOAT32 = np.dtype("<f4")

# Largest message either side sends or accepts (bytes). Payload chunks stay well below it.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
# gRPC metadata key of the per-session token (see the header of selector.proto); lower case, as gRPC requires.
SESSION_TOKEN_KEY = "x-crest-session-token"
# Target payload of one streamed message (bytes); the design keeps messages under ~3 MiB.
CHUNK_BYTES = 2 * 1024 * 1024


def encode(array: np.ndarray, dtype: np.dtype) -> bytes:
    """Return ``array`` as little-endian C-order bytes of ``dtype``."""
    return np.ascontiguousarray(array, dtype=dtype).tobytes()


def decode(field: str, data: bytes, dtype: np.dtype, rows: int | None = None, cols: int = 1) -> np.ndarray:
    """Decode ``data`` into a read-only array of ``dtype``.

    Args:
        field: field name for error messages.
        data: the raw bytes.
        dtype: ``INT64`` or ``FLOAT32``.
        rows: expected number of rows; ``None`` accepts any whole number of rows.
        cols: row width; the result has shape ``(rows,)`` when 1, else ``(rows, cols)``.
    """
    row_bytes = dtype.itemsize * cols
    if rows is None:
        if len(data) % row_bytes:
            raise ValueError(
                f"{field}: {len(data)} bytes is not a whole number of {dtype.name} rows of width {cols} "
                f"({row_bytes} bytes each)"
            )
        rows = len(data) // row_bytes
    elif len(data) != rows * row_bytes:
        raise ValueError(
            f"{field}: received {len(data)} bytes, expected {rows} x {cols} {dtype.name} = {rows * row_bytes} bytes"
        )
    out = np.frombuffer(data, dtype=dtype)
    return out if cols == 1 else out.reshape(rows, cols)


def chunk_rows(dim: int, bytes_per_row_extra: int = 20) -> int:
    """Rows per streamed message so that ``dim`` float32 values plus per-row extras fit in ``CHUNK_BYTES``."""
    return max(1, CHUNK_BYTES // (4 * dim + bytes_per_row_extra))
