"""Token contexts as dense lookup arrays: context id -> row, and per (row, position) token, document, label.

The interpret stage needs, for every activation row, the document (and so the topic label) its token
came from, and for every example the whole context's tokens. ``contexts.parquet`` has both (see
``pipeline.tokens``); here they become ``[n_ctx, T]`` arrays so that per-batch lookups are one
vectorised gather instead of a join.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl

from pipeline.errors import UserError


@dataclass
class ContextTable:
    context_ids: np.ndarray  # [n_ctx] int64, the ids of the rows below
    lookup: np.ndarray  # [max_id + 1] int64: context id -> row (or -1)
    tokens: np.ndarray  # [n_ctx, T] int64 token ids (-1 past a short context's end)
    documents: np.ndarray  # [n_ctx, T] int64 document ids (-1: none)
    labels: np.ndarray  # [n_ctx, T] int64 index into label_names (-1: unlabelled)
    label_names: list[str]  # sorted topic labels present in this split
    titles: dict[int, str]  # document id -> title

    @property
    def context_length(self) -> int:
        return int(self.tokens.shape[1])

    def rows(self, context_id: np.ndarray) -> np.ndarray:
        """Context ids ``[N]`` -> row indices ``[N]``; raise if an id is unknown."""
        cid = np.asarray(context_id, dtype=np.int64)
        ok = (cid >= 0) & (cid < len(self.lookup))
        rows = np.full(cid.shape, -1, dtype=np.int64)
        rows[ok] = self.lookup[cid[ok]]
        if (rows < 0).any():
            bad = int(cid[rows < 0][0])
            raise UserError(f"activation context_id {bad} is not in the token contexts of this split "
                            "(were activations extracted from another data/tokens?)")
        return rows


def _pad(lists: list[list[int]] | pl.Series, T: int) -> np.ndarray:
    out = np.full((len(lists), T), -1, dtype=np.int64)
    for i, row in enumerate(lists):
        if row is not None:
            out[i, : len(row)] = row
    return out


def build_context_table(contexts: pl.DataFrame, documents: pl.DataFrame | None, split: str | None = None) -> ContextTable:
    """Dense lookups from ``contexts`` (context_id, token_ids, document_ids[, split]) and ``documents``
    (document_id, label[, title]). ``split`` filters both when given."""
    if split is not None and "split" in contexts.columns:
        contexts = contexts.filter(pl.col("split") == split)
    if contexts.height == 0:
        raise UserError(f"token contexts: no contexts in split {split!r}")
    contexts = contexts.sort("context_id")
    ids = contexts["context_id"].to_numpy().astype(np.int64)
    T = int(contexts["token_ids"].list.len().to_numpy().max())
    tokens = _pad(contexts["token_ids"].to_list(), T)
    if "document_ids" in contexts.columns:
        docs = _pad(contexts["document_ids"].to_list(), T)
    else:
        docs = np.full_like(tokens, -1)
    labels = np.full_like(tokens, -1)
    names: list[str] = []
    titles: dict[int, str] = {}
    if documents is not None and documents.height and "label" in documents.columns:
        lab = documents.filter(pl.col("label").is_not_null() & (pl.col("label") != ""))
        names = sorted(set(lab["label"].to_list()))
        if names:
            doc_ids = lab["document_id"].to_numpy().astype(np.int64)
            doc_lab = np.full(max(int(doc_ids.max()), int(docs.max())) + 2, -1, dtype=np.int64)
            index = {n: i for i, n in enumerate(names)}
            doc_lab[doc_ids] = [index[v] for v in lab["label"].to_list()]
            labels = np.where(docs >= 0, doc_lab[np.clip(docs, 0, None)], -1)
    if documents is not None and "title" in documents.columns:
        titles = dict(zip(documents["document_id"].to_list(), documents["title"].to_list(), strict=True))
    lookup = np.full(int(ids.max()) + 1, -1, dtype=np.int64)
    lookup[ids] = np.arange(len(ids))
    return ContextTable(ids, lookup, tokens, docs, labels, names, titles)
