"""Plain-PyTorch reference path of the TopK SAE step (CPU, fallback when Triton/CUDA is missing, tests).

Conventions shared by every backend in :mod:`pipeline.kernels`:

* ``x``      ``[N, d]``        input activations (one row per token)
* ``W_enc``  ``[d, d_sae]``    encoder (``x @ W_enc``)
* ``b_enc``  ``[d_sae]``
* ``W_dec``  ``[d_sae, d]``    decoder, one row per latent (the direction it writes)
* ``b_dec``  ``[d]``           decoder bias, also subtracted from ``x`` before encoding ("pre-bias",
  Gao et al. 2024, *Scaling and evaluating sparse autoencoders*, section 2.2 / eq. 1) when
  ``pre_bias=True``
* ``top_idx`` ``[N, k]`` int64 latent ids and ``top_val`` ``[N, k]`` their activations: the sparse code.
  Slots with ``top_val == 0`` are inactive (they arise from the ReLU after TopK and from BatchTopK).

The activation is ReLU(TopK(pre)) as in Gao et al. 2024 (eq. 2): the k largest pre-activations are kept
and then clamped at zero, so a kept latent with a negative pre-activation is inactive and gets no gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor


def topk_encode_torch(x: Tensor, W_enc: Tensor, b_enc: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Dense encoder + TopK + ReLU.

    :param x: ``[N, d]`` (already centred by ``b_dec`` if the SAE uses a pre-bias)
    :returns: ``(top_idx [N, k] int64, top_val [N, k])``, values in the matmul's dtype, descending per row.
    """
    pre = x @ W_enc + b_enc  # [N, d_sae] — the dense tensor the fused path avoids keeping
    top_val, top_idx = pre.topk(k, dim=-1, sorted=True)  # [N, k]
    return top_idx, top_val.relu()


def chunked_topk(x: Tensor, W_enc: Tensor, b_enc: Tensor, k: int, chunk: int | None) -> tuple[Tensor, Tensor]:
    """TopK of ``x @ W_enc + b_enc`` without materialising more than ``[N, chunk]`` of it.

    :param x: ``[N, d]``; ``W_enc`` ``[d, d_sae]``; ``b_enc`` ``[d_sae]``; all in the compute dtype
    :returns: ``(top_val [N, k], top_idx [N, k] int64)``, sorted descending per row
    """
    (val, idx), = chunked_topk_multi(x, W_enc, b_enc, [(None, k)], chunk)
    return val, idx


def chunked_topk_multi(x: Tensor, W_enc: Tensor, b_enc: Tensor, selections: list[tuple[Tensor | None, int]],
                       chunk: int | None) -> list[tuple[Tensor, Tensor]]:
    """Several top-k selections from one pass over the pre-activations ``pre = x @ W_enc + b_enc``.

    Selection ``(extra_bias, k)`` takes the k largest of ``pre + extra_bias`` (``extra_bias [d_sae]`` or None) and
    returns the values *including* the extra bias. The TopK code and the AuxK code (the dead latents, selected by
    pushing live ones down with a large negative bias) thus share the encoder matmul, the dominant cost of a step.

    :returns: per selection ``(val [N, k], idx [N, k] int64)``, sorted descending per row
    """
    d_sae = W_enc.shape[1]
    chunk = d_sae if chunk is None else min(chunk, d_sae)
    best: list[tuple[Tensor, Tensor] | None] = [None] * len(selections)
    for c0 in range(0, d_sae, chunk):
        c1 = min(c0 + chunk, d_sae)
        pre = x @ W_enc[:, c0:c1] + b_enc[c0:c1]  # [N, c1-c0] — the only dense slice alive at a time
        for i, (extra, k) in enumerate(selections):
            p = pre if extra is None else pre + extra[c0:c1]
            val, idx = p.topk(min(k, c1 - c0), dim=-1, sorted=False)
            idx = idx + c0
            prev = best[i]
            if prev is not None:
                val, idx = torch.cat([prev[0], val], 1), torch.cat([prev[1], idx], 1)  # [N, <= 2k]
            if val.shape[1] > k:
                val, pos = val.topk(k, dim=-1, sorted=False)
                idx = idx.gather(1, pos)
            best[i] = (val, idx)
    out = []
    for b in best:
        assert b is not None
        val, pos = b[0].sort(dim=-1, descending=True)
        out.append((val, b[1].gather(1, pos)))
    return out


