"""pipeline.io's small helpers: the file sha256 and NaN -> null for JSON (atomic writes: test_integrity.py)."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np

from pipeline.io import atomic_write_json, json_digest, json_number, nan_to_null, sha256_file


def test_sha256_file_matches_hashlib_across_chunks(tmp_path: Path) -> None:
    data = bytes(range(256)) * (1 << 15)  # 8 MiB: two full 4 MiB chunks
    path = tmp_path / "blob"
    path.write_bytes(data + b"tail")
    assert sha256_file(path) == hashlib.sha256(data + b"tail").hexdigest()
    path.write_bytes(b"")
    assert sha256_file(path) == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


def test_json_number() -> None:
    assert json_number(math.nan) is None and json_number(-math.inf) is None and json_number(None) is None
    assert json_number(np.float32(np.nan), 4) is None
    assert json_number(0.123456789, 4) == 0.1235 and json_number(np.float32(2.5), 2) == 2.5
    x = np.float64(0.1)
    assert json_number(x) is x  # without digits: the value itself, unrounded


def test_nan_to_null_reaches_nested_values_and_keeps_the_rest(tmp_path: Path) -> None:
    tree = {"a": math.nan, "b": {"c": [1.0, math.inf, {"d": np.float64("nan")}], "e": (2, "x")}, "f": True, "g": 3}
    out = nan_to_null(tree)
    assert out == {"a": None, "b": {"c": [1.0, None, {"d": None}], "e": [2, "x"]}, "f": True, "g": 3}
    atomic_write_json(tmp_path / "m.json", out)
    json.loads((tmp_path / "m.json").read_text(), parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))


def test_json_digest_is_canonical_json_sha256() -> None:
    # Key order does not matter; the digest is the first 16 hex digits of sha256 of the sorted-key JSON.
    assert json_digest({"b": 1, "a": [1, 2]}) == json_digest({"a": [1, 2], "b": 1})
    assert json_digest({"b": 1, "a": [1, 2]}) == hashlib.sha256(b'{"a": [1, 2], "b": 1}').hexdigest()[:16]
    assert json_digest({"p": Path("x")}) == json_digest({"p": "x"})  # non-JSON values by str
