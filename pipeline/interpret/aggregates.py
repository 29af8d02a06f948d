"""Per-feature running aggregates of the statistics pass, never a dense tokens x features matrix.

:class:`FeatureStream` takes chunks of *whole contexts* encoded to ``f[N, d_sae]``
(:func:`pipeline.interpret.stream.stream_stats` cuts and encodes them), turns each into its non-zero
triples (row, feature, value) and folds them into bounded per-feature state:

- firing counts, activation sums and max, a histogram over fixed log bins (``bins``);
- per-context maxima ``[C, d_sae]`` of the chunk, merged into a running top buffer
  ``[n_top, d_sae]`` with ``torch.topk`` over the context dimension (one context per slot, so the
  top examples are distinct contexts, as in Bricken et al. 2023's dashboards);
- a uniform reservoir of activating contexts per feature (the contexts with the ``reservoir``
  smallest hash keys, a bottom-k sample that does not depend on batch boundaries), from which the
  quantile-stratified examples are drawn;
- per-(context, document) segment maxima binned per topic label, for ``topic_auroc@1``;
- co-occurrence counts among each token's ``cooc_per_token`` strongest active features.

The non-zero triples are also kept (``SparseCodes``, nnz x 12 bytes: ~L0 x tokens) so that the
token-level activations of the selected examples are gathered without encoding the data twice.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from pipeline.errors import UserError
from pipeline.interpret.bins import log_bin

MAX_NNZ_PER_TOKEN = 1024  # beyond this the "sparse" codes are not sparse: the SAE needs a threshold
MERGE_ROWS = 256  # contexts buffered between merges into the top buffer / reservoir


def hash_keys(context_id: Tensor, feature: Tensor, seed: int) -> Tensor:
    """Deterministic pseudo-random keys in [0, 1) for (context, feature) pairs (broadcasting int64).

    A multiply-xorshift mix (32-bit); the reservoir keeps the smallest keys, so which contexts are
    sampled is a function of (context, feature, seed) alone, not of batch boundaries.
    """
    m = 0xFFFFFFFF
    x = (context_id * 0x9E3779B1 + feature * 0x85EBCA77 + (seed + 1) * 0xC2B2AE3D) & m
    for _ in range(2):
        x = ((x ^ (x >> 16)) * 0x45D9F3B) & m
    x = x ^ (x >> 16)
    return x.to(torch.float64) / float(m + 1)


@dataclass
class SparseCodes:
    """All non-zero feature activations of the pass, row-major. Rows index ``row_ctx``/``row_pos``."""

    row: np.ndarray  # [nnz] int32 global row
    feature: np.ndarray  # [nnz] int32
    value: np.ndarray  # [nnz] float32
    row_ctx: np.ndarray  # [n_rows] int64 row of the ContextTable
    row_pos: np.ndarray  # [n_rows] int64 position in the context


@dataclass
class FeatureStats:
    n_tokens: int
    fire_count: np.ndarray  # [d_sae] int64 tokens with f > threshold
    act_sum: np.ndarray  # [d_sae] float64 sum of activations over firing tokens
    act_max: np.ndarray  # [d_sae] float32
    hist: np.ndarray  # [d_sae, N_BINS] int64 token-level log-bin counts of firing activations
    top_value: np.ndarray  # [n_top, d_sae] float32 per-context max, descending (0: empty slot)
    top_ctx: np.ndarray  # [n_top, d_sae] int64 ContextTable row (-1: empty)
    res_value: np.ndarray  # [R, d_sae] float32 reservoir sample of per-context maxima (0: empty)
    res_ctx: np.ndarray  # [R, d_sae] int64
    topic_hist: np.ndarray  # [d_sae, L, N_BINS] int64 segment-max log-bin counts per label
    n_segments: np.ndarray  # [L] int64 labelled (context, document) segments per label
    cooc: np.ndarray | None  # [d_sae, d_sae] int32 symmetric token co-occurrence counts
    codes: SparseCodes


class FeatureStream:
    """Running per-feature aggregates; feed chunks of whole contexts with :meth:`add`."""

    def __init__(self, d_sae: int, n_labels: int, n_top: int, reservoir: int, seed: int,
                 cooc_per_token: int, cooc: bool, threshold: float = 0.0) -> None:
        from pipeline.interpret.bins import N_BINS

        self.d, self.L, self.seed, self.threshold = d_sae, n_labels, seed, threshold
        self.m = cooc_per_token
        self.n_tokens = 0
        self.fire = torch.zeros(d_sae, dtype=torch.int64)
        self.sum = torch.zeros(d_sae, dtype=torch.float64)
        self.max = torch.zeros(d_sae)
        self.hist = torch.zeros(d_sae * N_BINS, dtype=torch.int64)
        self.top_v, self.top_c = torch.zeros(n_top, d_sae), torch.full((n_top, d_sae), -1, dtype=torch.int64)
        self.res_k = torch.full((reservoir, d_sae), 2.0)  # keys; 2.0 = empty
        self.res_v, self.res_c = torch.zeros(reservoir, d_sae), torch.full((reservoir, d_sae), -1, dtype=torch.int64)
        self.topic = torch.zeros(d_sae * max(n_labels, 1) * N_BINS, dtype=torch.int64)
        self.n_seg = torch.zeros(max(n_labels, 1), dtype=torch.int64)
        self.cooc = torch.zeros(d_sae * d_sae, dtype=torch.int32) if cooc else None
        self._codes: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._rows: list[tuple[np.ndarray, np.ndarray]] = []
        self._pending: list[tuple[Tensor, Tensor]] = []  # (cmax [C, d], context rows [C]) not yet merged

    def add(self, f: Tensor, ctx: Tensor, pos: Tensor, label: Tensor, doc: Tensor) -> None:
        """Fold one chunk: ``f[N, d_sae]`` activations; ``ctx[N]`` ContextTable rows (whole contexts,
        contiguous), ``pos[N]`` positions, ``label[N]`` topic index (-1: none), ``doc[N]`` document ids."""
        from pipeline.interpret.bins import N_BINS

        N, d = f.shape
        nz = (f > self.threshold).nonzero()  # [nnz, 2], row-major
        rows, feats = nz[:, 0], nz[:, 1]
        vals = f[rows, feats].float()  # [nnz]
        if len(vals) > MAX_NNZ_PER_TOKEN * max(N, 1):
            raise UserError(f"SAE codes are dense ({len(vals) / N:.0f} active features per token): "
                            "set interpret.threshold to the activation above which a feature fires")
        self.fire += torch.bincount(feats, minlength=d)
        self.sum += torch.bincount(feats, weights=vals.double(), minlength=d)
        self.max = torch.maximum(self.max, torch.zeros(d).scatter_reduce_(0, feats, vals, "amax"))
        self.hist.index_add_(0, feats * N_BINS + log_bin(vals), torch.ones_like(feats))

        # Per-context maxima [C, d]; merged into the top buffer and the reservoir every
        # MERGE_ROWS contexts (a topk over [n_top + pending, d] per merge, not per chunk).
        cuniq, cl = torch.unique_consecutive(ctx, return_inverse=True)  # [C], [N]
        C = len(cuniq)
        cmax = torch.zeros(C * d).scatter_reduce_(0, cl[rows] * d + feats, vals, "amax").view(C, d)
        self._pending.append((cmax, cuniq))
        if sum(len(c) for _, c in self._pending) >= MERGE_ROWS:
            self._merge()

        if self.L:
            self._add_topics(rows, feats, vals, ctx, label, doc)
        if self.cooc is not None:
            self._add_cooc(N, rows, feats, vals)
        off = self.n_tokens
        self._codes.append(((rows + off).to(torch.int32).numpy(), feats.to(torch.int32).numpy(), vals.numpy()))
        self._rows.append((ctx.numpy().copy(), pos.numpy().copy()))
        self.n_tokens += N

    def _merge(self) -> None:
        if not self._pending:
            return
        cmax = torch.cat([c for c, _ in self._pending])  # [P, d]
        cid = torch.cat([u for _, u in self._pending])[:, None].expand(cmax.shape)  # [P, d]
        self._pending = []
        self.top_v, i = torch.cat([self.top_v, cmax]).topk(len(self.top_v), dim=0)
        self.top_c = torch.cat([self.top_c, cid]).gather(0, i)
        # Bottom-k reservoir over activating contexts (hash keys; non-firing entries keyed out).
        keys = hash_keys(cid, torch.arange(self.d)[None, :], self.seed).float()  # [P, d]
        keys = torch.where(cmax > 0, keys, torch.full_like(keys, 2.0))
        self.res_k, i = torch.cat([self.res_k, keys]).topk(len(self.res_k), dim=0, largest=False)
        self.res_v = torch.cat([self.res_v, cmax]).gather(0, i)
        self.res_c = torch.cat([self.res_c, cid]).gather(0, i)

    def _add_topics(self, rows: Tensor, feats: Tensor, vals: Tensor, ctx: Tensor, label: Tensor, doc: Tensor) -> None:
        """Segment = maximal run of one document inside one context; its max per feature is binned
        under the document's label (``topic_auroc@1``, see ``pipeline.interpret.topics``)."""
        from pipeline.interpret.bins import N_BINS

        d = self.d
        seg_key = ctx * (1 << 32) + doc  # [N]
        _, seg = torch.unique_consecutive(seg_key, return_inverse=True)  # [N] segment of each row
        S = int(seg.max()) + 1 if len(seg) else 0
        seg_label = torch.full((S,), -1, dtype=torch.int64).scatter_(0, seg, label)  # [S]
        smax = torch.zeros(S * d).scatter_reduce_(0, seg[rows] * d + feats, vals, "amax")
        idx = smax.nonzero().squeeze(1)
        s, j, v = idx // d, idx % d, smax[idx]
        lab = seg_label[s]
        keep = lab >= 0
        flat = (j[keep] * self.L + lab[keep]) * N_BINS + log_bin(v[keep])
        self.topic.index_add_(0, flat, torch.ones_like(flat))
        self.n_seg += torch.bincount(seg_label[seg_label >= 0], minlength=self.L)

    def _add_cooc(self, N: int, rows: Tensor, feats: Tensor, vals: Tensor) -> None:
        """Count unordered pairs among each token's ``m`` strongest active features."""
        d, m = self.d, self.m
        counts = torch.bincount(rows, minlength=N)
        if len(counts) and int(counts.max()) > m:  # keep the m largest per row: sort by (row, -value)
            order = vals.argsort(descending=True, stable=True)
            order = order[rows[order].argsort(stable=True)]
            rows, feats = rows[order], feats[order]
        start = torch.cumsum(counts, 0) - counts  # [N] first entry of each row
        rank = torch.arange(len(rows)) - start[rows]
        keep = rank < m
        P = torch.full((N, m), -1, dtype=torch.int64)
        P[rows[keep], rank[keep]] = feats[keep]  # [N, m] active features per token, -1 padded
        ia, ib = torch.triu_indices(m, m, 1)  # the m(m-1)/2 slot pairs
        A, B = P[:, ia], P[:, ib]  # [N, m(m-1)/2]
        valid = (A >= 0) & (B >= 0)
        A, B = A[valid], B[valid]
        key = torch.minimum(A, B) * d + torch.maximum(A, B)  # upper triangle; symmetrised in finish()
        if d * d <= 1 << 22:  # small matrix: a bincount is cheaper than scattered atomic adds
            self.cooc += torch.bincount(key, minlength=d * d).to(torch.int32)  # type: ignore[operator]
        else:
            self.cooc.index_add_(0, key, torch.ones_like(key, dtype=torch.int32))  # type: ignore[union-attr]

    def finish(self) -> FeatureStats:
        from pipeline.interpret.bins import N_BINS

        d = self.d
        self._merge()
        cooc = None
        if self.cooc is not None:
            c = self.cooc.view(d, d)
            cooc = (c + c.T).numpy()
        res_v = torch.where(self.res_k < 2.0, self.res_v, torch.zeros_like(self.res_v))
        res_c = torch.where(self.res_k < 2.0, self.res_c, torch.full_like(self.res_c, -1))
        top_c = torch.where(self.top_v > 0, self.top_c, torch.full_like(self.top_c, -1))
        cat = (lambda xs, dt: np.concatenate(xs).astype(dt) if xs else np.zeros(0, dt))  # noqa: E731
        codes = SparseCodes(cat([c[0] for c in self._codes], np.int32), cat([c[1] for c in self._codes], np.int32),
                            cat([c[2] for c in self._codes], np.float32), cat([r[0] for r in self._rows], np.int64),
                            cat([r[1] for r in self._rows], np.int64))
        return FeatureStats(
            n_tokens=self.n_tokens, fire_count=self.fire.numpy(), act_sum=self.sum.numpy(), act_max=self.max.numpy(),
            hist=self.hist.view(d, N_BINS).numpy(), top_value=self.top_v.numpy(), top_ctx=top_c.numpy(),
            res_value=res_v.numpy(), res_ctx=res_c.numpy(),
            topic_hist=self.topic.view(d, max(self.L, 1), N_BINS).numpy()[:, : self.L],
            n_segments=self.n_seg.numpy()[: self.L], cooc=cooc, codes=codes,
        )
