"""The training step of a latent-sharded TopK / BatchTopK SAE (``train.parallel: latents``, :mod:`pipeline.sharding`).

Each of N processes holds a contiguous slice ``[lo, hi)`` of the latents (``W_enc[:, lo:hi]``, ``b_enc[lo:hi]``,
``W_dec[lo:hi, :]``) and sees the whole batch. Per step:

- pre-activations of the local latents ``pre [B, m/N]`` (the encoder input passes :class:`ToShards`: identity
  forward, all-reduce backward, so the gradient of the replicated ``b_dec`` through the encoder is the sum of
  every slice's part);
- the selection (:func:`select`): each slice's local top-k candidates per row (BatchTopK: the batch's top B·k)
  are all-gathered, the global k-th largest is the threshold; exactly k entries are kept, ties at the threshold
  broken by the lowest global (row-major) index;
- the decoder: each slice's partial reconstruction ``f_local @ W_dec_local`` summed over the processes
  (:class:`FromShards`: all-reduce forward, identity backward: d(sum)/d(part) = 1);
- the loss (reconstruction + AuxK over the dead latents, with its own global top-k_aux) from the summed
  reconstruction: the same number on every process, so replicated parameters get the same gradient everywhere.

One process's ``torch.topk`` picks among exactly equal values in an unspecified order; here the lowest index wins.
The two differ only where two latents' positive pre-activations are bit-for-bit equal at the k-th place (a tie
at or below 0 is ReLU'd to 0 whichever entry is picked), which a randomly initialised encoder does not produce.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from pipeline import distributed
from pipeline.sae import LossOutput, ops
from pipeline.sae.topk import TopKSAE


class ToShards(torch.autograd.Function):
    """Replicated input entering the sharded region: identity forward; backward sums the slices' gradients."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        return distributed.all_reduce_(grad.contiguous().clone())


class FromShards(torch.autograd.Function):
    """Partial results leaving the sharded region: summed over the processes forward; identity backward."""

    @staticmethod
    def forward(ctx: Any, part: Tensor) -> Tensor:
        return distributed.all_reduce_(part.contiguous().clone())

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        return grad


# ---- the selection, in pieces so that a test can run N slices in one process ---------------------------------
def _wide(t: Tensor) -> Tensor:
    """``t`` in float32 at least (bf16 autocast values and partial sums travel exactly, or summed in fp32)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def candidates(values: Tensor, k: int, per_row: bool) -> Tensor:
    """A slice's candidates for the global selection (float32 at least): per row its top k ``[B, k']``, or (batch-wide)
    its top ``k`` of all entries ``[k']`` (k' = k, or fewer if the slice has fewer entries)."""
    if per_row:
        return _wide(values.topk(min(k, values.shape[-1]), dim=-1, sorted=False).values)
    flat = values.flatten()
    return _wide(flat.topk(min(k, flat.numel()), sorted=False).values)


def threshold(gathered: Tensor, k: int, per_row: bool) -> Tensor:
    """The k-th largest of every slice's ``candidates`` (stacked ``[N, ...]``): ``[B, 1]`` per row, or a scalar."""
    if per_row:
        cat = gathered.permute(1, 0, 2).reshape(gathered.shape[1], -1)  # [B, N·k']
        return cat.topk(k, dim=-1, sorted=False).values.min(-1, keepdim=True).values
    return gathered.flatten().topk(k, sorted=False).values.min()


def tie_counts(values: Tensor, t: Tensor) -> Tensor:
    """Per row, how many of a slice's entries are above the threshold ``t`` and how many equal it: ``[B, 2]``."""
    return torch.stack([(values > t).sum(-1), (values == t).sum(-1)], dim=-1)


def keep_mask(values: Tensor, t: Tensor, counts: Tensor, rank: int, k: int, per_row: bool) -> Tensor:
    """``[B, C]`` bool: this slice's entries among the global k largest (per row, or of the whole batch), exactly k.

    ``counts [N, B, 2]``: every slice's :func:`tie_counts`. Entries above ``t`` are kept; of those equal to ``t``,
    the first ``k - #above`` in global row-major order (row, then slice, then position in the slice).
    """
    above, equal = values > t, values == t
    pos = equal.long().cumsum(-1) - equal.long()  # [B, C] earlier ties in this row of this slice
    n_above, n_equal = counts[..., 0], counts[..., 1]  # [N, B]
    before = n_equal[:rank].sum(0)  # [B] ties in the same row of lower slices
    if per_row:
        need = k - n_above.sum(0)  # [B]
    else:
        per_row_total = n_equal.sum(0)  # [B]
        before = before + per_row_total.cumsum(0) - per_row_total  # + every slice's ties in earlier rows
        need = (k - n_above.sum()).expand_as(before)
    return above | (equal & ((before.unsqueeze(-1) + pos) < need.unsqueeze(-1)))


