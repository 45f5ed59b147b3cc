"""The committed generated wire code equals a fresh generation from the .proto."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from crest.selector.v1 import codec

ROOT = Path(__file__).resolve().parents[1]


def _generator():
    spec = importlib.util.spec_from_file_location("proto_generate", ROOT / "proto" / "generate.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_code_is_fresh() -> None:
    stale = _generator().stale_files()
    assert stale == [], f"regenerate with: python proto/generate.py (stale: {stale})"


def test_codec_round_trip_is_little_endian() -> None:
    ids = np.array([1, 2, 1 << 40], dtype=np.int64)
    data = codec.encode(ids, codec.INT64)
    assert data[:8] == (1).to_bytes(8, "little")
    np.testing.assert_array_equal(codec.decode("ids", data, codec.INT64), ids)
    emb = np.arange(6, dtype=np.float32).reshape(3, 2)
    np.testing.assert_array_equal(codec.decode("e", codec.encode(emb, codec.FLOAT32), codec.FLOAT32, 3, 2), emb)


def test_codec_rejects_wrong_lengths_naming_the_field() -> None:
    with pytest.raises(ValueError, match=r"weights: received 8 bytes, expected 3 x 1 float32 = 12 bytes"):
        codec.decode("weights", b"\0" * 8, codec.FLOAT32, rows=3)
    with pytest.raises(ValueError, match="ids: 12 bytes is not a whole number of int64"):
        codec.decode("ids", b"\0" * 12, codec.INT64)
