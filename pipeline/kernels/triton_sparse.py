"""Triton kernels for the sparse half of a TopK SAE step (k non-zeros per token).

The idea is Gao et al. 2024 (*Scaling and evaluating sparse autoencoders*, section on efficient training: sparse
kernels): once the top-k latents of each token are known, the decoder forward, the decoder backward and
the encoder backward only touch k rows per token, so they cost O(N·k·d) instead of O(N·d_sae·d). Three kernels:

* :func:`gather_rows` — ``out[n] = bias + Σ_s val[n,s] · W[idx[n,s]]`` (decoder forward; with ``W = W_enc.T``
  it is also the encoder's input gradient).
* :func:`gather_dot` — ``out[n,s] = <G[n], W[idx[n,s]]>`` (gradient of the code values).
* :func:`segment_outer` — ``out[j] = Σ_{(n,s): idx[n,s]=j} coef[n,s] · G[n]`` (gradient of the decoder rows and,
  with ``G = x``, of the encoder columns), computed from the code sorted by latent (a CSC layout).

Why CSC instead of atomics for the weight gradients: with ``atomic_add`` every non-zero scatters ``d`` floats
into the gradient, hot latents contend, and fp32 atomics make the summation order (hence the bits) vary between
runs — the project requires seeded runs to be repeatable. Sorting the ``N·k`` latent ids (131k int64 at batch
4,096, k=32: negligible next to the matmuls) gives each latent a contiguous segment; one program per
(latent, d-block) sums its segment in registers and writes the row once. Dead latents get an exact zero row.

All kernels load any float dtype, accumulate in fp32 and store in the output tensor's dtype. Weights are
addressed through explicit strides, so transposed views (``W_enc.T``) need no copy. On CPU they run under
``TRITON_INTERPRET=1`` (which must be set before this module is imported) — that is how the tests check them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

# Block sizes: fixed, GPU-reasonable choices (not yet tuned on a card; see benchmarks/README.md, "Open").
BLOCK_D = 128
BLOCK_E = 32
MAX_TILE = 4096  # elements of one [BLOCK_K, BLOCK_D] register tile: k=64 at 128 wide needed 255 registers (sm_90)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _blocks(K: int) -> tuple[int, int]:
    """(BLOCK_K, BLOCK_D) for a gather over K slots: all slots in one tile, d narrowed so the tile stays small."""
    block_k = _next_pow2(K)
    return block_k, max(16, min(BLOCK_D, MAX_TILE // block_k))


@triton.jit
def _gather_rows_kernel(
    idx_ptr, val_ptr, w_ptr, bias_ptr, out_ptr,
    K, D, stride_wr, stride_wc,
    HAS_BIAS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # one program per (token n, block of d): out[n, dblk] = bias + Σ_s val[n,s] · W[idx[n,s], dblk]
    n = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)  # [BLOCK_D]
    slots = tl.arange(0, BLOCK_K)  # [BLOCK_K]
    smask = slots < K
    cmask = cols < D
    idx = tl.load(idx_ptr + n * K + slots, mask=smask, other=0)  # [BLOCK_K] latent ids
    val = tl.load(val_ptr + n * K + slots, mask=smask, other=0.0).to(tl.float32)
    w = tl.load(
        w_ptr + idx[:, None] * stride_wr + cols[None, :] * stride_wc,
        mask=smask[:, None] & cmask[None, :], other=0.0,
    ).to(tl.float32)  # [BLOCK_K, BLOCK_D] gathered rows
    acc = tl.sum(val[:, None] * w, axis=0)  # [BLOCK_D] fp32
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    tl.store(out_ptr + n * D + cols, acc.to(out_ptr.dtype.element_ty), mask=cmask)


@triton.jit
def _gather_dot_kernel(
    idx_ptr, g_ptr, w_ptr, out_ptr,
    K, D, stride_wr, stride_wc,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # one program per token n: out[n, s] = Σ_d G[n, d] · W[idx[n,s], d], looping over d in blocks
    n = tl.program_id(0)
    slots = tl.arange(0, BLOCK_K)
    smask = slots < K
    idx = tl.load(idx_ptr + n * K + slots, mask=smask, other=0)  # [BLOCK_K]
    acc = tl.zeros([BLOCK_K], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        cmask = cols < D
        g = tl.load(g_ptr + n * D + cols, mask=cmask, other=0.0).to(tl.float32)  # [BLOCK_D]
        w = tl.load(
            w_ptr + idx[:, None] * stride_wr + cols[None, :] * stride_wc,
            mask=smask[:, None] & cmask[None, :], other=0.0,
        ).to(tl.float32)  # [BLOCK_K, BLOCK_D]
        acc += tl.sum(w * g[None, :], axis=1)
    tl.store(out_ptr + n * K + slots, acc.to(out_ptr.dtype.element_ty), mask=smask)


@triton.jit
def _segment_outer_kernel(
    offsets_ptr, rows_ptr, coef_ptr, g_ptr, out_ptr, sum_ptr,
    D, stride_or, stride_oc,
    HAS_SUM: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # one program per (latent j, block of d): out[j, dblk] = Σ_{e in segment j} coef[e] · G[rows[e], dblk]
    j = tl.program_id(0)
    pid_d = tl.program_id(1)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < D
    start = tl.load(offsets_ptr + j)
    end = tl.load(offsets_ptr + j + 1)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    csum = tl.zeros([BLOCK_E], dtype=tl.float32)
    for e0 in range(start, end, BLOCK_E):
        e = e0 + tl.arange(0, BLOCK_E)
        emask = e < end
        rows = tl.load(rows_ptr + e, mask=emask, other=0)  # [BLOCK_E] token ids
        coef = tl.load(coef_ptr + e, mask=emask, other=0.0).to(tl.float32)
        g = tl.load(
            g_ptr + rows[:, None] * D + cols[None, :], mask=emask[:, None] & cmask[None, :], other=0.0
        ).to(tl.float32)  # [BLOCK_E, BLOCK_D]
        acc += tl.sum(coef[:, None] * g, axis=0)
        csum += coef
    tl.store(out_ptr + j * stride_or + cols * stride_oc, acc.to(out_ptr.dtype.element_ty), mask=cmask)
    if HAS_SUM:
        if pid_d == 0:  # Σ coef per latent: the bias gradient, deterministic like the rest
            tl.store(sum_ptr + j, tl.sum(csum, axis=0).to(sum_ptr.dtype.element_ty))


def gather_rows(idx: Tensor, val: Tensor, W: Tensor, bias: Tensor | None, out_dtype: torch.dtype) -> Tensor:
    """``out [N, D] = bias + Σ_s val[n,s] · W[idx[n,s], :]`` for ``idx, val [N, K]``, ``W [R, D]`` (any strides)."""
    N, K = idx.shape
    D = W.shape[1]
    idx, val = idx.contiguous(), val.contiguous()
    out = torch.empty(N, D, dtype=out_dtype, device=val.device)
    if N == 0:
        return out
    block_k, block_d = _blocks(K)
    _gather_rows_kernel[(N, triton.cdiv(D, block_d))](
        idx, val, W, bias if bias is not None else val, out, K, D, W.stride(0), W.stride(1),
        HAS_BIAS=bias is not None, BLOCK_K=block_k, BLOCK_D=block_d,
    )
    return out


def gather_dot(idx: Tensor, G: Tensor, W: Tensor, out_dtype: torch.dtype) -> Tensor:
    """``out [N, K]`` with ``out[n,s] = <G[n], W[idx[n,s]]>`` for ``G [N, D]``, ``W [R, D]`` (any strides)."""
    N, K = idx.shape
    idx, G = idx.contiguous(), G.contiguous()
    out = torch.empty(N, K, dtype=out_dtype, device=G.device)
    if N == 0:
        return out
    block_k, block_d = _blocks(K)
    _gather_dot_kernel[(N,)](idx, G, W, out, K, G.shape[1], W.stride(0), W.stride(1), BLOCK_K=block_k, BLOCK_D=block_d)
    return out


def build_csc(idx: Tensor, n_latents: int) -> tuple[Tensor, Tensor, Tensor]:
    """Sort the sparse pattern by latent (the transpose of the ``[N, k]`` row layout).

    :param idx: ``[N, K]`` latent ids
    :returns: ``(offsets [n_latents+1] int64, rows [N*K] int64 token ids, perm [N*K] positions in idx.flatten())``
    """
    flat = idx.flatten()
    _, perm = torch.sort(flat, stable=True)  # stable: segment order (hence fp32 sums) is deterministic
    counts = torch.bincount(flat, minlength=n_latents)  # [n_latents]
    offsets = torch.zeros(n_latents + 1, dtype=torch.int64, device=idx.device)
    offsets[1:] = torch.cumsum(counts, 0)
    rows = torch.div(perm, idx.shape[1], rounding_mode="floor")
    return offsets, rows, perm


def segment_outer(
    csc: tuple[Tensor, Tensor, Tensor], coef: Tensor, G: Tensor, out: Tensor, want_sum: bool = False
) -> Tensor | None:
    """Fill ``out [n_latents, D]`` (any strides, e.g. a transposed view) with ``Σ coef[n,s] · G[n]`` per latent.

    :param csc: from :func:`build_csc` on the same ``idx``
    :param coef: ``[N, K]`` per-non-zero weights (code values, or gradients of them)
    :param G: ``[N, D]`` dense rows to accumulate
    :returns: ``Σ coef`` per latent ``[n_latents]`` fp32 when ``want_sum`` (a bias gradient), else None
    """
    offsets, rows, perm = csc
    n_latents, D = out.shape
    coef_sorted = coef.flatten()[perm].contiguous()
    G = G.contiguous()
    sums = torch.empty(n_latents, dtype=torch.float32, device=G.device) if want_sum else None
    grid = (n_latents, triton.cdiv(D, BLOCK_D))
    _segment_outer_kernel[grid](
        offsets, rows, coef_sorted, G, out, sums if sums is not None else coef_sorted,
        D, out.stride(0), out.stride(1), HAS_SUM=want_sum, BLOCK_E=BLOCK_E, BLOCK_D=BLOCK_D,
    )
    return sums


@triton.jit
def _fused_topk_kernel(
    x_ptr, w_ptr, b_ptr, val_ptr, idx_ptr,
    N, D, L, K, stride_xn, stride_xd, stride_wd, stride_wl,
    IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_DK: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # one program per block of BLOCK_M tokens: stream over latent tiles, keep a running top-K per row in registers
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < N
    slots = tl.arange(0, BLOCK_K)
    # padding slots (>= K) hold +inf so they are never the row minimum, hence never replaced or stored
    best_v = tl.where(slots[None, :] < K, float("-inf"), float("inf")) + tl.zeros([BLOCK_M, BLOCK_K], tl.float32)
    best_i = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.int64)
    for l0 in range(0, L, BLOCK_L):
        lcols = l0 + tl.arange(0, BLOCK_L)
        lmask = lcols < L
        acc = tl.zeros([BLOCK_M, BLOCK_L], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_DK):
            dk = d0 + tl.arange(0, BLOCK_DK)
            dmask = dk < D
            xt = tl.load(x_ptr + rows[:, None] * stride_xn + dk[None, :] * stride_xd,
                         mask=rmask[:, None] & dmask[None, :], other=0.0)  # [BLOCK_M, BLOCK_DK]
            wt = tl.load(w_ptr + dk[:, None] * stride_wd + lcols[None, :] * stride_wl,
                         mask=dmask[:, None] & lmask[None, :], other=0.0)  # [BLOCK_DK, BLOCK_L]
            if IEEE:
                acc = tl.dot(xt, wt, acc, input_precision="ieee")
            else:
                acc = tl.dot(xt, wt, acc)  # bf16 x bf16 -> fp32 accumulate
        acc += tl.load(b_ptr + lcols, mask=lmask, other=0.0).to(tl.float32)[None, :]
        acc = tl.where(rmask[:, None] & lmask[None, :], acc, float("-inf"))  # [BLOCK_M, BLOCK_L] pre-acts
        # merge: while some row has a tile value above its current K-th best, move that row's largest tile value
        # into the slot of its current minimum. After the first tiles few values qualify, so this loop is short.
        cur_min = tl.min(best_v, axis=1)  # [BLOCK_M]
        tile_max = tl.max(acc, axis=1)
        while tl.sum((tile_max > cur_min).to(tl.int32), axis=0) > 0:
            take = tile_max > cur_min  # [BLOCK_M]
            pos = tl.argmax(acc, axis=1)  # [BLOCK_M] column of tile_max
            slot = tl.min(tl.where(best_v == cur_min[:, None], slots[None, :], BLOCK_K), axis=1)
            repl = take[:, None] & (slots[None, :] == slot[:, None])  # [BLOCK_M, BLOCK_K]
            best_v = tl.where(repl, tile_max[:, None], best_v)
            best_i = tl.where(repl, (l0 + pos).to(tl.int64)[:, None], best_i)
            used = take[:, None] & (tl.arange(0, BLOCK_L)[None, :] == pos[:, None])
            acc = tl.where(used, float("-inf"), acc)
            cur_min = tl.min(best_v, axis=1)
            tile_max = tl.max(acc, axis=1)
    smask = rmask[:, None] & (slots[None, :] < K)
    tl.store(val_ptr + rows[:, None] * K + slots[None, :], best_v, mask=smask)
    tl.store(idx_ptr + rows[:, None] * K + slots[None, :], best_i, mask=smask)


def fused_topk(x: Tensor, W_enc: Tensor, b_enc: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """TopK of ``x @ W_enc + b_enc`` in one kernel; the ``[N, d_sae]`` pre-activation never leaves registers.

    :param x: ``[N, d]``; ``W_enc`` ``[d, d_sae]`` (any strides); ``b_enc`` ``[d_sae]``; bf16 or fp32
    :returns: ``(top_val [N, k] fp32, top_idx [N, k] int64)`` sorted descending per row
    """
    N, D = x.shape
    L = W_enc.shape[1]
    val = torch.empty(N, k, dtype=torch.float32, device=x.device)
    idx = torch.empty(N, k, dtype=torch.int64, device=x.device)
    block_m = 64 if N >= 64 else 16
    _fused_topk_kernel[(triton.cdiv(N, block_m),)](
        x, W_enc, b_enc, val, idx, N, D, L, k, x.stride(0), x.stride(1), W_enc.stride(0), W_enc.stride(1),
        IEEE=x.dtype == torch.float32, BLOCK_M=block_m, BLOCK_L=128, BLOCK_DK=32, BLOCK_K=max(16, _next_pow2(k)),
    )
    val, order = val.sort(dim=-1, descending=True)  # [N, k]: same slot order as the chunked path
    return val, idx.gather(1, order)
