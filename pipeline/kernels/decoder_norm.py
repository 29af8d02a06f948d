"""Triton kernels for the unit-norm decoder constraint (topk, batchtopk, relu_l1 2023 recipe), one pass per row.

SAEs whose decoder rows live on the unit sphere do two things to ``W_dec [d_sae, d_in]`` every step
(Towards Monosemanticity, 2023; Gao et al. 2024, *Scaling and evaluating sparse autoencoders*, "Preventing dead
latents"): before the optimizer step they remove the radial part of the gradient, ``G -= <G_r, W_r> W_r``, and
after it they rescale each row to unit norm. In PyTorch each is several full passes over ``[d_sae, d_in]`` with
``[d_sae, d_in]`` temporaries (``G*W``, ``along*W``; ``norm``, ``div``). Here one program owns a block of rows:

* :func:`project_out_parallel_` — ``G[r] -= (Σ_d G[r,d]·W[r,d]) · W[r]`` in place on ``G``.
* :func:`normalize_rows_triton_` — ``W[r] /= max(||W[r]||, eps)`` in place on ``W``.

When a row fits in one block (``d_in <= BLOCK_D``, the common case) it is loaded once, reduced and written back
from registers; wider rows loop over ``d_in`` twice (reduce, then update) and the second pass hits L2. Loads accept
any float dtype, the reduction is in fp32 in a fixed order (so repeated runs give the same bits), stores use the
tensor's dtype. Rows and columns are addressed by stride, so views need no copy. On CPU the kernels run under
``TRITON_INTERPRET=1`` (which must be set before this module is imported) — that is how the tests check them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from pipeline.errors import UserError

# Block sizes: fixed, GPU-reasonable choices (not yet tuned on a card; see benchmarks/README.md, "Open").
BLOCK_D = 4096  # widest row handled in one block; d_in up to 4096 is loaded once
MAX_TILE = 4096  # elements of one [BLOCK_R, BLOCK_D] register tile per tensor


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _blocks(D: int, block_d: int | None) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_D) for rows of length ``D``: the whole row if it fits, several short rows per program."""
    bd = min(_next_pow2(D), _next_pow2(block_d or BLOCK_D))
    return max(1, MAX_TILE // bd), bd


@triton.jit
def _project_out_kernel(
    w_ptr, g_ptr, R, D,
    stride_wr, stride_wc, stride_gr, stride_gc,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, ONE_BLOCK: tl.constexpr,
):
    # one program per BLOCK_R rows: G[r] -= <G[r], W[r]> W[r], with the dot product in fp32
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # [BLOCK_R]
    rmask = rows < R
    w_row = w_ptr + rows.to(tl.int64)[:, None] * stride_wr  # int64: d_sae * d_in can pass 2**31
    g_row = g_ptr + rows.to(tl.int64)[:, None] * stride_gr
    if ONE_BLOCK:  # the whole row is in registers: one read, one write
        cols = tl.arange(0, BLOCK_D)
        mask = rmask[:, None] & (cols < D)[None, :]
        w = tl.load(w_row + cols[None, :] * stride_wc, mask=mask, other=0.0).to(tl.float32)  # [BLOCK_R, BLOCK_D]
        g = tl.load(g_row + cols[None, :] * stride_gc, mask=mask, other=0.0).to(tl.float32)
        along = tl.sum(g * w, axis=1)  # [BLOCK_R]
        g = g - along[:, None] * w
        tl.store(g_row + cols[None, :] * stride_gc, g.to(g_ptr.dtype.element_ty), mask=mask)
    else:
        acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            mask = rmask[:, None] & (cols < D)[None, :]
            w = tl.load(w_row + cols[None, :] * stride_wc, mask=mask, other=0.0).to(tl.float32)
            g = tl.load(g_row + cols[None, :] * stride_gc, mask=mask, other=0.0).to(tl.float32)
            acc += g * w
        along = tl.sum(acc, axis=1)  # [BLOCK_R]
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            mask = rmask[:, None] & (cols < D)[None, :]
            w = tl.load(w_row + cols[None, :] * stride_wc, mask=mask, other=0.0).to(tl.float32)
            g = tl.load(g_row + cols[None, :] * stride_gc, mask=mask, other=0.0).to(tl.float32)
            g = g - along[:, None] * w
            tl.store(g_row + cols[None, :] * stride_gc, g.to(g_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _normalize_rows_kernel(
    w_ptr, R, D, stride_wr, stride_wc, eps,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, ONE_BLOCK: tl.constexpr,
):
    # one program per BLOCK_R rows: W[r] /= max(||W[r]||, eps), the sum of squares in fp32
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < R
    w_row = w_ptr + rows.to(tl.int64)[:, None] * stride_wr
    if ONE_BLOCK:
        cols = tl.arange(0, BLOCK_D)
        mask = rmask[:, None] & (cols < D)[None, :]
        w = tl.load(w_row + cols[None, :] * stride_wc, mask=mask, other=0.0).to(tl.float32)
        norm = tl.maximum(tl.sqrt(tl.sum(w * w, axis=1)), eps)  # [BLOCK_R]; a zero row stays zero
        tl.store(w_row + cols[None, :] * stride_wc, (w / norm[:, None]).to(w_ptr.dtype.element_ty), mask=mask)
    else:
        acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            mask = rmask[:, None] & (cols < D)[None, :]
            w = tl.load(w_row + cols[None, :] * stride_wc, mask=mask, other=0.0).to(tl.float32)
            acc += w * w
        norm = tl.maximum(tl.sqrt(tl.sum(acc, axis=1)), eps)
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            mask = rmask[:, None] & (cols < D)[None, :]
            w = tl.load(w_row + cols[None, :] * stride_wc, mask=mask, other=0.0).to(tl.float32)
            tl.store(w_row + cols[None, :] * stride_wc, (w / norm[:, None]).to(w_ptr.dtype.element_ty), mask=mask)


def _check(W: Tensor, kernel: object) -> None:
    if W.dim() != 2:
        raise UserError(f"decoder-norm kernels need a 2-D [d_sae, d_in] tensor, got shape {tuple(W.shape)}")
    if not W.is_floating_point():
        raise UserError(f"decoder-norm kernels need a float tensor, got {W.dtype}")
    if W.device.type == "cpu" and type(kernel).__name__ != "InterpretedFunction":
        raise UserError("pipeline.kernels.decoder_norm was imported without TRITON_INTERPRET=1 (CPU needs it)")


def _bump_version(t: Tensor) -> None:
    # The kernel writes through a raw pointer; tell autograd the tensor changed, as an in-place torch op would,
    # so a stale saved tensor is still caught.
    torch.autograd.graph.increment_version(t)


@torch.no_grad()
def project_out_parallel_(W: Tensor, G: Tensor, block_d: int | None = None) -> None:
    """``G[r] -= <G[r], W[r]> · W[r]`` for each row of ``W, G [d_sae, d_in]`` (any strides), in place on ``G``.

    :param block_d: widest block of a row loaded at once (default :data:`BLOCK_D`; smaller only to test the loop)
    """
    _check(W, _project_out_kernel)
    if G.shape != W.shape or G.device != W.device:
        raise UserError(f"gradient {tuple(G.shape)} on {G.device} does not match weight {tuple(W.shape)} on {W.device}")
    R, D = W.shape
    if R == 0 or D == 0:
        return
    block_r, bd = _blocks(D, block_d)
    _project_out_kernel[(triton.cdiv(R, block_r),)](
        W, G, R, D, W.stride(0), W.stride(1), G.stride(0), G.stride(1),
        BLOCK_R=block_r, BLOCK_D=bd, ONE_BLOCK=D <= bd,
    )
    _bump_version(G)


@torch.no_grad()
def normalize_rows_triton_(W: Tensor, eps: float, block_d: int | None = None) -> None:
    """``W[r] /= max(||W[r]||_2, eps)`` for each row of ``W [d_sae, d_in]`` (any strides), in place.

    :param block_d: widest block of a row loaded at once (default :data:`BLOCK_D`; smaller only to test the loop)
    """
    _check(W, _normalize_rows_kernel)
    R, D = W.shape
    if R == 0 or D == 0:
        return
    block_r, bd = _blocks(D, block_d)
    _normalize_rows_kernel[(triton.cdiv(R, block_r),)](
        W, R, D, W.stride(0), W.stride(1), float(eps),
        BLOCK_R=block_r, BLOCK_D=bd, ONE_BLOCK=D <= bd,
    )
    _bump_version(W)
