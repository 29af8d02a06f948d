"""On-disk format of an activation dataset: manifest, shard schema, vector encoding."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.io import sha256_file  # noqa: F401  re-exported: shard hashes are part of the format

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
# ``shard-00003.parquet.sha256``: the shard's sha256 as it was written (``sha256sum`` format), written
# atomically right after the shard. A resumed extraction keeps a shard only if its bytes still match it.
SIDECAR_SUFFIX = ".sha256"
# What to do about a missing or damaged shard: the resume of `sae extract` rewrites exactly those shards.
REGENERATE = "re-run `sae extract` (or rewrite this dataset if you wrote it yourself) to regenerate it"
NP_DTYPES = {"float16": np.float16, "float32": np.float32}
ROW_GROUP_ROWS = 8192  # streaming granularity: ~9 MB of fp16 at d_model 576


@dataclass
class ShardInfo:
    file: str
    rows: int
    sha256: str


@dataclass
class Manifest:
    """Everything needed to trust and reuse a dataset without rerunning the model."""

    hook: str
    d_model: int
    dtype: str
    n_tokens: int = 0
    model_id: str = ""
    revision: str | None = None
    weights_hash: str = ""
    tokenizer: str = ""
    corpus: str = ""
    split: str = ""
    context_length: int = 0
    bos: str = ""
    format_version: int = FORMAT_VERSION
    shards: list[ShardInfo] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Manifest:
        shards = [ShardInfo(**s) for s in data.get("shards", [])]
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__ and k != "shards"}
        return cls(**known, shards=shards)


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.parquet"


def sidecar_path(shard: Path) -> Path:
    return shard.with_name(shard.name + SIDECAR_SUFFIX)


def _schema(d_model: int, dtype: str) -> pa.Schema:
    width = d_model * np.dtype(NP_DTYPES[dtype]).itemsize
    return pa.schema([
        ("context_id", pa.int32()), ("position", pa.int32()), ("token_id", pa.int32()),
        ("act", pa.binary(width)),
    ])


def encode_shard_table(context_id: np.ndarray, position: np.ndarray, token_id: np.ndarray,
                       acts: np.ndarray, dtype: str) -> pa.Table:
    """Rows for one shard. ``acts``: [N, d_model] array, cast to the storage dtype."""
    acts = np.ascontiguousarray(acts, dtype=NP_DTYPES[dtype])
    n, d = acts.shape
    width = d * acts.itemsize
    act_col = pa.FixedSizeBinaryArray.from_buffers(pa.binary(width), n, [None, pa.py_buffer(acts.reshape(-1).view(np.uint8))])
    return pa.Table.from_arrays(
        [pa.array(np.asarray(context_id, np.int32)), pa.array(np.asarray(position, np.int32)),
         pa.array(np.asarray(token_id, np.int32)), act_col],
        schema=_schema(d, dtype),
    )


def _decode_acts(col: pa.ChunkedArray | pa.Array, d_model: int, dtype: str) -> np.ndarray:
    """fixed_size_binary column -> [N, d_model] array, zero-copy per chunk."""
    chunks = col.chunks if isinstance(col, pa.ChunkedArray) else [col]
    parts = []
    for c in chunks:
        width = c.type.byte_width
        buf = c.buffers()[1]
        raw = np.frombuffer(buf, dtype=np.uint8, count=(c.offset + len(c)) * width)[c.offset * width:]
        parts.append(raw.view(NP_DTYPES[dtype]).reshape(len(c), d_model))
    return parts[0] if len(parts) == 1 else np.concatenate(parts)
