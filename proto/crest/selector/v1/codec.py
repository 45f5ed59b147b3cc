"""What both sides of the wire contract share: numpy arrays to and from the little-endian ``bytes`` fields,
the names of the wire enums, and the defaults that a zero field stands for.

Decoding validates the byte length and raises ``WireError`` (a ``ValueError``) naming the field, what was
received and what was expected; the service answers it with INVALID_ARGUMENT.
"""

from __future__ import annotations

from typing import TypeVar

import numpy as np

from crest.selector.v1 import selector_pb2 as pb

INT64 = np.dtype("<i8")
FLOAT32 = np.dtype("<f4")

# Largest message either side sends or accepts (bytes). Payload chunks stay well below it.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
# gRPC metadata key of the per-session token (see the header of selector.proto); lower case, as gRPC requires.
SESSION_TOKEN_KEY = "x-crest-session-token"
# Target payload of one streamed message (bytes); the design keeps messages under ~3 MiB.
CHUNK_BYTES = 2 * 1024 * 1024

# What a zero (unset) field of CrestConfig means, as the .proto states: the one place either side reads them.
DEFAULT_SUBSET_FRACTION = 0.01  # r = 1% of N, as in CREST
DEFAULT_NUM_SUBSETS = 5  # P, CREST's starting value
DEFAULT_BATCH_SIZE = 128  # m, CREST's mini-batch size
DEFAULT_SIMILARITY = "exp"
DEFAULT_EMBEDDING_KIND = "logit_gradient"
# Learned-example exclusion (CREST section 4): the cross-entropy in nats at or below which a recorded loss counts
# as learned (CREST's drop_thresh), the recorded losses in a row that must all be (CREST's 5 history slots), and
# the sampling pool's floor as a fraction of N (CREST's absolute 40,000 is 0.8 of CIFAR's 50,000).
DEFAULT_DROP_THRESHOLD = 0.1
DEFAULT_DROP_WINDOW = 5
DEFAULT_MIN_POOL_FRACTION = 0.8

# Names of the wire enums' values (UNSPECIFIED is absent: it means the default above).
SIMILARITIES: dict[str, pb.Similarity] = {"exp": pb.SIMILARITY_EXP, "maxdist": pb.SIMILARITY_MAXDIST}
EMBEDDING_KINDS: dict[str, pb.EmbeddingKind] = {
    "logit_gradient": pb.EMBEDDING_LOGIT_GRADIENT,
    "last_layer_gradient": pb.EMBEDDING_LAST_LAYER_GRADIENT,
}


E = TypeVar("E", bound=int)  # a wire enum (pb.Similarity, pb.EmbeddingKind)


class WireError(ValueError):
    """A message that breaks the wire contract (byte length, enum value); the message names the field."""


def enum_value(field: str, table: dict[str, E], name: str) -> E:
    """The wire value of ``name`` in ``table`` (``SIMILARITIES`` or ``EMBEDDING_KINDS``)."""
    if name not in table:
        raise WireError(f"{field} must be one of {sorted(table)}, received {name!r}")
    return table[name]


def enum_name(field: str, table: dict[str, E], value: int, default: str) -> str:
    """The name of wire value ``value`` in ``table``; 0 (UNSPECIFIED) is ``default``."""
    if value == 0:
        return default
    for name, v in table.items():
        if v == value:
            return name
    raise WireError(f"{field}: unknown enum value {value}; expected one of {sorted(table.values())} or 0")


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
            raise WireError(
                f"{field}: {len(data)} bytes is not a whole number of {dtype.name} rows of width {cols} "
                f"({row_bytes} bytes each)"
            )
        rows = len(data) // row_bytes
    elif len(data) != rows * row_bytes:
        raise WireError(
            f"{field}: received {len(data)} bytes, expected {rows} x {cols} {dtype.name} = {rows * row_bytes} bytes"
        )
    out = np.frombuffer(data, dtype=dtype)
    return out if cols == 1 else out.reshape(rows, cols)


def chunk_rows(dim: int, bytes_per_row_extra: int = 20) -> int:
    """Rows per streamed message so that ``dim`` float32 values plus per-row extras fit in ``CHUNK_BYTES``."""
    return max(1, CHUNK_BYTES // (4 * dim + bytes_per_row_extra))
