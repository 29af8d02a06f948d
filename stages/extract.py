"""`sae extract`: token contexts -> one activation dataset per (split, hook), in one forward per batch.

Under torchrun, or with ``extract.processes`` > 1, each process computes every world-th shard and rank 0 writes
the manifests and metrics: the same bytes as one process (``pipeline.extract``).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import polars as pl

from pipeline import distributed
from pipeline.activations import open_activations, sha256_file
from pipeline.environment import environment
from pipeline.errors import UserError
from pipeline.extract import (
    ExtractSpec,
    auto_batch_size,
    extract_split,
    job_digest,
    make_progress,
    prepare_output,
)
from pipeline.headline import write_stage_results
from pipeline.hooks import validate_hooks
from pipeline.models import load_config, load_model
from pipeline.numerics import apply_numerics, numerics_fingerprint
from pipeline.paths import ACTIVATIONS, CONTEXTS
from stages.common import Params, log, stage_command
from stages.launch import relaunched

OUT = ACTIVATIONS


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
    apply_numerics(params.numerics.portable, params.numerics.threads)
    if not CONTEXTS.is_file():
        raise UserError(f"{CONTEXTS}: missing input (run `sae prepare` first)")
    validate_hooks(x.hooks, load_config(m.name, m.revision), key="extract.hooks")  # before loading weights
    if relaunched("extract", x.processes, m.device):  # extract.processes > 1: ran as N processes
        return
    ranks, device = distributed.start(m.device, "model.device")  # under torchrun: the GPU of this process
    contexts = pl.read_parquet(CONTEXTS).sort("context_id")
    lm = load_model(m.name, m.revision, m.dtype, str(device) if ranks.parallel else m.device)
    on = next(lm.model.parameters()).device
    # The numerics in force (numerics.portable, threads, ...) change the shards' bits: shards written under
    # other numerics are not kept.
    fp = job_digest({"model": [lm.model_id, lm.revision, lm.weights_hash, m.dtype],
                      "extract": [sorted(x.hooks), x.batch_size, x.contexts_per_shard, x.dtype],
                      "contexts": sha256_file(CONTEXTS), "device": str(on), "numerics": numerics_fingerprint(on)})
    if ranks.is_main:
        prepare_output(OUT, fp)
    distributed.barrier()  # the others write into the directory rank 0 kept or cleared
    hooks = list(dict.fromkeys(x.hooks))
    batch_size = (auto_batch_size(lm.model, params.corpus.context_length, hooks, x.contexts_per_shard)
                  if x.batch_size == "auto" else x.batch_size)
    if ranks.parallel:  # one batch size (shards' bytes depend on it): rank 0's
        batch_size = distributed.broadcast_object(batch_size)
    spec = ExtractSpec(hooks=hooks, batch_size=batch_size, contexts_per_shard=x.contexts_per_shard, dtype=x.dtype)
    meta = {"model_id": lm.model_id, "revision": lm.revision, "weights_hash": lm.weights_hash,
            "tokenizer": lm.model_id, "corpus": params.corpus.source, "bos": params.corpus.bos,
            "extra": {"model_dtype": m.dtype}}
    total = contexts.height * params.corpus.context_length
    t0 = time.perf_counter()
    # Rank 0's bar counts its own shards, about 1/world of the tokens.
    progress = make_progress(total // ranks.world, "extract") if ranks.is_main else None
    metrics: dict = {"tokens": {}, "hooks": {}}
    for split in ("train", "validation"):
        part = contexts.filter(pl.col("split") == split)
        if part.height == 0:
            continue
        tok = np.stack(part["token_ids"].to_numpy())  # [N, L]
        manifests = extract_split(lm.model, tok, part["context_id"].to_numpy(), OUT, split, spec, meta, progress,
                                  part=(ranks.rank, ranks.world))
        if manifests:  # rank 0 (or the only process)
            metrics["tokens"][split] = next(iter(manifests.values())).n_tokens
    if progress is None:
        return
    progress.close()
    seconds = time.perf_counter() - t0
    for h in spec.hooks:
        metrics["hooks"][h] = {"mean_norm": round(mean_norm(OUT / "train" / h), 4)}
    metrics["environment"] = environment({"model.device": next(lm.model.parameters()).device, "model.dtype": m.dtype,
                                          "extract.batch_size": batch_size, "numerics.portable": params.numerics.portable})
    write_stage_results("extract", metrics, spec.hooks)
    log.info("extract: %d tokens x %d hooks in %.1fs (%.0f tok/s)", total, len(spec.hooks), seconds, total / seconds)
