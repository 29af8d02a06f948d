"""The TopK / BatchTopK SAE training step through the sparse kernels (``train.kernels: triton`` or ``sparse``).

The same loss as ``TopKSAE``'s dense step (:meth:`pipeline.sae.base.SAE.training_loss` with TopK's encode and
AuxK term), computed as in Gao et al. 2024 ("efficient training"): the encoder's top-k (and AuxK's, from the same
matmul) is taken chunk by chunk, the decoder forward and both backward passes touch only the non-zeros, and the
dense ``[B, d_sae]`` latents are never built. Matmuls run in the autocast dtype (bf16 on GPU) with fp32
accumulation; the fp32 master weights receive fp32 gradients. An architecture on these kernels chooses its
selection through ``_sparse_width`` / ``_sparse_keep`` (BatchTopK: a batch-wide top B·k).

``sparse_cpu_training_loss`` is the same step in plain PyTorch for the CPU (:mod:`pipeline.kernels.cpu_sparse`):
the dead latents are counted on the host there (a sync costs nothing), so AuxK selects among them only.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from pipeline.kernels.cpu_sparse import serial, sparse_decode_cpu, topk_encode_cpu
from pipeline.sae import ops
from pipeline.sae.base import LossOutput, code_firing

__all__ = ["sparse_topk_training_loss", "sparse_cpu_training_loss"]


def sparse_topk_training_loss(sae: Any, x: Tensor, dead_before: Tensor) -> LossOutput:
    """``sae`` (a ``TopKSAE``) on raw ``x [B, d_in]``; ``dead_before [d_sae]`` bool: the latents dead as the step
    began (AuxK's candidates). Returns the loss with the sparse code ``(idx, val) [B, width]`` instead of latents."""
    from pipeline.kernels.autograd import sparse_decode, topk_encode_aux  # needs Triton: imported on use

    dev = x.device.type
    cdt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else sae.dtype
    with torch.autocast(dev, enabled=False):  # the kernels cast explicitly; autocast would recast their inputs
        xs = sae.scale_in(x)  # [B, d_in]
        # -1e30 rather than -inf pushes live latents out of the AuxK selection: one that is still picked (fewer
        # dead than k_aux) has value ReLU(-1e30) = 0 and gradient 0, where -inf would make 0 * inf = NaN.
        push_out = torch.where(dead_before, 0.0, -1e30).to(sae.b_enc.dtype)
        idx, val, aux_idx, aux_val = topk_encode_aux(
            xs, sae.W_enc.to(cdt), sae.b_enc.to(cdt), sae._sparse_width(), push_out, sae.k_aux,
            b_pre=sae.b_dec if sae.apply_b_dec else None)
        val = sae._sparse_keep(val)
        W_dec = sae.W_dec.to(cdt)  # one cast, shared by both decodes (its gradient reaches the fp32 master)
        xs_hat = sparse_decode(idx, val, W_dec, sae.b_dec)  # [B, d_in] float32
        recon = sae._recon_loss(xs, xs_hat)
        _, l0 = code_firing(idx, val, sae.cfg.d_sae)
        sae._on_train_latents(val.detach())
        aux_val = torch.where(dead_before[aux_idx], aux_val, torch.zeros_like(aux_val))
        e_hat = sparse_decode(aux_idx, aux_val, W_dec, torch.zeros_like(sae.b_dec))  # float32
        aux = ops.normalized_mse(e_hat, (xs - xs_hat).detach()) * dead_before.any().float()  # as auxk_loss
        loss = recon + sae.aux_weight(xs) * aux
    terms = {"mse": recon.detach(), "l0": l0, "auxk": aux.detach()}
    return LossOutput(loss, xs_hat / sae.cfg.scaling_factor, None, terms, (idx, val))


def sparse_cpu_training_loss(sae: Any, x: Tensor, dead_before: Tensor) -> LossOutput:
    """:func:`sparse_topk_training_loss` through :mod:`pipeline.kernels.cpu_sparse` (any device; made for the CPU).

    AuxK decodes the top ``min(k_aux, n_dead)`` dead latents per token, and nothing when none is dead: the same
    non-zeros as the dense step's ``k_aux`` slots, whose live picks it zeroes.
    """
    dev = x.device.type
    cdt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else sae.dtype
    with torch.autocast(dev, enabled=False), serial():  # the functions cast explicitly; small ops on one thread
        xs = sae.scale_in(x)  # [B, d_in]
        idx, top_val, aux_idx, aux_val, layout = topk_encode_cpu(
            xs, sae.W_enc, sae.b_enc, sae._sparse_width(), cdt, dead_before, sae.k_aux,
            b_pre=sae.b_dec if sae.apply_b_dec else None,
            workspace=sae.__dict__.setdefault("_sparse_workspace", {}))  # the SAE's, reused step to step
        val = sae._sparse_keep(top_val)
        # A code kept whole (TopK) decodes on the encoder's layout; BatchTopK's decodes its non-zeros only.
        xs_hat = sparse_decode_cpu(idx, val, sae.W_dec, sae.b_dec, layout if val is top_val else None)  # fp32
        recon = sae._recon_loss(xs, xs_hat)
        _, l0 = code_firing(idx, val, sae.cfg.d_sae)
        sae._on_train_latents(val.detach())
        if aux_idx.shape[1]:
            e_hat = sparse_decode_cpu(aux_idx, aux_val, sae.W_dec, torch.zeros_like(sae.b_dec))  # float32
            aux = ops.normalized_mse(e_hat, (xs - xs_hat).detach())
        else:  # no dead latent: the dense step's term is 0 · normalized_mse = 0, with no gradient
            aux = torch.zeros((), dtype=torch.float32, device=x.device)
        loss = recon + sae.aux_weight(xs) * aux
    terms = {"mse": recon.detach(), "l0": l0, "auxk": aux.detach()}
    return LossOutput(loss, xs_hat / sae.cfg.scaling_factor, None, terms, (idx, val))
