"""The training stream in lanes: each data-parallel process reads, hashes and decodes only its share.

One epoch of the stream, a pure function of (dataset, batch_size, seed, epoch), whatever the number of processes:

1. The shards, in a seeded order, are laid end to end: one row sequence of ``n_tokens`` rows.
2. That sequence is cut into :data:`LANES` contiguous ranges, lane ``l`` getting ``per_epoch * s_l`` rows, where
   ``s_l = (l+1)·B // LANES - l·B // LANES`` are the lanes' rows per batch (``B`` = batch size, ``per_epoch =
   n_tokens // B``; the remainder is dropped, as before).
3. Each lane reads its range as *pieces* (a row group, or the part of one inside the range) in a seeded order of
   its own, shuffling the rows of each piece, and hands ``s_l`` rows per batch.
4. Batch ``b`` is lane 0's rows, then lane 1's, ... (``B`` rows).

Process ``rank`` of ``world`` takes rows ``[rank·B/world, (rank+1)·B/world)`` of each batch, so it reads only the
lanes that hold them: with ``world`` dividing :data:`LANES`, ``LANES / world`` lanes, i.e. ``1/world`` of the shards
(hashed on first read) and row groups (decoded). The batches, hence the optimizer steps, are those of one process.
Beyond :data:`LANES` processes two or more share a lane and the share stops falling.

Mixing: a batch holds rows of :data:`LANES` row groups from all over the dataset, each a uniform sample of its
row group (with 8 lanes and ``B = 4096``, 512 rows from each of 8 row groups: the same spread as the 8-row-group
shuffle buffer of :meth:`ActivationDataset.iter_batches`). Memory: one row group per lane read.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.activations.format import REGENERATE, _decode_acts
from pipeline.activations.reader import ActivationBatch, ActivationDataset, _to_batch
from pipeline.errors import UserError

LANES = 8  # part of the stream's definition: changing it changes every batch (see STREAM_VERSION)
STREAM_VERSION = "lanes8@1"  # in the training fingerprint: a checkpoint resumes only the stream it was cut from


@dataclass(frozen=True)
class Piece:
    """Rows ``[lo, hi)`` of row group ``group`` of shard ``shard``."""

    shard: int
    group: int
    lo: int
    hi: int


@dataclass
class LoaderWork:
    """What one process's stream read (a benchmark's and a test's measure of the share): rows of the row groups it
    decoded, and the shards it hashed (each read whole once)."""

    rows_decoded: int = 0
    shards_hashed: int = 0


def lane_sizes(batch_size: int) -> list[int]:
    """Each lane's rows per batch ``[LANES]``, summing to ``batch_size``."""
    return [(i + 1) * batch_size // LANES - i * batch_size // LANES for i in range(LANES)]


def lane_pieces(dataset: ActivationDataset, batch_size: int, epoch_seed: int) -> list[list[Piece]]:
    """The pieces of each lane's range for one epoch (steps 1-2 of the module docstring), in storage order."""
    per_epoch = dataset.n_tokens // batch_size
    groups: dict[int, list[int]] = {}  # shard -> rows of each row group
    for shard, _group, rows in dataset.row_groups():  # footers only (row groups listed in file order)
        groups.setdefault(shard, []).append(rows)
    order = np.random.default_rng(epoch_seed).permutation(len(dataset.manifest.shards))
    spans: list[tuple[int, int, int, int]] = []  # (first row in the epoch's sequence, rows, shard, group)
    at = 0
    for shard in order:
        for g, rows in enumerate(groups.get(int(shard), [])):
            spans.append((at, rows, int(shard), g))
            at += rows
    lanes, start = [], 0
    for size in lane_sizes(batch_size):
        end = start + per_epoch * size
        lanes.append([Piece(s, g, max(start - first, 0), min(end - first, rows))
                      for first, rows, s, g in spans if first < end and first + rows > start])
        start = end
    return lanes


class _Lane:
    """One lane's rows for one epoch: pieces in a seeded order, each piece's rows shuffled, ``take(n)`` at a time."""

    def __init__(self, dataset: ActivationDataset, pieces: list[Piece], seed: np.random.SeedSequence, skip: int,
                 work: LoaderWork):
        self.dataset, self.work = dataset, work
        self.rng = np.random.default_rng(seed)
        self.pieces = [pieces[i] for i in self.rng.permutation(len(pieces))]
        self.chunks = self._chunks(skip)
        self.rest: tuple[np.ndarray, ...] | None = None

    def _chunks(self, skip: int) -> Iterator[tuple[np.ndarray, ...]]:
        row = 0
        for p in self.pieces:
            n = p.hi - p.lo
            perm = self.rng.permutation(n)  # drawn for skipped pieces too: resuming keeps the stream
            if row + n <= skip:  # before the resume point: not read
                row += n
                continue
            arrays = tuple(a[perm] for a in self._read(p))
            if row < skip:
                arrays = tuple(a[skip - row:] for a in arrays)
            row += n
            yield arrays

    def _read(self, p: Piece) -> tuple[np.ndarray, ...]:
        ds = self.dataset
        if not ds._is_verified(p.shard):
            self.work.shards_hashed += 1
        f = ds._open(p.shard)  # hashed against the manifest on its first read by this dataset object
        try:
            t = f.read_row_group(p.group)
        except Exception as e:
            path = ds.shard_paths()[p.shard]
            raise UserError(f"{path}: cannot read row group {p.group} ({type(e).__name__}); the shard is "
                            f"corrupted; {REGENERATE}") from None
        finally:
            f.close(force=True)  # one row group per lane in memory, not a shard
        self.work.rows_decoded += t.num_rows
        t = t.slice(p.lo, p.hi - p.lo)
        return (_decode_acts(t.column("act"), ds.d_model, ds.manifest.dtype), t.column("context_id").to_numpy(),
                t.column("position").to_numpy(), t.column("token_id").to_numpy())

    def take(self, n: int) -> tuple[np.ndarray, ...]:
        """The lane's next ``n`` rows (acts, context_id, position, token_id)."""
        parts, have = [], 0
        while have < n:
            if self.rest is None or not len(self.rest[0]):
                self.rest = next(self.chunks, None)
                if self.rest is None:
                    raise UserError(f"{self.dataset.root}: the shards hold fewer rows than the manifest's "
                                    f"{self.dataset.n_tokens} tokens; {REGENERATE}")
            k = min(n - have, len(self.rest[0]))
            parts.append(tuple(a[:k] for a in self.rest))
            self.rest = tuple(a[k:] for a in self.rest)
            have += k
        return parts[0] if len(parts) == 1 else tuple(np.concatenate(c) for c in zip(*parts, strict=True))


def lane_batches(dataset: ActivationDataset, batch_size: int, epoch_seed: int, start_batch: int = 0,
                 part: tuple[int, int] = (0, 1), dtype: torch.dtype = torch.float32,
                 work: LoaderWork | None = None) -> Iterator[ActivationBatch]:
    """One epoch's batches ``start_batch..per_epoch-1`` (module docstring), this process's rows of each
    (``part=(rank, world)``: ``[rank·B/world, (rank+1)·B/world)``, ``B`` divisible by ``world``), on the CPU."""
    rank, world = part
    if batch_size % world or not 0 <= rank < world:
        raise ValueError(f"part={part}: needs a batch_size ({batch_size}) divisible by {world}")
    per_epoch = dataset.n_tokens // batch_size
    work = work if work is not None else LoaderWork()
    sizes = lane_sizes(batch_size)
    offsets = np.cumsum([0, *sizes]).tolist()
    lo, hi = rank * batch_size // world, (rank + 1) * batch_size // world  # this process's rows of a batch
    pieces = lane_pieces(dataset, batch_size, epoch_seed)
    mine = [i for i in range(LANES) if sizes[i] and offsets[i] < hi and offsets[i + 1] > lo]
    lanes = {i: _Lane(dataset, pieces[i], np.random.SeedSequence([epoch_seed, i]), start_batch * sizes[i], work)
             for i in mine}
    for _ in range(start_batch, per_epoch):
        rows = [lanes[i].take(sizes[i]) for i in mine]
        cur = rows[0] if len(rows) == 1 else tuple(np.concatenate(c) for c in zip(*rows, strict=True))
        first = offsets[mine[0]]
        yield _to_batch([a[lo - first: hi - first] for a in cur], torch.device("cpu"), dtype, pin=False)


__all__ = ["LANES", "STREAM_VERSION", "Piece", "LoaderWork", "lane_sizes", "lane_pieces", "lane_batches"]
