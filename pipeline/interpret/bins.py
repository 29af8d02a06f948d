"""Fixed log-spaced activation bins, and ``topic_auroc@1`` computed from binned counts.

Bins are fixed (not data-dependent) so that histograms from different batches, runs and SAEs add
up and compare: ``BINS_PER_DECADE`` bins per decade from ``10**LOG_MIN`` to ``10**LOG_MAX``;
values below the first edge land in bin 0, above the last in the last bin. Relative resolution
10**(1/8) ~ 1.33.

``topic_auroc@1`` (definition, version 1): the unit is a *segment*, the maximal run of tokens of one
document inside one context; its score for feature j is the max activation of j over the segment
(0 if j never fires in it); its label is the document's topic. For each topic l, the one-vs-rest
AUROC is P(score of a random l-segment > score of a random non-l segment), ties counted one half,
computed from per-label histograms of segment maxima over the log bins above plus an exact zero bin
(so within-bin ties count one half: a lower bound on resolution, exact when the two classes do not
share a bin). A feature's topic AUROC is the maximum over topics; that topic is its best topic.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

LOG_MIN, LOG_MAX, BINS_PER_DECADE = -4, 5, 8
N_BINS = (LOG_MAX - LOG_MIN) * BINS_PER_DECADE  # 72


def bin_edges() -> np.ndarray:
    """``[N_BINS + 1]`` edges of the log bins (bin b covers [edges[b], edges[b+1]))."""
    return 10.0 ** (LOG_MIN + np.arange(N_BINS + 1) / BINS_PER_DECADE)


def log_bin(v: Tensor) -> Tensor:
    """Positive activations ``v[...]`` -> bin index ``[...]`` int64 in [0, N_BINS)."""
    b = torch.floor((torch.log10(v.double().clamp_min(1e-30)) - LOG_MIN) * BINS_PER_DECADE)
    return b.clamp(0, N_BINS - 1).to(torch.int64)


def auroc_from_counts(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """AUROC from ordered bin counts: ``pos[..., K]``, ``neg[..., K]`` (bin 0 lowest) -> ``[...]``.

    P(X_pos > X_neg) + 0.5 P(X_pos, X_neg in the same bin); NaN where a class is empty.
    """
    pos, neg = pos.astype(np.float64), neg.astype(np.float64)
    neg_below = np.cumsum(neg, axis=-1) - neg  # negatives in strictly lower bins
    num = (pos * (neg_below + 0.5 * neg)).sum(-1)
    den = pos.sum(-1) * neg.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def topic_auroc(topic_hist: np.ndarray, n_segments: np.ndarray) -> np.ndarray:
    """``topic_auroc@1`` per (feature, topic): ``topic_hist[d_sae, L, N_BINS]`` counts of non-zero segment
    maxima, ``n_segments[L]`` segments per label -> ``[d_sae, L]`` (NaN with fewer than two labels)."""
    d, L, _ = topic_hist.shape
    if L < 2:
        return np.full((d, L), np.nan)
    zeros = n_segments[None, :] - topic_hist.sum(-1)  # [d, L] segments where the feature is silent
    counts = np.concatenate([zeros[..., None], topic_hist], axis=-1).astype(np.int64)  # [d, L, 1 + N_BINS]
    total = counts.sum(1, keepdims=True)  # [d, 1, K]
    return auroc_from_counts(counts, total - counts)


def best_topic(auroc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``[d_sae, L]`` -> (best topic index ``[d_sae]`` (-1 if none), its AUROC ``[d_sae]``)."""
    if auroc.shape[1] == 0 or np.isnan(auroc).all():
        return np.full(auroc.shape[0], -1), np.full(auroc.shape[0], np.nan)
    filled = np.where(np.isnan(auroc), -np.inf, auroc)
    idx = filled.argmax(1)
    best = auroc[np.arange(len(idx)), idx]
    return np.where(np.isnan(best), -1, idx), best


def auroc_interval(auroc: np.ndarray, n_pos: np.ndarray, n_neg: np.ndarray, z: float = 1.96) -> tuple[np.ndarray, np.ndarray]:
    """95% interval of an AUROC from its class sizes (Hanley & McNeil 1982): ``[...]`` each -> (low, high) ``[...]``.

    SE^2 = (A(1-A) + (n1-1)(Q1-A^2) + (n2-1)(Q2-A^2)) / (n1 n2), Q1 = A/(2-A), Q2 = 2A^2/(1+A); the normal
    interval is clipped to [0, 1]. It assumes continuous scores: with many tied (silent) segments it is
    conservative. NaN where the AUROC is NaN or a class is empty."""
    a = np.asarray(auroc, dtype=np.float64)
    n1, n2 = np.asarray(n_pos, dtype=np.float64), np.asarray(n_neg, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
        var = (a * (1 - a) + (n1 - 1) * (q1 - a * a) + (n2 - 1) * (q2 - a * a)) / (n1 * n2)
        se = np.sqrt(np.maximum(var, 0.0))
    ok = np.isfinite(a) & (n1 > 0) & (n2 > 0)
    return (np.where(ok, np.clip(a - z * se, 0.0, 1.0), np.nan), np.where(ok, np.clip(a + z * se, 0.0, 1.0), np.nan))
