"""Documents -> fixed-length token contexts with an explicit BOS policy and a split by document.

Each split's documents are concatenated into one token stream (documents separated by EOS) and
cut into contexts of ``context_length`` tokens; a per-position ``document_ids`` column keeps the
link back to each token's document, so titles and topic labels travel downstream.

BOS policies:
- ``context``: every context is ``[BOS] + (context_length - 1)`` stream tokens (what SAE training
  on a model that always sees BOS first expects; the BOS position is kept and marked).
- ``document``: BOS starts every document in the stream; contexts are plain chunks.
- ``none``: no BOS anywhere.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from pipeline.corpus import Document
from pipeline.errors import UserError

log = logging.getLogger(__name__)

SPLITS = ("train", "validation")


@dataclass
class ContextSpec:
    context_length: int
    n_tokens: int
    validation_fraction: float
    bos: str  # context | document | none
    seed: int


def _special_id(tokenizer, which: str) -> int | None:
    tid = getattr(tokenizer, f"{which}_token_id", None)
    return int(tid) if tid is not None else None


def special_token_ids(tokenizer) -> frozenset[int]:
    """The ids evaluation leaves out (``evaluate.exclude_special_tokens``): BOS, EOS and PAD, the set
    SAEBench's core evaluation ignores. These are the only special tokens this module inserts (BOS by
    ``corpus.bos``, EOS between documents); other added tokens (chat markers, ...) only occur where
    the text itself contains them, and count as text."""
    return frozenset(t for t in (_special_id(tokenizer, w) for w in ("bos", "eos", "pad")) if t is not None)


def build_contexts(docs: Iterable[Document], tokenizer, spec: ContextSpec,
                   max_documents: int | None = None) -> tuple[pa.Table, pa.Table]:
    """Return (contexts, documents) tables.

    contexts: context_id int32, split str, document_id int32 (document of the first non-BOS token),
    token_ids list<int32>[context_length], document_ids list<int32>[context_length].
    documents: document_id int32, split str, title str, label str|null, n_tokens int32.
    """
    L = spec.context_length
    bos_id, eos_id = _special_id(tokenizer, "bos"), _special_id(tokenizer, "eos")
    if spec.bos != "none" and bos_id is None:
        raise UserError(f"corpus.bos: {spec.bos!r} needs a BOS token, but the tokenizer has none (use 'none')")
    n_contexts = spec.n_tokens // L
    if n_contexts < 1:
        raise UserError(f"corpus.n_tokens: {spec.n_tokens} is smaller than one context of {L} tokens")
    n_val = round(n_contexts * spec.validation_fraction) if spec.validation_fraction > 0 else 0
    if spec.validation_fraction > 0 and n_val == 0:
        n_val = 1
    want = {"train": n_contexts - n_val, "validation": n_val}
    # Stream tokens needed per split: the BOS policy 'context' spends one slot per context on BOS.
    per_ctx = L - 1 if spec.bos == "context" else L
    need = {s: want[s] * per_ctx for s in SPLITS}

    # Finite sources are shuffled as a whole (seeded) so a small budget still samples every topic.
    docs = list(docs) if max_documents is None else [d for _, d in zip(range(max_documents), docs, strict=False)]
    if not docs:
        raise UserError("corpus.source: no documents with text were found")
    rng = np.random.default_rng(spec.seed)
    order = rng.permutation(len(docs))
    split_of = np.where(rng.random(len(docs)) < spec.validation_fraction, 1, 0)

    streams: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    doc_streams: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    have = {s: 0 for s in SPLITS}
    doc_rows: list[dict] = []
    batch: list[int] = []

    def flush(idx: list[int]) -> None:
        texts = [docs[i].text for i in idx]
        enc = tokenizer(texts, add_special_tokens=False)["input_ids"]
        for i, ids in zip(idx, enc, strict=False):
            split = SPLITS[split_of[i]]
            if have[split] >= need[split]:
                continue
            toks = list(ids)
            if spec.bos == "document":
                toks = [bos_id] + toks
            if eos_id is not None:
                toks = toks + [eos_id]
            doc_id = len(doc_rows)
            doc_rows.append({"document_id": doc_id, "split": split, "title": docs[i].title,
                             "label": docs[i].label, "n_tokens": len(ids)})
            arr = np.asarray(toks, dtype=np.int32)
            streams[split].append(arr)
            doc_streams[split].append(np.full(len(arr), doc_id, dtype=np.int32))
            have[split] += len(arr)

    for i in order:
        if all(have[s] >= need[s] for s in SPLITS):
            break
        batch.append(int(i))
        if len(batch) == 256:
            flush(batch)
            batch = []
    if batch:
        flush(batch)

    rows_tok: list[np.ndarray] = []
    rows_doc: list[np.ndarray] = []
    rows_split: list[str] = []
    for split in SPLITS:
        if not streams[split]:
            continue
        tok = np.concatenate(streams[split])
        did = np.concatenate(doc_streams[split])
        k = min(want[split], len(tok) // per_ctx)
        if k < want[split]:
            log.warning("%s split: corpus ran out after %d of %d contexts", split, k, want[split])
        tok = tok[: k * per_ctx].reshape(k, per_ctx)
        did = did[: k * per_ctx].reshape(k, per_ctx)
        if spec.bos == "context":
            # BOS belongs to the document of the token that follows it.
            tok = np.concatenate([np.full((k, 1), bos_id, np.int32), tok], axis=1)
            did = np.concatenate([did[:, :1], did], axis=1)
        rows_tok.extend(tok)
        rows_doc.extend(did)
        rows_split.extend([split] * k)
    if not rows_tok:
        raise UserError("corpus.source: the documents hold too few tokens for a single context")

    first_doc = [int(d[1] if spec.bos == "context" else d[0]) for d in rows_doc]
    contexts = pa.table({
        "context_id": pa.array(np.arange(len(rows_tok), dtype=np.int32)),
        "split": pa.array(rows_split, pa.string()),
        "document_id": pa.array(first_doc, pa.int32()),
        "token_ids": pa.array([r.tolist() for r in rows_tok], pa.list_(pa.int32())),
        "document_ids": pa.array([r.tolist() for r in rows_doc], pa.list_(pa.int32())),
    })
    documents = pa.Table.from_pylist(doc_rows, schema=pa.schema([
        ("document_id", pa.int32()), ("split", pa.string()), ("title", pa.string()),
        ("label", pa.string()), ("n_tokens", pa.int32()),
    ]))
    return contexts, documents


def read_contexts(path, split: str | None = None):  # -> polars.DataFrame
    """Contexts table (optionally one split) as a polars DataFrame."""
    import polars as pl

    df = pl.read_parquet(path)
    return df.filter(pl.col("split") == split) if split else df


def token_labels(contexts, documents):  # -> polars.DataFrame
    """One row per (context_id, position) with the token's document label: ground truth for interpret/steer."""
    import polars as pl

    long = contexts.select("context_id", "document_ids").explode("document_ids").rename({"document_ids": "document_id"})
    long = long.with_columns(pl.int_range(pl.len()).over("context_id").alias("position"))
    return long.join(documents.select("document_id", "label", "title"), on="document_id", how="left")
