"""Atomic file writes: temp name in the same directory -> flush + fsync -> ``os.replace``.

A reader (or a killed writer's rerun) never sees a half-written file under its final name.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

TMP_SUFFIX = ".tmp"


def fsync_replace(tmp: Path, final: Path) -> None:
    """Make ``tmp``'s bytes durable, then move it over ``final`` atomically."""
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, final)
    dfd = os.open(final.parent, os.O_RDONLY)  # persist the rename itself
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + TMP_SUFFIX)
    with open(tmp, "wb") as f:
        f.write(data)
    fsync_replace(tmp, path)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def atomic_write_parquet(path: str | Path, table: Any, **kwargs: Any) -> None:
    """Write a pyarrow Table (or polars DataFrame) atomically."""
    import pyarrow.parquet as pq

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if hasattr(table, "to_arrow"):
        table = table.to_arrow()
    tmp = path.with_name(path.name + TMP_SUFFIX)
    pq.write_table(table, tmp, **kwargs)
    fsync_replace(tmp, path)
