"""Document-level inputs of sparse probing: pick labelled documents, split them, mean-pool their tokens.

SAEBench's sparse probing mean-pools each text's activations over its non-special tokens and, for the
SAE, encodes every token and pools the latents over the same mask (Karvonen et al. 2025). Here a text
is one corpus document: its tokens may span several contexts, and every one of them whose token id is
not BOS/EOS/PAD counts. The activations come from the extract stage's datasets, so no model forward
is needed; only the chosen documents' tokens are encoded.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass

import numpy as np
import torch

TRAIN, VALIDATION, TEST = 0, 1, 2  # probe split codes (not the corpus splits)


@dataclass
class Pooled:
    """Mean-pooled documents. ``llm[D, d_model]``, ``sae[D, d_sae]`` float32 (rows in ``doc_ids`` order),
    ``labels[D]`` str, ``split[D]`` in {TRAIN, VALIDATION, TEST}, ``n_tokens[D]`` tokens pooled per document."""

    doc_ids: np.ndarray
    labels: np.ndarray
    split: np.ndarray
    llm: np.ndarray
    sae: np.ndarray
    n_tokens: np.ndarray


def choose_documents(doc_ids: np.ndarray, labels: np.ndarray, first_context: np.ndarray, per_label: int | None) -> np.ndarray:
    """Up to ``per_label`` documents of every label, those that start earliest in the contexts (all when
    None); sorted ids. ``prepare`` shuffles a finite corpus by seed before building contexts, so the
    earliest documents are a seeded random sample, and the stream that pools them can stop early."""
    keep: list[np.ndarray] = []
    for lab in sorted(set(labels.tolist())):
        mine = np.flatnonzero(labels == lab)
        mine = mine[np.argsort(first_context[mine], kind="stable")]
        keep.append(doc_ids[mine[:per_label] if per_label is not None else mine])
    return np.sort(np.concatenate(keep)) if keep else np.zeros(0, dtype=doc_ids.dtype)


def context_span(doc_of: np.ndarray) -> dict[int, tuple[int, int]]:
    """``{document id: (first context id, last context id)}`` from a :func:`document_index` table."""
    flat = doc_of.reshape(-1)
    ctx = np.arange(flat.size) // doc_of.shape[1]
    valid = flat >= 0
    ids, first = np.unique(flat[valid], return_index=True)
    last_rev = np.unique(flat[valid][::-1], return_index=True)[1]
    last = ctx[valid][::-1][last_rev]
    return {int(d): (int(ctx[valid][f]), int(e)) for d, f, e in zip(ids, first, last, strict=True)}


def split_documents(labels: np.ndarray, validation_fraction: float, test_fraction: float, seed: int) -> np.ndarray:
    """Probe split per document, stratified by label and drawn by ``seed``: a document sits in the same
    split in every one-vs-rest task, so no task trains on a document another task tests on."""
    rng = np.random.default_rng(seed + 1)
    out = np.full(len(labels), TRAIN, dtype=np.int8)
    for lab in sorted(set(labels.tolist())):
        idx = rng.permutation(np.flatnonzero(labels == lab))
        n_test = int(round(len(idx) * test_fraction))
        n_val = int(round(len(idx) * validation_fraction))
        out[idx[:n_test]] = TEST
        out[idx[n_test:n_test + n_val]] = VALIDATION
    return out


def document_index(context_ids: np.ndarray, document_ids: list[list[int]] | np.ndarray) -> np.ndarray:
    """``[max context id + 1, T]`` int64: the document each (context, position) holds (-1: no context)."""
    docs = np.asarray(document_ids, dtype=np.int64)  # [C, T]
    table = np.full((int(context_ids.max()) + 1 if len(context_ids) else 0, docs.shape[1]), -1, dtype=np.int64)
    table[context_ids] = docs
    return table


@torch.no_grad()
def pool_documents(batches: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]],
                   doc_of: np.ndarray, chosen: np.ndarray, special_ids: Collection[int],
                   encode: Callable[[torch.Tensor], torch.Tensor], d_sae: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sum activations and SAE latents per chosen document over its non-special tokens, then divide.

    :param batches: ``(acts[B, d], context_id[B], position[B], token_id[B])`` from an activation dataset
    :param doc_of: :func:`document_index` of the contexts the batches come from
    :param chosen: sorted document ids to pool (row order of the outputs)
    :param encode: ``x[n, d] float32 -> f[n, d_sae]``
    :return: ``(llm[D, d], sae[D, d_sae], n_tokens[D])``; a document without tokens pools to zeros
    """
    lookup = {int(d): i for i, d in enumerate(chosen)}
    row_of = np.full(int(doc_of.max()) + 2 if doc_of.size else 1, -1, dtype=np.int64)  # document id -> row
    for d, i in lookup.items():
        if d < len(row_of):
            row_of[d] = i
    special = torch.tensor(sorted(special_ids), dtype=torch.int64)
    llm_sum: torch.Tensor | None = None
    # float32 sums: a document has a few hundred tokens, and the [B, d_sae] latents in float64 cost 2x the encode
    sae_sum = torch.zeros(len(chosen), d_sae, dtype=torch.float32)
    count = torch.zeros(len(chosen), dtype=torch.float64)
    for acts, ctx, pos, tok in batches:
        docs = torch.from_numpy(doc_of[ctx.numpy(), pos.numpy()])  # [B]
        rows = torch.from_numpy(row_of[docs.clamp(min=-1).numpy()])  # [B]; -1 stays -1 via the last slot
        rows[docs < 0] = -1
        keep = (rows >= 0) & ~torch.isin(tok.to(torch.int64), special)  # pooled over the same mask for both
        if not keep.any():
            continue
        x, r = acts[keep].float(), rows[keep]
        if llm_sum is None:
            llm_sum = torch.zeros(len(chosen), x.shape[1], dtype=torch.float64)
        llm_sum.index_add_(0, r, x.double())
        sae_sum.index_add_(0, r, encode(x).float())
        count.index_add_(0, r, torch.ones(len(r), dtype=torch.float64))
    if llm_sum is None:
        raise ValueError("no token of the chosen documents was found in the activations")
    denom = count.clamp(min=1)[:, None]
    return ((llm_sum / denom).float().numpy(), (sae_sum.double() / denom).float().numpy(), count.numpy().astype(np.int64))


__all__ = ["Pooled", "TRAIN", "VALIDATION", "TEST", "choose_documents", "context_span", "split_documents", "document_index",
           "pool_documents"]
