"""`sae prepare`: corpus -> fixed-length token contexts (Parquet), split by document."""

from __future__ import annotations

import time

import polars as pl

from pipeline.corpus import describe_source, iter_documents
from pipeline.environment import environment
from pipeline.headline import write_stage_results
from pipeline.io import atomic_write_parquet
from pipeline.models import load_tokenizer
from pipeline.paths import TOKENS
from pipeline.tokens import ContextSpec, build_contexts
from stages.common import Params, log, stage_command

OUT = TOKENS


@stage_command(help="Corpus -> fixed-length token contexts (Parquet). Splits train/validation by document.")
def command(params: Params) -> None:
    t0 = time.perf_counter()
    c = params.corpus
    tokenizer = load_tokenizer(params.model.name, params.model.revision)
    docs = iter_documents(c.source, c.text_column, c.title_column, c.label_column, seed=params.seed)
    spec = ContextSpec(c.context_length, c.n_tokens, c.validation_fraction, c.bos, params.seed)
    contexts, documents = build_contexts(docs, tokenizer, spec, max_documents=c.max_documents)
    atomic_write_parquet(OUT / "contexts.parquet", contexts)
    atomic_write_parquet(OUT / "documents.parquet", documents)
    ctx = pl.from_arrow(contexts)
    counts = {s: int((ctx["split"] == s).sum()) for s in ("train", "validation")}
    labels = documents.column("label").drop_null().unique().to_pylist()
    metrics = {
        "contexts": {k: v for k, v in counts.items()},
        "tokens": {k: v * c.context_length for k, v in counts.items()},
        "documents": documents.num_rows,
        "labels": len(labels),
        "corpus": describe_source(c.source),
        "environment": environment(compute=False),  # tokenisation: integer work, only library versions matter
    }
    write_stage_results("prepare", metrics)
    log.info("prepare: %d contexts (%s) from %d documents in %.1fs", ctx.height, counts, documents.num_rows,
             time.perf_counter() - t0)
