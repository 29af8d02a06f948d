"""Files: atomic writes, the sha256 of a file, JSON-safe numbers.

Every write goes temp name in the same directory -> flush + fsync -> ``os.replace``: a reader (or a
killed writer's rerun) never sees a half-written file under its final name. A full disk (or quota)
during a write is one :class:`DiskFullError` line naming the file and the space it needs, and the
partial temp file is removed.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline.errors import UserError

TMP_SUFFIX = ".tmp"
DISK_FULL = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded"}


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def free_bytes(path: Path) -> int:
    """Free bytes on the file system of ``path`` (or of its nearest existing parent)."""
    for p in (path, *path.parents):
        if p.exists():
            return shutil.disk_usage(p).free
    return 0


class DiskFullError(UserError):
    """A write failed for lack of space (ENOSPC) or quota (EDQUOT). ``needed``: bytes of the write."""

    def __init__(self, path: Path, needed: int, reason: str, free: int | None = None, what: str = "writing it needs"):
        self.path, self.needed, self.reason = path, needed, reason
        self.free = free_bytes(path) if free is None else free
        super().__init__(f"{path}: {reason}: {what} {human_bytes(needed)}, {human_bytes(self.free)} free; "
                         f"free up space and rerun (completed files are kept)")


@contextmanager
def disk_full_as_user_error(path: Path, needed: int) -> Iterator[None]:
    """Around a write of ``path`` (via ``path.tmp``, ~``needed`` bytes): ENOSPC/EDQUOT -> :class:`DiskFullError`."""
    try:
        yield
    except OSError as e:
        if e.errno not in DISK_FULL:
            raise
        path.with_name(path.name + TMP_SUFFIX).unlink(missing_ok=True)  # the partial file; frees its space too
        raise DiskFullError(path, needed, DISK_FULL[e.errno]) from None


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


def sha256_file(path: Path) -> str:
    """Hex sha256 of the file's bytes, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def json_digest(obj: Any) -> str:
    """16 hex digits of the sha256 of ``obj`` as canonical JSON (sorted keys; non-JSON values by ``str``): a short
    identity for a job's or a checkpoint's inputs."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def json_number(x: float | None, digits: int | None = None) -> float | None:
    """``x`` for a JSON file: NaN/inf (and None) -> None, since JSON has no NaN (DVC and strict readers
    reject the literal); else ``x``, rounded to ``digits`` when given."""
    if x is None or not math.isfinite(x):
        return None
    return x if digits is None else round(float(x), digits)


def nan_to_null(obj: Any) -> Any:
    """:func:`json_number` on every float inside dicts, lists and tuples; everything else unchanged."""
    if isinstance(obj, float):
        return json_number(obj)
    if isinstance(obj, dict):
        return {k: nan_to_null(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [nan_to_null(v) for v in obj]
    return obj


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + TMP_SUFFIX)
    with disk_full_as_user_error(path, len(data)):
        path.parent.mkdir(parents=True, exist_ok=True)
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
    with disk_full_as_user_error(path, table.nbytes):
        pq.write_table(table, tmp, **kwargs)
        fsync_replace(tmp, path)
