"""The TopK / BatchTopK SAE training step through the sparse kernels (``train.kernels: triton`` or ``sparse``).

The same loss as ``TopKSAE``'s dense step (:meth:`pipeline.sae.base.SAE.training_loss` with TopK's encode and
AuxK term), computed as in Gao et al. 2024 ("efficient training"): the encoder's top-k (and AuxK's, from the same
matmul) is taken chunk by chunk, the decoder forward and both backward passes touch only the non-zeros, and the
dense ``[B, d_sae]`` latents are never built. Matmuls run in the autocast dtype (bf16 on GPU) with fp32
accumulation; the fp32 master weights receive fp32 gradients.

``sparse_cpu_training_loss`` is the same step in plain PyTorch for the CPU (:mod:`pipeline.kernels.cpu_sparse`):
the dead latents are counted on the host there (a sync costs nothing), so AuxK selects among them only.

The contract with the architectures: a step reads an architecture only through :class:`SparseArch` (public
names: its weights, its selection, its loss pieces) and returns a :class:`SparseStep`, which the architecture
turns into its ``LossOutput``. The kernels import nothing from ``pipeline.sae`` (the SAEs sit on the kernels,
not the other way round), and neither side reads the other's private names (``tests/test_layering.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from pipeline.kernels.cpu_sparse import serial, sparse_decode_cpu, topk_encode_cpu

__all__ = ["SparseArch", "SparseStep", "sparse_topk_training_loss", "sparse_cpu_training_loss"]


class SparseArch(Protocol):
    """What a sparse step needs from an architecture (``TopKSAE`` and its subclasses provide it).

    A linear encoder ``pre = (xs - b_pre) @ W_enc + b_enc`` whose code keeps a top-k-like selection of ``pre``,
    a linear decoder ``xs_hat = code @ W_dec + b_dec``, and an AuxK term on the dead latents.
    """

    W_enc: Tensor  # [d_in, d_sae]
    b_enc: Tensor  # [d_sae]
    W_dec: Tensor  # [d_sae, d_in]
    b_dec: Tensor  # [d_in]
    #: scratch buffers the CPU step reuses from one step to the next (starts empty; the step owns its content)
    sparse_workspace: dict[str, Any]

    @property
    def dtype(self) -> torch.dtype: ...  # the parameters' dtype (the matmul dtype without autocast)

    @property
    def apply_b_dec(self) -> bool: ...  # whether the encoder sees ``xs - b_dec`` (b_pre = b_dec) or ``xs``

    @property
    def k_aux(self) -> int: ...  # how many dead latents AuxK decodes per token (at most)

    def scale_in(self, x: Tensor) -> Tensor:
        """Raw ``x [B, d_in]`` -> the scaled input ``xs [B, d_in]`` the loss is computed on."""
        ...

    def sparse_width(self) -> int:
        """How many latents per token the chunked top-k selects (TopK: k)."""
        ...

    def sparse_keep(self, val: Tensor) -> Tensor:
        """The selected values ``val [B, width]`` -> the code's values (0 = dropped; TopK keeps all)."""
        ...

    def recon_loss(self, xs: Tensor, xs_hat: Tensor) -> Tensor:
        """The reconstruction term of ``xs_hat [B, d_in]`` against ``xs`` (scaled space). Scalar."""
        ...

    def aux_loss(self, e_hat: Tensor, residual: Tensor) -> Tensor:
        """The AuxK term: the dead latents' reconstruction ``e_hat [B, d_in]`` (float32) of the detached
        ``residual = xs - xs_hat``. Scalar float32."""
        ...

    def aux_weight(self, xs: Tensor) -> Tensor:
        """The AuxK coefficient for the scaled batch ``xs``. Scalar."""
        ...

    def on_train_latents(self, val: Tensor) -> None:
        """Per-batch statistics of the code's values ``val [B, width]`` (detached; e.g. BatchTopK's threshold)."""
        ...


@dataclass
class SparseStep:
    """What a sparse step returns: the loss and its pieces, on the device, nothing synced to the host."""

    loss: Tensor  # scalar: recon + aux_weight · aux, what the trainer backpropagates
    xs_hat: Tensor  # [B, d_in] float32 reconstruction in the scaled space
    idx: Tensor  # [B, width] int64 latent of each slot of the code
    val: Tensor  # [B, width] its value (0 = inactive slot)
    recon: Tensor  # scalar reconstruction term (with its graph)
    aux: Tensor  # scalar AuxK term, the scale-free normalised MSE (with its graph)


