"""Token contexts -> activation datasets: one forward pass per batch records every hook.

Work is cut into shards of whole batches (``contexts_per_shard``). A shard is the unit of
resume: a rerun after a kill skips shards already on disk (they only ever appear complete) and,
because batches are aligned to shards and the forward is deterministic, rewrites the rest with
the same bytes. Writing (Parquet encoding, fsync, sha256) runs on background threads so the
forward pass never waits for the disk unless more than ``max_pending`` shards are queued.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from pipeline.activations import ActivationWriter, Manifest
from pipeline.hooks import run_to_hooks
from pipeline.io import atomic_write_json

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


def fingerprint(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


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
                  spec: ExtractSpec, meta: dict[str, Any], progress: tqdm | None = None) -> dict[str, Manifest]:
    """Record ``spec.hooks`` for contexts ``token_ids`` [N, L] into ``root/split/<hook>/``. Returns manifests."""
    n, L = token_ids.shape
    device = next(model.parameters()).device
    writers = {h: ActivationWriter(dataset_dir(root, split, h), hook=h, d_model=0, dtype=spec.dtype,
                                   split=split, context_length=L, **meta) for h in spec.hooks}
    pending: list[Future] = []
    pool = ThreadPoolExecutor(max_workers=spec.writer_threads, thread_name_prefix="shard-writer")
    try:
        for shard, start in enumerate(range(0, n, spec.contexts_per_shard)):
            stop = min(start + spec.contexts_per_shard, n)
            if all(w.existing_shard(shard) for w in writers.values()):
                if progress is not None:
                    progress.update((stop - start) * L)
                continue
            bufs: dict[str, np.ndarray] = {}
            for b in range(start, stop, spec.batch_size):
                ids = torch.from_numpy(token_ids[b: min(b + spec.batch_size, stop)].astype(np.int64)).to(device)
                with torch.inference_mode():
                    acts = run_to_hooks(model, ids, spec.hooks)  # {hook: [B, L, d_model]}
                for h, a in acts.items():
                    flat = a.reshape(-1, a.shape[-1])
                    if h not in bufs:
                        bufs[h] = np.empty(((stop - start) * L, flat.shape[-1]), dtype=spec.dtype)
                    lo = (b - start) * L
                    bufs[h][lo: lo + flat.shape[0]] = flat.to("cpu", torch.float32).numpy()
                if progress is not None:
                    progress.update(ids.numel())
            rows_ctx = np.repeat(context_ids[start:stop], L).astype(np.int32)
            rows_pos = np.tile(np.arange(L, dtype=np.int32), stop - start)
            rows_tok = token_ids[start:stop].reshape(-1).astype(np.int32)
            for h, w in writers.items():
                w.manifest.d_model = bufs[h].shape[1]
                pending.append(pool.submit(w.write_shard, shard, rows_ctx, rows_pos, rows_tok, bufs[h]))
            # Back-pressure: never hold more than a few shards of activations in memory.
            while len([f for f in pending if not f.done()]) > spec.max_pending * len(writers):
                pending[0].result()
                pending = [f for f in pending if not f.done()]
        for f in pending:
            f.result()
    finally:
        pool.shutdown(wait=True)
    out = {}
    for h, w in writers.items():
        if not w.manifest.d_model:  # every shard was already on disk: read the width back from one
            w.manifest.d_model = _width_from_disk(w)
        out[h] = w.finalize()
    return out


def _width_from_disk(w: ActivationWriter) -> int:
    import pyarrow.parquet as pq

    first = sorted(w.root.glob("shard-*.parquet"))[0]
    width = pq.read_schema(first).field("act").type.byte_width
    return width // np.dtype(w.manifest.dtype).itemsize


def make_progress(total: int, desc: str) -> tqdm:
    """A tokens/s progress bar; silent when stderr is not a terminal (CI, dvc logs)."""
    return tqdm(total=total, desc=desc, unit="tok", unit_scale=True, disable=not sys.stderr.isatty(), smoothing=0.1)
