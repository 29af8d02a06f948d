"""One streaming pass over an activation dataset: chunks of whole contexts, encoded and folded.

Rows of a context that straddle a batch boundary are held back and joined to the next batch, so each
chunk holds whole contexts; a worker thread encodes chunk i+1 while chunk i is folded into a
:class:`~pipeline.interpret.aggregates.FeatureStream` (the per-feature aggregates).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch import Tensor

from pipeline.interpret.aggregates import FeatureStats, FeatureStream, SparseCodes, hash_keys
from pipeline.interpret.contexts import ContextTable

__all__ = ["Batch", "FeatureStats", "FeatureStream", "SparseCodes", "hash_keys", "stream_stats"]

log = logging.getLogger(__name__)

Batch = tuple[Tensor, Tensor, Tensor]  # acts[B, d_in], context_id[B], position[B]


def _chunks(batches: Iterable[Batch]) -> Iterator[Batch]:
    """Re-cut batches into chunks of whole contexts: the trailing context's rows are held back and
    joined to the next batch (requires each context's rows to be contiguous, as stored)."""
    held: list[Tensor] | None = None
    for acts, cid, pos in batches:
        if held is not None:
            acts, cid, pos = (torch.cat([h, x]) for h, x in zip(held, (acts, cid, pos), strict=True))
        tail = int((cid == cid[-1]).sum()) if len(cid) else 0
        if tail == len(cid):  # one context longer than a batch: keep collecting
            held = [acts, cid, pos]
            continue
        cut = len(cid) - tail
        held = [acts[cut:], cid[cut:], pos[cut:]]
        yield acts[:cut], cid[:cut], pos[:cut]
    if held is not None and len(held[1]):
        yield held[0], held[1], held[2]


def _prepare(chunk: Batch, encode: Callable[[Tensor], Tensor], table: ContextTable) -> tuple[Tensor, ...]:
    acts, cid, pos = chunk
    rows = table.rows(cid.numpy())  # [N] ContextTable rows
    p = pos.clamp(0, table.context_length - 1).numpy()
    with torch.no_grad():
        f = encode(acts).float().cpu()  # [N, d_sae]
    return (f, torch.from_numpy(rows), pos.cpu(), torch.from_numpy(table.labels[rows, p]),
            torch.from_numpy(table.documents[rows, p]))


def stream_stats(batches: Iterable[Batch], encode: Callable[[Tensor], Tensor], table: ContextTable,
                 stream: FeatureStream) -> FeatureStats:
    """Encode each chunk of whole contexts and fold it into ``stream``.

    The encode of chunk i+1 runs in a worker thread while chunk i is folded (torch releases the GIL),
    each on one intra-op thread: the fold is many small memory-bound ops whose OpenMP fork/join
    overhead dominates them (~100x on a loaded 2-core CPU), and two single-threaded streams keep two
    cores busy without oversubscription.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    n = 0
    try:
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending: Future | None = None
            for chunk in _chunks(batches):
                nxt = pool.submit(_prepare, chunk, encode, table)
                if pending is not None:
                    stream.add(*pending.result())
                pending = nxt
                n += 1
                if n % 20 == 0:
                    log.info("interpret: %d tokens encoded", stream.n_tokens)
            if pending is not None:
                stream.add(*pending.result())
    finally:
        torch.set_num_threads(threads)
    return stream.finish()
