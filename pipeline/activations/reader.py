"""Reading activation datasets: verify, and stream as torch batches (sequential or seeded shuffle)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipeline.activations.format import (
    FORMAT_VERSION,
    MANIFEST,
    NP_DTYPES,
    Manifest,
    _decode_acts,
    sha256_file,
)
from pipeline.errors import UserError


@dataclass
class ActivationBatch:
    acts: torch.Tensor  # [B, d_model], requested dtype/device
    context_id: torch.Tensor  # [B] int64
    position: torch.Tensor  # [B] int64
    token_id: torch.Tensor  # [B] int64


class ActivationDataset:
    """A verified-on-demand view of one dataset directory. Never loads everything into memory."""

    def __init__(self, root: Path, manifest: Manifest):
        self.root = root
        self.manifest = manifest

    @property
    def d_model(self) -> int:
        return self.manifest.d_model

    @property
    def n_tokens(self) -> int:
        return self.manifest.n_tokens

    @property
    def hook(self) -> str:
        return self.manifest.hook

    def shard_paths(self) -> list[Path]:
        return [self.root / s.file for s in self.manifest.shards]

    def verify(self, checksums: bool = True) -> None:
        """Check every shard exists, has its row count, schema width, and (optionally) its sha256."""
        width = self.d_model * np.dtype(NP_DTYPES[self.manifest.dtype]).itemsize
        for s in self.manifest.shards:
            path = self.root / s.file
            if not path.is_file():
                raise UserError(f"{path}: shard listed in the manifest is missing")
            try:
                meta = pq.ParquetFile(path).metadata
                act_type = pq.read_schema(path).field("act").type
            except Exception as e:
                raise UserError(f"{path}: not a readable Parquet shard ({type(e).__name__}); delete it and rerun") from None
            if meta.num_rows != s.rows:
                raise UserError(f"{path}: has {meta.num_rows} rows, manifest says {s.rows}")
            if getattr(act_type, "byte_width", None) != width:
                raise UserError(f"{path}: activation width {act_type} does not match d_model {self.d_model}")
            if checksums and sha256_file(path) != s.sha256:
                raise UserError(f"{path}: sha256 mismatch (corrupted or modified shard); delete it and rerun")

    def _open(self, path: Path) -> pq.ParquetFile:
        try:
            return pq.ParquetFile(path)
        except Exception as e:
            raise UserError(f"{path}: not a readable Parquet shard ({type(e).__name__}); delete it and rerun") from None

    def row_groups(self) -> list[tuple[int, int, int]]:
        """(shard index, row group index, rows) units: the unit of shuffling, sharding across ranks and resume."""
        units = []
        for i, p in enumerate(self.shard_paths()):
            f = self._open(p)
            meta = f.metadata
            f.close()
            units.extend((i, g, meta.row_group(g).num_rows) for g in range(meta.num_row_groups))
        return units

    def iter_arrays(self, shuffle: bool = False, seed: int = 0, buffer_groups: int = 8
                    ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
        """Yield (acts[N, d] storage dtype, context_id[N], position[N], token_id[N]) chunks.

        Shuffled mode: row groups in a seeded random order, then rows shuffled within a buffer of
        ``buffer_groups`` row groups (a seeded shuffle buffer across shards, bounded memory).
        """
        for _, arrays in self._chunks(shuffle, seed, buffer_groups):
            yield arrays

    def _chunks(self, shuffle: bool, seed: int, buffer_groups: int = 8, skip_rows: int = 0
                ) -> Iterator[tuple[int, tuple[np.ndarray, ...]]]:
        """(first row's index in the stream, arrays) per chunk. Chunks that end at or before
        ``skip_rows`` are not read or decoded (the RNG still advances, so the stream is unchanged):
        resuming deep into a large dataset costs no I/O."""
        rng = np.random.default_rng(seed)
        units = self.row_groups()
        if shuffle:
            units = [units[i] for i in rng.permutation(len(units))]
        step = buffer_groups if shuffle else 1
        # A shard stays open only while this chunk or the next reads it: a ParquetFile kept open holds several
        # MB of buffers, and keeping every shard of a 20 GB dataset open grew host memory by ~55 MB per chunk.
        files: dict[int, pq.ParquetFile] = {}
        try:
            yield from self._read_units(units, step, shuffle, rng, skip_rows, files)
        finally:  # also when the consumer stops early
            for f in files.values():
                f.close()

    def _read_units(self, units: list[tuple[int, int, int]], step: int, shuffle: bool, rng: np.random.Generator,
                    skip_rows: int, files: dict[int, pq.ParquetFile]) -> Iterator[tuple[int, tuple[np.ndarray, ...]]]:
        paths = self.shard_paths()
        row = 0
        for start in range(0, len(units), step):
            chunk = units[start: start + step]
            n = sum(rows for _, _, rows in chunk)
            perm = rng.permutation(n) if shuffle else None
            if row + n <= skip_rows:
                row += n
                continue
            tables = []
            for fi, gi, _ in chunk:
                if fi not in files:
                    files[fi] = self._open(paths[fi])
                f = files[fi]
                try:
                    tables.append(f.read_row_group(gi))
                except Exception as e:
                    raise UserError(f"{paths[fi]}: cannot read row group {gi} ({type(e).__name__}); the shard is corrupted") from None
            upcoming = {fi for fi, _, _ in units[start + step: start + 2 * step]}
            for fi in [fi for fi in files if fi not in upcoming]:
                files.pop(fi).close()
            t = pa.concat_tables(tables)
            arrays = (_decode_acts(t.column("act"), self.d_model, self.manifest.dtype),
                      t.column("context_id").to_numpy(), t.column("position").to_numpy(), t.column("token_id").to_numpy())
            if perm is not None:
                arrays = tuple(a[perm] for a in arrays)  # type: ignore[assignment]
            yield row, arrays
            row += n

    def iter_batches(self, batch_size: int, shuffle: bool = False, seed: int = 0, start_batch: int = 0,
                     device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                     drop_last: bool = False) -> Iterator[ActivationBatch]:
        """Stream fixed-size batches. The stream is a pure function of (dataset, batch_size, shuffle, seed),
        so ``start_batch`` resumes exactly where a checkpoint left off, without reading what came before."""
        device = torch.device(device)
        pin = device.type == "cuda"
        skip = start_batch * batch_size
        rest: tuple[np.ndarray, ...] | None = None
        for row, arrays in self._chunks(shuffle, seed, skip_rows=skip):
            if rest is None and row < skip:  # first chunk read straddles the cursor
                arrays = tuple(a[skip - row:] for a in arrays)
            # Concatenate the leftover once per incoming chunk, then slice batches by offset.
            cur = arrays if rest is None else tuple(np.concatenate([r, a]) for r, a in zip(rest, arrays, strict=False))
            n_full = len(cur[0]) // batch_size
            for b in range(n_full):
                sl = slice(b * batch_size, (b + 1) * batch_size)
                yield _to_batch([a[sl] for a in cur], device, dtype, pin)
            rest = tuple(a[n_full * batch_size:] for a in cur)
        if rest is not None and len(rest[0]) and not drop_last:
            yield _to_batch(list(rest), device, dtype, pin)

    def read_index(self):  # -> polars.DataFrame
        """(context_id, position, token_id) of every row, in storage order, without activations."""
        import polars as pl

        tables = [pq.read_table(p, columns=["context_id", "position", "token_id"]) for p in self.shard_paths()]
        return pl.from_arrow(pa.concat_tables(tables)) if tables else pl.DataFrame()


def _to_batch(arrays: list[np.ndarray], device: torch.device, dtype: torch.dtype, pin: bool) -> ActivationBatch:
    acts = torch.from_numpy(np.ascontiguousarray(arrays[0]))
    ids = [torch.from_numpy(a.astype(np.int64)) for a in arrays[1:]]
    if pin:
        acts = acts.pin_memory()
    acts = acts.to(device, non_blocking=pin).to(dtype)
    return ActivationBatch(acts, *(t.to(device, non_blocking=pin) for t in ids))


def open_activations(root: str | Path, verify: bool = False) -> ActivationDataset:
    """Open a dataset directory; ``verify=True`` also checks row counts and checksums of every shard."""
    root = Path(root)
    mpath = root / MANIFEST
    if not mpath.is_file():
        raise UserError(f"{root}: not an activation dataset (no {MANIFEST}; was extraction finished?)")
    try:
        manifest = Manifest.from_json(json.loads(mpath.read_text()))
    except (json.JSONDecodeError, TypeError) as e:
        raise UserError(f"{mpath}: unreadable manifest ({e})") from None
    if manifest.format_version > FORMAT_VERSION:
        raise UserError(f"{mpath}: format version {manifest.format_version} is newer than this sae-pipeline supports")
    ds = ActivationDataset(root, manifest)
    if verify:
        ds.verify()
    return ds
