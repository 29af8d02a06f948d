"""Token contexts -> activation datasets: one forward pass per batch records every hook.

Work is cut into shards of whole batches (``contexts_per_shard``). A shard is the unit of
resume: a rerun after a kill skips shards already on disk whose bytes still match the sha256
recorded when they were written (their sidecar) and, because batches are aligned to shards and
the forward is deterministic, rewrites the rest (missing, damaged) with the same bytes. Writing (Parquet encoding, fsync, sha256) runs on background threads so the
forward pass never waits for the disk unless more than ``max_pending`` shards are queued.

Under torchrun (``part=(rank, world)``) process ``rank`` computes shards ``rank, rank + world, ...``; after all
have finished, rank 0 writes the manifest. Shards do not depend on who computes them, so the dataset is the
one-process dataset, byte for byte.
"""

from __future__ import annotations

import json
import logging
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline import distributed
from pipeline.activations import ActivationWriter, Manifest
from pipeline.hooks import run_to_hooks
from pipeline.io import DiskFullError, atomic_write_json, json_digest
from pipeline.progress import Progress

log = logging.getLogger(__name__)
STATE = "_extract_state.json"


@dataclass
class ExtractSpec:
    hooks: list[str]
    batch_size: int
    contexts_per_shard: int
    dtype: str  # storage dtype: float16 | float32
    writer_threads: int = 2
    max_pending: int = 2


def job_digest(obj: Any) -> str:
    """16 hex digits identifying an extraction job (model, data, params): a killed run's shards are kept
    only for the same job (:func:`prepare_output`). Not the training checkpoint's ``pipeline.checkpoint.fingerprint``."""
    return json_digest(obj)


def prepare_output(root: Path, fp: str) -> None:
    """Keep a previous (killed) run's shards only if it was the same job; otherwise start clean."""
    state = root / STATE
    if root.exists():
        try:
            same = json.loads(state.read_text()).get("fingerprint") == fp
        except (OSError, json.JSONDecodeError):
            same = False
        if not same:
            log.info("extract: inputs or params changed, clearing %s", root)
            shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_json(state, {"fingerprint": fp})


def dataset_dir(root: Path, split: str, hook: str) -> Path:
    return root / split / hook