def sparse_topk_training_loss(sae: SparseArch, x: Tensor, dead_before: Tensor) -> SparseStep:
    """The step of ``sae`` through the Triton kernels on raw ``x [B, d_in]``; ``dead_before [d_sae]`` bool: the
    latents dead as the step began (AuxK's candidates)."""
    from pipeline.kernels.autograd import sparse_decode, topk_encode_aux  # needs Triton: imported on use

    dev = x.device.type
    cdt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else sae.dtype
    with torch.autocast(dev, enabled=False):  # the kernels cast explicitly; autocast would recast their inputs
        xs = sae.scale_in(x)  # [B, d_in]
        # -1e30 rather than -inf pushes live latents out of the AuxK selection: one that is still picked (fewer
        # dead than k_aux) has value ReLU(-1e30) = 0 and gradient 0, where -inf would make 0 * inf = NaN.
        push_out = torch.where(dead_before, 0.0, -1e30).to(sae.b_enc.dtype)
        idx, val, aux_idx, aux_val = topk_encode_aux(
            xs, sae.W_enc.to(cdt), sae.b_enc.to(cdt), sae.sparse_width(), push_out, sae.k_aux,
            b_pre=sae.b_dec if sae.apply_b_dec else None)
        val = sae.sparse_keep(val)
        W_dec = sae.W_dec.to(cdt)  # one cast, shared by both decodes (its gradient reaches the fp32 master)
        xs_hat = sparse_decode(idx, val, W_dec, sae.b_dec)  # [B, d_in] float32
        recon = sae.recon_loss(xs, xs_hat)
        sae.on_train_latents(val.detach())
        aux_val = torch.where(dead_before[aux_idx], aux_val, torch.zeros_like(aux_val))
        e_hat = sparse_decode(aux_idx, aux_val, W_dec, torch.zeros_like(sae.b_dec))  # float32
        aux = sae.aux_loss(e_hat, (xs - xs_hat).detach()) * dead_before.any().float()  # as ops.auxk_loss
        loss = recon + sae.aux_weight(xs) * aux
    return SparseStep(loss, xs_hat, idx, val, recon, aux)


def sparse_cpu_training_loss(sae: SparseArch, x: Tensor, dead_before: Tensor) -> SparseStep:
    """:func:`sparse_topk_training_loss` through :mod:`pipeline.kernels.cpu_sparse` (any device; made for the CPU).

    AuxK decodes the top ``min(k_aux, n_dead)`` dead latents per token, and nothing when none is dead: the same
    non-zeros as the dense step's ``k_aux`` slots, whose live picks it zeroes.
    """
    dev = x.device.type
    cdt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else sae.dtype
    with torch.autocast(dev, enabled=False), serial():  # the functions cast explicitly; small ops on one thread
        xs = sae.scale_in(x)  # [B, d_in]
        idx, top_val, aux_idx, aux_val, layout = topk_encode_cpu(
            xs, sae.W_enc, sae.b_enc, sae.sparse_width(), cdt, dead_before, sae.k_aux,
            b_pre=sae.b_dec if sae.apply_b_dec else None,
            workspace=sae.sparse_workspace)  # the SAE's, reused step to step
        val = sae.sparse_keep(top_val)
        # A code kept whole (TopK) decodes on the encoder's layout; BatchTopK's decodes its non-zeros only.
        xs_hat = sparse_decode_cpu(idx, val, sae.W_dec, sae.b_dec, layout if val is top_val else None)  # fp32
        recon = sae.recon_loss(xs, xs_hat)
        sae.on_train_latents(val.detach())
        if aux_idx.shape[1]:
            e_hat = sparse_decode_cpu(aux_idx, aux_val, sae.W_dec, torch.zeros_like(sae.b_dec))  # float32
            aux = sae.aux_loss(e_hat, (xs - xs_hat).detach())
        else:  # no dead latent: the dense step's term is 0 · normalized_mse = 0, with no gradient
            aux = torch.zeros((), dtype=torch.float32, device=x.device)
        loss = recon + sae.aux_weight(xs) * aux
    return SparseStep(loss, xs_hat, idx, val, recon, aux)