def select(values: Tensor, k: int, per_row: bool, rank: int) -> Tensor:
    """``[B, C]`` bool over this process's slice: the global top ``k`` per row (TopK) or of the batch (BatchTopK)."""
    values = values.detach()
    mine = candidates(values, k, per_row)
    gathered = distributed.all_gather_rows(mine.unsqueeze(0))  # [N, ...] in rank order
    t = threshold(gathered, k, per_row)
    counts = distributed.all_gather_rows(tie_counts(values, t).unsqueeze(0))  # [N, B, 2]
    return keep_mask(values, t, counts, rank, k, per_row)


# ---- the step ------------------------------------------------------------------------------------------------
@dataclass
class ShardedLoss(LossOutput):
    """``training_loss``'s output on one slice: ``local [B, m/N]`` its latents (``latents`` stays None)."""

    local: Tensor | None = None

    @torch.no_grad()
    def firing(self, d_sae: int) -> tuple[Tensor, Tensor]:
        """``(counts [d_sae] int64, l0)`` of the whole SAE: the slices' counts gathered in latent order."""
        assert self.local is not None
        active = self.local != 0
        counts = distributed.all_gather_rows(active.sum(0))  # [d_sae]: slices are contiguous, in rank order
        per_row = distributed.all_reduce_(active.sum(-1))  # [B] integer: exact in any order
        return counts, per_row.float().mean()


def training_loss(sae: TopKSAE, x: Tensor, dead: Tensor, k: int, k_aux: int, lo: int, rank: int) -> ShardedLoss:
    """The TopK / BatchTopK training loss on ``x [B, d_in]`` (the whole batch) with this process's latent slice
    ``sae`` (its ``d_sae`` = m/N, global latents ``lo .. lo + m/N``); ``dead [m]`` the whole SAE's dead mask.
    The same loss as ``TopKSAE.training_loss`` on the dense torch path, up to float summation order."""
    per_row = sae.arch == "topk"
    xs = sae.scale_in(x)  # [B, d_in]
    pre = ToShards.apply(sae.center(xs)) @ sae.W_enc + sae.b_enc  # [B, m/N]
    B = pre.shape[0]
    keep = select(pre, k if per_row else k * B, per_row, rank)
    f = torch.where(keep, pre.relu(), torch.zeros_like(pre))
    xs_hat = FromShards.apply(_wide(f @ sae.W_dec)).to(xs.dtype) + sae.b_dec  # [B, d_in]
    recon = sae.recon_loss(xs, xs_hat)

    # BatchTopK's inference threshold: the EMA of the batch's smallest kept activation over all slices.
    if not per_row:  # (TopK keeps none)
        local_min = torch.where(f > 0, f, torch.full_like(f, float("inf"))).min().float().reshape(1).detach()
        sae.on_train_latents(distributed.all_reduce_(local_min, op="min"))  # the [1] global minimum: the same EMA

    # AuxK (Gao et al. 2024): the top k_aux dead latents of the whole SAE model the residual.
    dead_here = dead[lo:lo + pre.shape[1]]
    masked = torch.where(dead_here, pre, torch.full_like(pre, float("-inf")))
    pick = select(masked, k_aux, True, rank) & dead_here
    acts = torch.where(pick, pre.relu(), torch.zeros_like(pre))
    e_hat = FromShards.apply(_wide(acts @ sae.W_dec))
    aux = ops.normalized_mse(e_hat, (xs - xs_hat).detach()) * dead.any().float()
    loss = recon + sae.aux_weight(xs) * aux
    terms = {"mse": recon.detach(), "auxk": aux.detach()}  # (the whole SAE's L0: firing(), one collective)
    return ShardedLoss(loss, xs_hat / sae.cfg.scaling_factor, None, terms, None, local=f)


__all__ = ["ToShards", "FromShards", "candidates", "threshold", "tie_counts", "keep_mask", "select", "ShardedLoss",
           "training_loss"]