def extract_split(model: torch.nn.Module, token_ids: np.ndarray, context_ids: np.ndarray, root: Path, split: str,
                  spec: ExtractSpec, meta: dict[str, Any], progress: Progress | None = None,
                  part: tuple[int, int] = (0, 1)) -> dict[str, Manifest]:
    """Record ``spec.hooks`` for contexts ``token_ids`` [N, L] into ``root/split/<hook>/``. Returns manifests.

    ``part=(rank, world)``: this process's share of a data-parallel run (every process calls this); only rank 0
    returns the manifests, written once every process has finished its shards (the others return ``{}``).
    """
    n, L = token_ids.shape
    rank, world = part
    n_shards = -(-n // spec.contexts_per_shard)
    device = next(model.parameters()).device
    cuda = device.type == "cuda"
    storage = torch.float16 if spec.dtype == "float16" else torch.float32
    writers = {h: ActivationWriter(dataset_dir(root, split, h), hook=h, d_model=0, dtype=spec.dtype,
                                   split=split, context_length=L, **meta) for h in spec.hooks}
    pending: list[Future] = []
    pool = ThreadPoolExecutor(max_workers=spec.writer_threads, thread_name_prefix="shard-writer")
    try:
        for shard, start in enumerate(range(0, n, spec.contexts_per_shard)):
            if shard % world != rank:  # another process's shard
                continue
            stop = min(start + spec.contexts_per_shard, n)
            if all(w.existing_shard(shard) for w in writers.values()):
                if progress is not None:
                    progress.update((stop - start) * L)
                continue
            # Host buffers per hook for this shard: pinned on CUDA so device->host copies are
            # asynchronous and overlap the next batch's forward; the writer thread waits on `done`.
            bufs: dict[str, torch.Tensor] = {}
            for b in range(start, stop, spec.batch_size):
                ids = torch.from_numpy(token_ids[b: min(b + spec.batch_size, stop)].astype(np.int64)).to(device)
                with torch.inference_mode():
                    acts = run_to_hooks(model, ids, spec.hooks)  # {hook: [B, L, d_model]}
                    for h, a in acts.items():
                        flat = a.reshape(-1, a.shape[-1])  # [B*L, d_model]
                        if h not in bufs:
                            bufs[h] = torch.empty(((stop - start) * L, flat.shape[-1]), dtype=storage, pin_memory=cuda)
                        lo = (b - start) * L
                        # CPU: via fp32 so the rounding to fp16 is exactly numpy's (round-to-nearest-even).
                        bufs[h][lo: lo + flat.shape[0]].copy_(flat.to(storage) if cuda else flat.float(), non_blocking=cuda)
                if progress is not None:
                    progress.update(ids.numel())
            done = torch.cuda.Event() if cuda else None
            if done is not None:
                done.record()
            rows_ctx = np.repeat(context_ids[start:stop], L).astype(np.int32)
            rows_pos = np.tile(np.arange(L, dtype=np.int32), stop - start)
            rows_tok = token_ids[start:stop].reshape(-1).astype(np.int32)
            for h, w in writers.items():
                w.manifest.d_model = bufs[h].shape[1]
                pending.append(pool.submit(_write, w, shard, rows_ctx, rows_pos, rows_tok, bufs[h], done))
            # Back-pressure: never hold more than a few shards of activations in memory.
            # Finished futures are collected with result() so a writer's exception (or a kill) is raised
            # here, never dropped along with the future.
            pending = _collect_done(pending)
            while len(pending) > spec.max_pending * len(writers):
                pending[0].result()
                pending = _collect_done(pending)
        for f in pending:
            f.result()
    except DiskFullError as e:
        # Shards are all about the same size: say what the rest of this split needs, not just this file.
        left = len(range(rank, n_shards, world)) * len(writers) - sum(w.n_shards for w in writers.values())
        raise DiskFullError(e.path, e.needed * max(left, 1), e.reason, e.free,
                            what=f"the {max(left, 1)} shard files of {split!r} still to write need about") from None
    finally:
        pool.shutdown(wait=True)
    if world > 1:
        distributed.barrier()  # every process's shards and sidecars are on disk
        if rank != 0:
            return {}
        for w in writers.values():
            for shard in range(n_shards):
                if shard % world != 0:
                    w.adopt_shard(shard)
    out = {}
    for h, w in writers.items():
        if not w.manifest.d_model:  # every shard was already on disk: read the width back from one
            w.manifest.d_model = _width_from_disk(w)
        out[h] = w.finalize()
    return out


def _collect_done(pending: list[Future]) -> list[Future]:
    """Re-raise the first failure among finished writes; return the writes still running."""
    for f in pending:
        if f.done():
            f.result()
    return [f for f in pending if not f.done()]


def _write(w: ActivationWriter, shard: int, rows_ctx: np.ndarray, rows_pos: np.ndarray, rows_tok: np.ndarray,
           buf: torch.Tensor, done: Any) -> Any:
    if done is not None:
        done.synchronize()  # the async device->host copies of this shard have landed
    return w.write_shard(shard, rows_ctx, rows_pos, rows_tok, buf.numpy())


def _width_from_disk(w: ActivationWriter) -> int:
    import pyarrow.parquet as pq

    first = sorted(w.root.glob("shard-*.parquet"))[0]
    width = pq.read_schema(first).field("act").type.byte_width
    return width // np.dtype(w.manifest.dtype).itemsize


def make_progress(total: int, desc: str) -> Progress:
    """Tokens/s progress: a bar on a terminal, else a log line every few seconds (``dvc repro``)."""
    return Progress(desc, total, unit="tok")


def auto_batch_size(model: torch.nn.Module, context_length: int, hooks: list[str], contexts_per_shard: int,
                    cpu_default: int = 16, memory_fraction: float = 0.5) -> int:
    """Contexts per forward from free GPU memory: probe one context's peak memory, use ``memory_fraction``
    of what is free, round down to a divisor of ``contexts_per_shard`` (shards hold whole batches)."""
    device = next(model.parameters()).device
    if device.type != "cuda":
        best = cpu_default
    else:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        ids = torch.zeros((1, context_length), dtype=torch.long, device=device)
        with torch.inference_mode():
            run_to_hooks(model, ids, hooks)
        per_context = max(torch.cuda.max_memory_allocated(device) - base, 1)
        free, _ = torch.cuda.mem_get_info(device)
        best = max(1, int(free * memory_fraction // per_context))
    best = min(best, contexts_per_shard)
    while contexts_per_shard % best:
        best -= 1
    log.info("extract: batch size %d (auto)", best)
    return best
