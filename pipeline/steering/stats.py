"""One streaming pass over an activation dataset: what steering needs to know about every feature.

From the SAE's features on ``max_tokens`` activation rows (and the tokens' topic labels) we collect
each feature's max activation (its scale m_f), its per-context maxima (for quantile scales and to pick
ablation contexts), its mean activation per topic (for automatic selection when interpretation
output lacks topic statistics), and the mean *hidden state* per topic (for the difference-in-means
baseline). Memory is O(d_sae * (n_topics + n_contexts)), independent of the dataset size.

Rows whose token is special (``special_ids``: BOS/EOS/PAD, as ``evaluate`` leaves them out) count
towards ``max_tokens`` but enter no statistic: the BOS position's hidden state is typically an
outlier of much larger norm (an attention sink), so a feature firing there would take its scale m_f,
and its topic-less hidden state the difference-in-means direction, from a position no prompt text
steers. The metrics computed from these statistics carry versions that say so
(:mod:`pipeline.metric_names`, steering).

A transcoder (:mod:`pipeline.site`) encodes the MLP input but writes the MLP output: its latents come from the
MLP-input dataset and the hidden-state means (the difference-in-means baseline, the mean-ablation values) from the
MLP-output dataset of the same rows (``write_ds``), so every baseline lives where the transcoder writes.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterator
from dataclasses import dataclass

import numpy as np
import polars as pl
import torch

from pipeline.activations import ActivationDataset
from pipeline.activations.reader import ActivationBatch
from pipeline.errors import UserError
from pipeline.metrics import special_mask
from pipeline.steering.interventions import SAELike

log = logging.getLogger(__name__)

__all__ = ["FeatureStats", "collect_stats", "label_grid"]


@dataclass
class FeatureStats:
    n_tokens: int  # rows the statistics average over (special-token rows excluded)
    max_act: np.ndarray  # [d_sae]
    fire_count: np.ndarray  # [d_sae] tokens with f > 0
    mean: np.ndarray  # [d_sae]
    std: np.ndarray  # [d_sae]
    topics: list[str]
    topic_tokens: np.ndarray  # [n_topics]
    topic_mean: np.ndarray  # [n_topics, d_sae] mean feature activation on the topic's tokens
    resid_topic_mean: np.ndarray  # [n_topics, d_in] mean hidden state (at the write hook) on the topic's tokens
    resid_mean: np.ndarray  # [d_in] mean hidden state (at the write hook) on labelled tokens
    context_ids: np.ndarray  # [n_ctx]
    context_max: np.ndarray  # [n_ctx, d_sae] per-context max activation

    def selectivity(self) -> np.ndarray:
        """Standardised topic contrast ``(mean_in - mean_out) / std`` (shape: [n_topics, d_sae]).

        A Cohen's-d-like effect size: cheap, needs only first and second moments, and unlike a raw
        mean difference it does not favour dense, high-magnitude features.
        """
        if not self.topics:
            return np.zeros((0, len(self.max_act)))
        tot = (self.topic_mean * self.topic_tokens[:, None]).sum(0)  # [d_sae]
        n_out = self.topic_tokens.sum() - self.topic_tokens  # [n_topics]
        mean_out = (tot[None] - self.topic_mean * self.topic_tokens[:, None]) / np.maximum(n_out, 1)[:, None]
        return (self.topic_mean - mean_out) / np.maximum(self.std, 1e-6)[None]

    def scale(self, feature: int, kind: str, quantile: float) -> float:
        """m_f: the max activation, or a quantile of the per-context maxima over contexts where it fires."""
        if kind == "max":
            return float(self.max_act[feature])
        col = self.context_max[:, feature]
        col = col[col > 0]
        return float(np.quantile(col, quantile)) if len(col) else 0.0


def _lockstep(ds: ActivationDataset, write_ds: ActivationDataset | None, batch_size: int
              ) -> Iterator[tuple[ActivationBatch, ActivationBatch]]:
    """``(batch of ds, the same rows of write_ds)`` in storage order (``write_ds`` None: the batch twice); the rows
    are checked to be the same (context, position, token) so a misaligned pair stops with one line."""
    xs = ds.iter_batches(batch_size, dtype=torch.float32)
    if write_ds is None:
        yield from ((b, b) for b in xs)
        return
    for b, wb in zip(xs, write_ds.iter_batches(batch_size, dtype=torch.float32), strict=False):
        if len(b.acts) != len(wb.acts) or not (torch.equal(b.context_id, wb.context_id)
                                               and torch.equal(b.position, wb.position)):
            raise UserError(f"{write_ds.root}: not aligned with {ds.root} (other rows in storage order); extract "
                            "both hooks in one `sae extract`")
        yield b, wb


def label_grid(contexts: pl.DataFrame, documents: pl.DataFrame) -> tuple[list[str], dict[int, int], np.ndarray]:
    """Topic index of every (context, position): (topics, context_id -> row, grid [n_ctx, L], -1 = none)."""
    docs = documents.filter(pl.col("label").is_not_null() & (pl.col("label") != ""))
    topics = sorted(docs["label"].unique().to_list())
    lab = dict(zip(docs["document_id"].to_list(), [topics.index(x) for x in docs["label"].to_list()], strict=True))
    rows = {int(c): i for i, c in enumerate(contexts["context_id"].to_list())}
    doc_ids = contexts["document_ids"].to_list()
    L = max((len(d) for d in doc_ids), default=0)
    grid = np.full((len(doc_ids), L), -1, dtype=np.int64)
    for i, ds in enumerate(doc_ids):
        grid[i, :len(ds)] = [lab.get(d, -1) if d is not None else -1 for d in ds]
    return topics, rows, grid


@torch.no_grad()
def collect_stats(sae: SAELike, ds: ActivationDataset, topics: list[str], ctx_rows: dict[int, int],
                  grid: np.ndarray, max_tokens: int, batch_size: int = 4096,
                  special_ids: Collection[int] = (), write_ds: ActivationDataset | None = None) -> FeatureStats:
    """Stream ``ds`` (in storage order, first ``max_tokens`` rows) through the SAE's encoder; rows whose
    token id is in ``special_ids`` are read (they count towards ``max_tokens``) but not counted.
    ``write_ds``: a transcoder's MLP-output dataset (same rows as ``ds``, read in lockstep) for the hidden-state
    means; None: ``ds``'s own rows."""
    d_sae, d_in, nt = sae.W_dec.shape[0], sae.W_dec.shape[1], len(topics)
    mx = torch.zeros(d_sae)
    fire = torch.zeros(d_sae, dtype=torch.float64)
    s1 = torch.zeros(d_sae, dtype=torch.float64)
    s2 = torch.zeros(d_sae, dtype=torch.float64)
    tsum = torch.zeros(nt, d_sae, dtype=torch.float64)
    rsum = torch.zeros(nt, d_in, dtype=torch.float64)
    tcount = torch.zeros(nt, dtype=torch.float64)
    ctx_index: dict[int, int] = {}
    cm = torch.zeros(0, d_sae)  # [n_ctx, d_sae]
    n = n_read = 0
    for b, wb in _lockstep(ds, write_ds, batch_size):
        x = b.acts[: max_tokens - n_read]  # [N, d_in]
        h = wb.acts[: len(x)]  # [N, d_in] the hidden state at the write hook (x itself for an SAE)
        cid_t, pos_t = b.context_id[: len(x)], b.position[: len(x)]  # [N]
        n_read += len(x)
        if special_ids:
            keep = ~special_mask(b.token_id[: len(x)], special_ids)  # [N]
            x, h, cid_t, pos_t = x[keep], h[keep], cid_t[keep], pos_t[keep]
        if len(x) == 0:  # a batch of special tokens only
            if n_read >= max_tokens:
                break
            continue
        cid = cid_t.numpy()
        f = sae.encode(x).float()  # [N, d_sae]
        mx = torch.maximum(mx, f.max(0).values)
        fire += (f > 0).sum(0)
        s1 += f.sum(0)
        s2 += f.double().pow(2).sum(0)
        rows = np.array([ctx_rows.get(int(c), -1) for c in cid])
        pos = pos_t.numpy()
        ok = (rows >= 0) & (pos < grid.shape[1]) if grid.size else np.zeros(len(x), bool)
        lab = np.full(len(x), -1)
        lab[ok] = grid[rows[ok], pos[ok]]
        if nt:
            onehot = torch.zeros(len(x), nt, dtype=torch.float64)
            has = torch.from_numpy(lab >= 0)
            onehot[has, torch.from_numpy(lab[lab >= 0])] = 1.0
            tsum += onehot.T @ f.double()
            rsum += onehot.T @ h.double()
            tcount += onehot.sum(0)
        # Per-context max: a local row per context (in order of appearance), then a scatter-max.
        fresh = [int(c) for c in np.unique(cid) if int(c) not in ctx_index]
        for c in fresh:
            ctx_index[c] = len(ctx_index)
        if fresh:
            cm = torch.cat([cm, torch.zeros(len(fresh), d_sae)])
        local = torch.tensor([ctx_index[int(c)] for c in cid], dtype=torch.long)
        cm.scatter_reduce_(0, local[:, None].expand_as(f), f, "amax", include_self=True)
        n += len(x)
        if n_read >= max_tokens:
            break
    if n_read == 0:
        raise ValueError("activation dataset is empty")
    if n == 0:
        raise UserError(f"{ds.root}: all {n_read} rows read have a special token id ({sorted(special_ids)}); "
                        "were the activations written without token ids?")
    mean = (s1 / n).numpy()
    std = np.sqrt(np.maximum((s2 / n).numpy() - mean**2, 0.0))
    tc = tcount.numpy()
    log.info("feature statistics over %d tokens (%d special left out), %d contexts, %d labelled tokens",
             n, n_read - n, len(ctx_index), int(tc.sum()))
    return FeatureStats(
        n_tokens=n, max_act=mx.numpy(), fire_count=fire.numpy(), mean=mean, std=std, topics=list(topics),
        topic_tokens=tc, topic_mean=(tsum / tcount.clamp(min=1)[:, None]).numpy(),
        resid_topic_mean=(rsum / tcount.clamp(min=1)[:, None]).numpy(),
        resid_mean=(rsum.sum(0) / max(tc.sum(), 1)).numpy(),
        context_ids=np.array(list(ctx_index), dtype=np.int64),
        context_max=cm.numpy(),
    )
