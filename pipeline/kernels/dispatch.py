"""Backend choice for the TopK / BatchTopK SAE forward: Triton kernels on CUDA, plain PyTorch elsewhere."""

from __future__ import annotations

import importlib.util
import os
import sys
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from pipeline.errors import UserError
from pipeline.kernels.reference import batch_threshold, batchtopk_width, topk_sae_forward_torch

Backend = Literal["auto", "triton", "torch"]


class SparseCode(NamedTuple):
    """Result of :func:`topk_sae_forward`."""

    x_hat: Tensor  # [N, d] float32
    top_idx: Tensor  # [N, k'] int64 (k' = k for topk, k_max for batchtopk)
    top_val: Tensor  # [N, k'] activations in the compute dtype, 0 for inactive slots


def triton_status(device: torch.device | str) -> tuple[bool, str]:
    """Whether the Triton kernels can run on ``device``, and if not, why (one line)."""
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed (pip install 'sae-pipeline[gpu]' or 'triton>=3.0')"
    dev = torch.device(device)
    if dev.type == "cuda":
        return (True, "") if torch.cuda.is_available() else (False, "CUDA is not available")
    if dev.type == "cpu":
        # The interpreter is chosen when the @triton.jit decorators run, i.e. when triton_sparse is imported.
        if "pipeline.kernels.triton_sparse" not in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            return False, "Triton on CPU needs TRITON_INTERPRET=1 set before the kernels are imported"
        from pipeline.kernels import triton_sparse

        if type(triton_sparse._gather_rows_kernel).__name__ != "InterpretedFunction":
            return False, "pipeline.kernels.triton_sparse was imported without TRITON_INTERPRET=1 (CPU needs it)"
        return True, ""
    return False, f"no Triton backend for device type {dev.type!r}"


def resolve_backend(backend: Backend, device: torch.device | str) -> Literal["triton", "torch"]:
    """``auto`` → ``triton`` on CUDA when Triton is usable, else ``torch`` (the interpreter is for tests only)."""
    if backend == "torch":
        return "torch"
    ok, why = triton_status(device)
    if backend == "triton":
        if not ok:
            raise UserError(f"kernel backend 'triton' unavailable: {why}")
        return "triton"
    if backend != "auto":
        raise UserError(f"kernel backend must be 'auto', 'triton' or 'torch', not {backend!r}")
    return "triton" if ok and torch.device(device).type == "cuda" else "torch"


def topk_sae_forward(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    W_dec: Tensor,
    b_dec: Tensor,
    k: int,
    backend: Backend = "auto",
    arch: Literal["topk", "batchtopk"] = "topk",
    pre_bias: bool = True,
    compute_dtype: torch.dtype | None = None,
    chunk: int | None = None,
    k_max: int | None = None,
    fused_encoder: bool = False,
) -> SparseCode:
    """Forward of a TopK (Gao et al. 2024) or BatchTopK (Bussmann et al. 2024) SAE, differentiable.

    :param x: ``[N, d]`` inputs; ``W_enc [d, d_sae]``, ``b_enc [d_sae]``, ``W_dec [d_sae, d]``, ``b_dec [d]``
        (fp32 master weights; gradients come back in their dtype)
    :param compute_dtype: dtype of the matmuls and gathers (``torch.bfloat16`` on GPU; accumulation is fp32)
    :param chunk: latents per encoder chunk (triton backend): the ``[N, d_sae]`` pre-activation is never
        held whole, only ``[N, chunk]`` of it in the compute dtype. None: one chunk.
    :param fused_encoder: triton backend: select the top k inside one matmul kernel
        (:func:`pipeline.kernels.triton_sparse.fused_topk`) instead of cuBLAS + ``torch.topk``; off by default
        until it is measured faster on a GPU (benchmarks/README.md)
    :param k_max: batchtopk only: width of the per-row code (default ``4*k``; see
        :func:`pipeline.kernels.reference.batchtopk_encode_torch`)
    :returns: :class:`SparseCode` with ``x_hat`` in float32
    """
    if arch not in ("topk", "batchtopk"):
        raise UserError(f"kernels support arch 'topk' and 'batchtopk', not {arch!r}")
    d_sae = W_enc.shape[1]
    if not 1 <= k <= d_sae:
        raise UserError(f"k={k} must be between 1 and d_sae={d_sae}")
    if resolve_backend(backend, x.device) == "torch":
        return SparseCode(*topk_sae_forward_torch(x, W_enc, b_enc, W_dec, b_dec, k, arch, pre_bias, compute_dtype, k_max))

    from pipeline.kernels.autograd import sparse_decode, topk_encode

    dt = compute_dtype or x.dtype
    We, be, Wd = W_enc.to(dt), b_enc.to(dt), W_dec.to(dt)  # differentiable casts: fp32 grads reach the masters
    b_pre = b_dec if pre_bias else None  # centering happens inside the encoder (cheap b_dec gradient)
    if arch == "topk":
        top_idx, top_val = topk_encode(x, We, be, k, chunk, fused_encoder, b_pre)
    else:
        k_cand = batchtopk_width(k, d_sae, k_max)
        top_idx, cand_val = topk_encode(x, We, be, k_cand, chunk, fused_encoder, b_pre)  # per-row candidates
        top_val = batch_threshold(cand_val, x.shape[0] * k)
    x_hat = sparse_decode(top_idx, top_val, Wd, b_dec)
    return SparseCode(x_hat, top_idx, top_val)
