"""`sae extract`: token contexts -> one activation dataset per (split, hook), in one forward per batch."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import polars as pl

from pipeline.activations import open_activations, sha256_file
from pipeline.errors import UserError
from pipeline.extract import (
    ExtractSpec,
    auto_batch_size,
    extract_split,
    fingerprint,
    make_progress,
    prepare_output,
)
from pipeline.hooks import validate_hooks
from pipeline.io import atomic_write_json
from pipeline.models import load_config, load_model
from stages.common import Params, log, stage_command
from stages.paths import ACTIVATIONS, CONTEXTS

OUT = ACTIVATIONS
METRICS = Path("metrics/extract.json")


def mean_norm(root: Path) -> float:
    """Mean L2 norm of the stored vectors (a sanity number: SmolLM2's mid-depth residual is ~150)."""
    ds = open_activations(root)
    total, n = 0.0, 0
    for acts, *_ in ds.iter_arrays():
        total += float(np.linalg.norm(acts.astype(np.float32), axis=1).sum())
        n += len(acts)
    return total / max(n, 1)


@stage_command(help="Token contexts -> activation datasets (Parquet shards + manifest), one per split and hook.")
def command(params: Params) -> None:
    m, x = params.model, params.extract
    if not CONTEXTS.is_file():
        raise UserError(f"{CONTEXTS}: missing input (run `sae prepare` first)")
    validate_hooks(x.hooks, load_config(m.name, m.revision), key="extract.hooks")  # before loading weights
    contexts = pl.read_parquet(CONTEXTS).sort("context_id")
    lm = load_model(m.name, m.revision, m.dtype, m.device)
    fp = fingerprint({"model": [lm.model_id, lm.revision, lm.weights_hash, m.dtype],
                      "extract": [sorted(x.hooks), x.batch_size, x.contexts_per_shard, x.dtype],
                      "contexts": sha256_file(CONTEXTS), "device": str(next(lm.model.parameters()).device)})
    prepare_output(OUT, fp)
    hooks = list(dict.fromkeys(x.hooks))
    batch_size = (auto_batch_size(lm.model, params.corpus.context_length, hooks, x.contexts_per_shard)
                  if x.batch_size == "auto" else x.batch_size)
    spec = ExtractSpec(hooks=hooks, batch_size=batch_size, contexts_per_shard=x.contexts_per_shard, dtype=x.dtype)
    meta = {"model_id": lm.model_id, "revision": lm.revision, "weights_hash": lm.weights_hash,
            "tokenizer": lm.model_id, "corpus": params.corpus.source, "bos": params.corpus.bos,
            "extra": {"model_dtype": m.dtype}}
    total = contexts.height * params.corpus.context_length
    t0 = time.perf_counter()
    progress = make_progress(total, "extract")
    metrics: dict = {"tokens": {}, "hooks": {}}
    for split in ("train", "validation"):
        part = contexts.filter(pl.col("split") == split)
        if part.height == 0:
            continue
        tok = np.stack(part["token_ids"].to_numpy())  # [N, L]
        manifests = extract_split(lm.model, tok, part["context_id"].to_numpy(), OUT, split, spec, meta, progress)
        metrics["tokens"][split] = next(iter(manifests.values())).n_tokens
    progress.close()
    seconds = time.perf_counter() - t0
    for h in spec.hooks:
        metrics["hooks"][h] = {"mean_norm": round(mean_norm(OUT / "train" / h), 4)}
    atomic_write_json(METRICS, metrics)
    log.info("extract: %d tokens x %d hooks in %.1fs (%.0f tok/s)", total, len(spec.hooks), seconds, total / seconds)
