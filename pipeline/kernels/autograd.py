"""Autograd functions of the kernel path: a TopK encoder with a sparse backward and a sparse decoder.

Both backward passes touch only the k selected latents per token (Gao et al. 2024, *Scaling and evaluating
sparse autoencoders*, section on efficient training / sparse kernels: the encoder's gradient is as sparse as the code, because
the TopK derivative is zero for every latent that was not selected). Only the encoder *forward* is dense: all
``d_sae`` pre-activations must be computed to find the k largest. That forward is done in latent chunks with a
running top-k merge, so the full ``[N, d_sae]`` pre-activation is never held (only one ``[N, chunk]`` slice in
the compute dtype — bf16 on GPU — with fp32 accumulation inside the matmul), or, with ``fused=True``, in one
Triton kernel that keeps a running top-k per token in registers and never writes pre-activations at all.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx

from pipeline.kernels import triton_sparse as ts
from pipeline.kernels.reference import chunked_topk, chunked_topk_multi


class TopKEncode(torch.autograd.Function):
    """``(top_idx [N, k], top_val [N, k]) = ReLU(TopK((x - b_pre) @ W_enc + b_enc))`` with a sparse backward.

    The centering by ``b_pre`` (the decoder bias, Gao et al. 2024 eq. 1) happens inside, so that its gradient can
    be taken without the input gradient: ``dL/db_pre = -Σ_n dL/dxin[n] = -W_enc @ dL/db_enc`` (one mat-vec),
    whereas ``dL/dx`` needs a gather of encoder *columns* (strided, slow on GPU) and is computed only when ``x``
    itself requires grad (never in SAE training).
    """

    @staticmethod
    def forward(
        ctx: FunctionCtx, x: Tensor, W_enc: Tensor, b_enc: Tensor, b_pre: Tensor | None, k: int, chunk: int | None,
        fused: bool,
    ) -> tuple[Tensor, Tensor]:
        xin = (x if b_pre is None else x - b_pre).to(W_enc.dtype)  # [N, d] centred, in the compute dtype
        if fused:
            top_val, top_idx = ts.fused_topk(xin, W_enc, b_enc, k)
            top_val = top_val.to(xin.dtype)
        else:
            top_val, top_idx = chunked_topk(xin, W_enc, b_enc, k, chunk)
        top_val = top_val.relu()
        ctx.save_for_backward(xin, W_enc, top_idx, top_val)
        ctx.mark_non_differentiable(top_idx)
        ctx.dtypes = (x.dtype, b_enc.dtype, None if b_pre is None else b_pre.dtype)  # type: ignore[attr-defined]
        return top_idx, top_val

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: FunctionCtx, _grad_idx: Tensor | None, grad_val: Tensor
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None, None, None, None]:
        xin, W_enc, top_idx, top_val = ctx.saved_tensors  # type: ignore[attr-defined]
        return (*_encoder_backward(ctx, xin, W_enc, top_idx, top_val, grad_val), None, None, None)


def _encoder_backward(ctx: FunctionCtx, xin: Tensor, W_enc: Tensor, top_idx: Tensor, top_val: Tensor,
                      grad_val: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """Gradients ``(x, W_enc, b_enc, b_pre)`` of a sparse code ``top_idx/top_val [N, k]`` taken from ``xin @ W_enc``.

    A latent may occur twice in a row (TopK and AuxK codes concatenated): the segment sums add both terms.
    """
    x_dtype, b_dtype, pre_dtype = ctx.dtypes  # type: ignore[attr-defined]
    g = torch.where(top_val > 0, grad_val.float(), 0.0)  # [N, k] ReLU'(·) · dL/dval, fp32
    need_x, need_w, need_b, need_pre = ctx.needs_input_grad[:4]  # type: ignore[attr-defined]
    grad_x = grad_W = grad_b = grad_pre = None
    if need_x:
        # dL/dx[n] = Σ_s g[n,s] · W_enc[:, idx[n,s]]: a sparse decode through W_enc.T (a view, no copy)
        grad_x = ts.gather_rows(top_idx, g, W_enc.t(), None, x_dtype)
    if need_w or need_b or need_pre:
        # dL/dW_enc[:, j] = Σ_{(n,s): idx=j} g[n,s] · xin[n]: one segment sum per latent, written as rows of a
        # contiguous [d_sae, d] buffer (coalesced stores) and handed back as its transpose [d, d_sae]
        grad_Wt = torch.empty(W_enc.shape[1], W_enc.shape[0], dtype=W_enc.dtype, device=W_enc.device)
        sums = ts.segment_outer(ts.build_csc(top_idx, W_enc.shape[1]), g, xin, grad_Wt, want_sum=True)
        assert sums is not None  # [d_sae] fp32: Σ g per latent = dL/db_enc
        grad_W = grad_Wt.t() if need_w else None
        grad_b = sums.to(b_dtype) if need_b else None
        if need_pre:
            grad_pre = -torch.mv(W_enc, sums.to(W_enc.dtype)).to(pre_dtype)  # [d]
    return grad_x, grad_W, grad_b, grad_pre


class TopKEncodeAux(torch.autograd.Function):
    """:class:`TopKEncode` plus the AuxK code (Gao et al. 2024, AuxK appendix) from the same encoder matmul.

    ``aux_bias [d_sae]`` is added to the pre-activations for the second selection only (0 for dead latents, a large
    negative number for live ones), which picks the top ``k_aux`` dead latents per token. Returns
    ``(top_idx [N, k], top_val [N, k], aux_idx [N, k_aux], aux_val [N, k_aux])``, values after ReLU; the backward
    runs once over both codes concatenated, so AuxK costs no second dense matmul in either direction.
    """

    @staticmethod
    def forward(
        ctx: FunctionCtx, x: Tensor, W_enc: Tensor, b_enc: Tensor, b_pre: Tensor | None, k: int, chunk: int | None,
        aux_bias: Tensor, k_aux: int,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        xin = (x if b_pre is None else x - b_pre).to(W_enc.dtype)  # [N, d]
        (top_val, top_idx), (aux_val, aux_idx) = chunked_topk_multi(
            xin, W_enc, b_enc, [(None, k), (aux_bias.to(W_enc.dtype), k_aux)], chunk)
        top_val, aux_val = top_val.relu(), aux_val.relu()
        ctx.save_for_backward(xin, W_enc, torch.cat([top_idx, aux_idx], 1), torch.cat([top_val, aux_val], 1))
        ctx.mark_non_differentiable(top_idx, aux_idx)
        ctx.k = k  # type: ignore[attr-defined]
        ctx.dtypes = (x.dtype, b_enc.dtype, None if b_pre is None else b_pre.dtype)  # type: ignore[attr-defined]
        return top_idx, top_val, aux_idx, aux_val

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: FunctionCtx, _gi: Tensor | None, grad_val: Tensor | None, _ga: Tensor | None, grad_aux: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        xin, W_enc, idx, val = ctx.saved_tensors  # type: ignore[attr-defined]
        k = ctx.k  # type: ignore[attr-defined]
        gv = torch.zeros_like(val[:, :k]) if grad_val is None else grad_val
        ga = torch.zeros_like(val[:, k:]) if grad_aux is None else grad_aux
        grads = _encoder_backward(ctx, xin, W_enc, idx, val, torch.cat([gv.to(val.dtype), ga.to(val.dtype)], 1))
        return (*grads, None, None, None, None)


class SparseDecode(torch.autograd.Function):
    """``x_hat [N, d] (fp32) = b_dec + Σ_s top_val[n,s] · W_dec[top_idx[n,s]]``."""

    @staticmethod
    def forward(ctx: FunctionCtx, top_idx: Tensor, top_val: Tensor, W_dec: Tensor, b_dec: Tensor) -> Tensor:
        ctx.save_for_backward(top_idx, top_val, W_dec)
        ctx.b_dec_dtype = b_dec.dtype  # type: ignore[attr-defined]
        return ts.gather_rows(top_idx, top_val, W_dec, b_dec, torch.float32)

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: FunctionCtx, grad_out: Tensor
    ) -> tuple[None, Tensor | None, Tensor | None, Tensor | None]:
        top_idx, top_val, W_dec = ctx.saved_tensors  # type: ignore[attr-defined]
        _, need_val, need_w, need_b = ctx.needs_input_grad  # type: ignore[attr-defined]
        grad_out = grad_out.contiguous()  # [N, d]
        grad_val = ts.gather_dot(top_idx, grad_out, W_dec, top_val.dtype) if need_val else None
        grad_W = None
        if need_w:
            grad_W = torch.empty_like(W_dec)  # [d_sae, d]; rows of dead latents come out exactly 0
            ts.segment_outer(ts.build_csc(top_idx, W_dec.shape[0]), top_val, grad_out, grad_W)
        grad_b = grad_out.sum(0).to(ctx.b_dec_dtype) if need_b else None  # type: ignore[attr-defined]
        return None, grad_val, grad_W, grad_b


def sparse_decode(top_idx: Tensor, top_val: Tensor, W_dec: Tensor, b_dec: Tensor) -> Tensor:
    """Sparse decoder with Triton forward and backward.

    :param top_idx: ``[N, k]`` int64 latent ids
    :param top_val: ``[N, k]`` activations (0 = inactive slot)
    :param W_dec: ``[d_sae, d]``; ``b_dec``: ``[d]``
    :returns: ``x_hat [N, d]`` float32 (fp32 accumulation)
    """
    return SparseDecode.apply(top_idx, top_val, W_dec, b_dec)


def topk_encode(
    x: Tensor, W_enc: Tensor, b_enc: Tensor, k: int, chunk: int | None = None, fused: bool = False,
    b_pre: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """TopK encoder with sparse (Triton) backward. Shapes as in :class:`TopKEncode`; ``b_pre [d]`` or None.

    ``fused=True`` selects with :func:`pipeline.kernels.triton_sparse.fused_topk` (matmul and running top-k in
    one kernel); otherwise the matmul is cuBLAS's, ``chunk`` latents at a time, and the top-k torch's.
    """
    return TopKEncode.apply(x, W_enc, b_enc, b_pre, k, chunk, fused)


def topk_encode_aux(
    x: Tensor, W_enc: Tensor, b_enc: Tensor, k: int, aux_bias: Tensor, k_aux: int, chunk: int | None = None,
    b_pre: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """TopK code and AuxK code from one encoder pass; see :class:`TopKEncodeAux`."""
    return TopKEncodeAux.apply(x, W_enc, b_enc, b_pre, k, chunk, aux_bias, k_aux)
