"""Which contexts each feature is shown on, and their token-level activations.

Three kinds per feature (Bricken et al. 2023 and Anthropic's feature dashboards; Bills et al. 2023
for the random negatives):

- ``top``: the ``n_top`` distinct contexts with the highest max activation, rank 0 = strongest;
- ``quantile``: from the uniform reservoir of activating contexts, sorted by max activation and cut
  into ``n_quantiles`` equal-count bins (activation quantiles of the context maxima), ``per_bin``
  evenly spaced picks per bin; ``rank = bin * per_bin + i``, bin 0 = weakest;
- ``random``: ``n_random`` contexts where the feature never fires, drawn per feature with hash keys
  from a seeded pool (the negatives of the detection scorer).

Token-level activations come from the pass's sparse codes (``SparseCodes``), not from a second encode.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pipeline.interpret.aggregates import FeatureStats, SparseCodes, hash_keys

KINDS = ("top", "quantile", "random")
TOP, QUANTILE, RANDOM = 0, 1, 2


@dataclass
class Selection:
    feature: np.ndarray  # [E] int64, sorted ascending
    kind: np.ndarray  # [E] int64 index into KINDS
    rank: np.ndarray  # [E] int64
    ctx: np.ndarray  # [E] int64 ContextTable row

    def take(self, mask: np.ndarray) -> Selection:
        return Selection(self.feature[mask], self.kind[mask], self.rank[mask], self.ctx[mask])


def _flat(kind: int, ctx: np.ndarray, valid: np.ndarray, rank: np.ndarray) -> tuple[np.ndarray, ...]:
    """``[n, d_sae]`` grids -> flat arrays of the valid entries (feature-major order)."""
    n, d = ctx.shape
    feat = np.broadcast_to(np.arange(d)[None, :], (n, d))
    v = valid.T.reshape(-1)
    return (feat.T.reshape(-1)[v], np.full(int(v.sum()), kind), rank.T.reshape(-1)[v], ctx.T.reshape(-1)[v])


def select_examples(stats: FeatureStats, n_quantiles: int, per_bin: int, n_random: int, seed: int) -> Selection:
    """Choose the example contexts of every feature (see module docstring)."""
    d = stats.top_value.shape[1]
    parts = []
    n_top = stats.top_value.shape[0]
    parts.append(_flat(TOP, stats.top_ctx, stats.top_ctx >= 0, np.broadcast_to(np.arange(n_top)[:, None], (n_top, d))))

    if per_bin and n_quantiles:
        R = stats.res_value.shape[0]
        order = np.argsort(stats.res_value, axis=0, kind="stable")  # ascending; empty slots (0) first
        sv, sc = np.take_along_axis(stats.res_value, order, 0), np.take_along_axis(stats.res_ctx, order, 0)
        n_valid = (stats.res_value > 0).sum(0)  # [d]
        b = np.arange(n_quantiles)[:, None]
        i = np.arange(per_bin)[None, :]
        frac = ((b + (i + 0.5) / per_bin) / n_quantiles).reshape(-1)  # [Q * per_bin] in (0, 1)
        pos = R - n_valid[None, :] + np.floor(frac[:, None] * n_valid[None, :]).astype(np.int64)  # [Q*e, d]
        pos = np.clip(pos, 0, R - 1)
        ctx = np.take_along_axis(sc, pos, 0)
        valid = (np.take_along_axis(sv, pos, 0) > 0) & (n_valid[None, :] > 0)
        rank = np.broadcast_to(np.arange(len(frac))[:, None], ctx.shape)
        f, k, r, c = _flat(QUANTILE, ctx, valid, rank)
        # Fewer activating contexts than picks: the same context would repeat; keep its first pick.
        _, first = np.unique(f * (c.max(initial=0) + 1) + c, return_index=True)
        keep = np.zeros(len(f), bool)
        keep[first] = True
        parts.append((f[keep], k[keep], r[keep], c[keep]))

    if n_random:
        present = np.unique(stats.codes.row_ctx)
        rng = np.random.default_rng(seed)
        pool = np.sort(rng.choice(present, size=min(len(present), max(8 * n_random, 64)), replace=False))
        active = np.zeros((len(pool), d), dtype=bool)  # [P, d] feature fires somewhere in pool context
        rows_in_pool = np.isin(stats.codes.row_ctx, pool)
        sel = rows_in_pool[stats.codes.row]
        active[np.searchsorted(pool, stats.codes.row_ctx[stats.codes.row[sel]]), stats.codes.feature[sel]] = True
        keys = hash_keys(torch.from_numpy(pool)[:, None], torch.arange(d)[None, :], seed + 7).numpy()
        keys[active] = np.inf
        n_neg = min(n_random, len(pool))
        idx = np.argsort(keys, axis=0, kind="stable")[:n_neg]  # [n_neg, d]
        valid = np.isfinite(np.take_along_axis(keys, idx, 0)) & (stats.fire_count > 0)[None, :]  # dead: no negatives needed
        parts.append(_flat(RANDOM, pool[idx], valid, np.broadcast_to(np.arange(n_neg)[:, None], (n_neg, d))))

    f, k, r, c = (np.concatenate([p[i] for p in parts]).astype(np.int64) for i in range(4))
    order = np.lexsort((r, k, f))
    return Selection(f[order], k[order], r[order], c[order])


class CodeIndex:
    """Sparse codes sorted by feature, for gathering token-level activations of a feature range."""

    def __init__(self, codes: SparseCodes, d_sae: int) -> None:
        order = np.argsort(codes.feature, kind="stable")
        self.feature = codes.feature[order]
        self.row, self.value = codes.row[order], codes.value[order]
        self.codes, self.d = codes, d_sae

    def gather(self, sel: Selection, T: int) -> np.ndarray:
        """Token-level activations ``[E, T]`` float32 of the (feature, context) pairs in ``sel``."""
        out = np.zeros((len(sel.feature), T), dtype=np.float32)
        if not len(sel.feature):
            return out
        lo, hi = np.searchsorted(self.feature, [sel.feature.min(), sel.feature.max() + 1])
        f, r, v = self.feature[lo:hi].astype(np.int64), self.row[lo:hi], self.value[lo:hi]
        key_c = self.codes.row_ctx[r] * self.d + f
        ukeys, inv = np.unique(sel.ctx * self.d + sel.feature, return_inverse=True)
        idx = np.clip(np.searchsorted(ukeys, key_c), 0, len(ukeys) - 1)
        match = ukeys[idx] == key_c
        acts = np.zeros((len(ukeys), T), dtype=np.float32)
        pos = np.clip(self.codes.row_pos[r[match]], 0, T - 1)
        acts[idx[match], pos] = v[match]
        out[:] = acts[inv.reshape(-1)]
        return out