def batchtopk_width(k: int, d_sae: int, k_max: int | None = None) -> int:
    """Slots per row of a BatchTopK code: ``k_max`` (default ``4*k``), at most ``d_sae``."""
    return min(d_sae, 4 * k if k_max is None else k_max)


def batchtopk_encode_torch(
    x: Tensor, W_enc: Tensor, b_enc: Tensor, k: int, k_max: int | None = None
) -> tuple[Tensor, Tensor]:
    """BatchTopK (Bussmann et al. 2024, *BatchTopK Sparse Autoencoders*, section 3): keep the ``N*k`` largest
    ReLU pre-activations of the whole batch, so the number of active latents varies per token.

    The sparse code keeps a fixed width ``k_max`` per row (default ``4*k``, capped at ``d_sae``): a row with more
    than ``k_max`` latents in the batch's top ``N*k`` keeps only its ``k_max`` largest. With ``k_max = d_sae`` the
    result is exact; the cap exists so that the sparse kernels have a fixed shape (documented deviation).

    :returns: ``(top_idx [N, k_max], top_val [N, k_max])``; unselected slots have value 0.
    """
    N, d_sae = x.shape[0], W_enc.shape[1]
    k_max = batchtopk_width(k, d_sae, k_max)
    pre = (x @ W_enc + b_enc).relu()  # [N, d_sae]
    cand_val, cand_idx = pre.topk(k_max, dim=-1, sorted=True)  # [N, k_max] per-row candidates
    return cand_idx, batch_threshold(cand_val, N * k)


def batch_threshold(cand_val: Tensor, n_keep: int) -> Tensor:
    """Zero every candidate below the ``n_keep``-th largest value of the batch (ties at the threshold are kept).

    :param cand_val: ``[N, k_max]`` non-negative candidate values
    :returns: ``[N, k_max]`` values with the non-selected ones set to 0. No host synchronisation.
    """
    flat = cand_val.flatten()
    n_keep = min(n_keep, flat.numel())
    thresh = flat.topk(n_keep, sorted=False).values.min()  # scalar tensor, stays on device
    return torch.where(cand_val >= thresh, cand_val, torch.zeros_like(cand_val))


def sparse_decode_torch(top_idx: Tensor, top_val: Tensor, W_dec: Tensor, b_dec: Tensor) -> Tensor:
    """Gather-based sparse decoder (memory ``[N, k, d]``; used as the readable definition in tests).

    :returns: ``x_hat [N, d]`` in float32 (the kernels accumulate in fp32 and return fp32 too).
    """
    rows = W_dec.float()[top_idx]  # [N, k, d]
    return (top_val.float().unsqueeze(-1) * rows).sum(1) + b_dec.float()


def dense_decode_torch(top_idx: Tensor, top_val: Tensor, W_dec: Tensor, b_dec: Tensor) -> Tensor:
    """What a plain PyTorch SAE does: scatter the code into a dense ``[N, d_sae]`` tensor, then one matmul.

    Used by the ``torch`` backend (fast on CPU, and it is the "plain PyTorch" baseline of the benchmarks).
    """
    N, d_sae = top_idx.shape[0], W_dec.shape[0]
    f = torch.zeros(N, d_sae, dtype=top_val.dtype, device=top_val.device).scatter(1, top_idx, top_val)
    return (f @ W_dec.to(f.dtype)).float() + b_dec.float()  # [N, d]


def topk_sae_forward_torch(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    W_dec: Tensor,
    b_dec: Tensor,
    k: int,
    arch: str = "topk",
    pre_bias: bool = True,
    compute_dtype: torch.dtype | None = None,
    k_max: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Reference forward of a TopK / BatchTopK SAE, differentiable by autograd.

    ``compute_dtype`` (e.g. ``torch.bfloat16``) casts inputs and weights for the matmuls — the casts are part of
    the graph, so fp32 master weights receive fp32 gradients, as under autocast.

    :returns: ``(x_hat [N, d] float32, top_idx [N, k'], top_val [N, k'])``
    """
    dt = compute_dtype or x.dtype
    xin = (x - b_dec) if pre_bias else x
    xin, We, be, Wd = xin.to(dt), W_enc.to(dt), b_enc.to(dt), W_dec.to(dt)
    if arch == "topk":
        top_idx, top_val = topk_encode_torch(xin, We, be, k)
    elif arch == "batchtopk":
        top_idx, top_val = batchtopk_encode_torch(xin, We, be, k, k_max)
    else:
        raise ValueError(f"kernels support arch 'topk' and 'batchtopk', not {arch!r}")
    return dense_decode_torch(top_idx, top_val, Wd, b_dec), top_idx, top_val
