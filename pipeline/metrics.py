"""Versioned metric definitions: pure functions plus streaming accumulators.

Every metric has a name ``<metric>@<version>`` (:mod:`pipeline.metric_names`, whose :data:`DEFINITIONS`
table says what each name means); the version changes whenever the definition changes.
Conventions: ``x[N, d]`` activations, ``x_hat[N, d]`` reconstructions, ``f[N, d_sae]`` latents;
N counts tokens (leading dims are flattened). Accumulators sum in float64 on the tensor's device
and sync to host only in ``result()``, so evaluation never holds all tokens in memory.

Why these definitions:

- ``fvu@2`` sums the residual over dimensions before dividing by the summed variance. Version 1
  (a mean of per-dimension ratios) is retired: it lets a few near-constant dimensions dominate the
  average (their tiny variance inflates their ratio), and it changes under a rotation of the
  basis, while the residual stream has no privileged basis. The summed ratio is 1 - R^2 of the
  vector regression, invariant to rotations, and is what SAE papers report.
- ``uncentered_nmse@1`` (formerly ``nmse@1``, same definition) divides by the raw second moment, not
  the variance, so it is not the "normalised MSE" of Gao et al. 2024 (that is ``fvu@2``); on
  activations with a large mean it is much smaller than the FVU.
- ``mmcs@1``: Sharkey et al. 2022, "Taking features out of superposition with sparse autoencoders".

Special tokens excluded (``evaluate.exclude_special_tokens: true``, the default; SAEBench's core
evaluation does the same with ``exclude_special_tokens_from_reconstruction``). BOS/EOS/PAD positions
carry activations unlike any text token (BOS is an attention sink with massive activations, Xiao et
al. 2023, Sun et al. 2024; at position 0 it is the same vector in every context), so they can
dominate the total variance and flatter or ruin FVU depending on whether the SAE spends latents on
them. A different token set is a different definition, so each name bumps its version
(:data:`EXCLUDING_SPECIAL`); with the option off, the all-token names are produced unchanged. For the
downstream-loss metrics the SAE replaces the hook's output only at non-special positions, the
zero-ablation baseline zeroes only those same positions, and only predictions made at non-special
positions are averaged. (SAEBench zeroes every position in the baseline, BOS included; here both
edited forwards lose the same positions, so the ratio compares like with like.)
"""

from __future__ import annotations

import math
from collections.abc import Collection

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.metric_names import (
    ALL_TOKEN_REFERENCE,  # noqa: F401  re-exported: metrics.ALL_TOKEN_REFERENCE
    CE_CLEAN,
    CE_LOSS_RECOVERED,
    CE_SAE,
    CE_ZERO_ABLATION,
    DEAD_FRACTION,
    DELTA_LM_LOSS,
    DENSE_FRACTION,
    DENSE_THRESHOLD,
    EXCLUDING_SPECIAL,
    FVU,
    KL_DIV,
    L0,
    L1,
    MMCS,  # noqa: F401  re-exported: metrics.MMCS
    MSE,
    SHRINKAGE,
    UNCENTERED_NMSE,
)


def excluding_special(values: dict[str, float]) -> dict[str, float]:
    """Rename all-token metric names to their special-tokens-excluded versions (others unchanged)."""
    return {EXCLUDING_SPECIAL.get(k, k): v for k, v in values.items()}


def special_mask(token_ids: Tensor, special_ids: Collection[int]) -> Tensor:
    """``token_ids [...]`` int -> bool ``[...]``, True where the token id is in ``special_ids``."""
    ids = torch.tensor(sorted(special_ids), dtype=token_ids.dtype, device=token_ids.device)
    return torch.isin(token_ids, ids)


def _flat(t: Tensor) -> Tensor:
    return t.reshape(-1, t.shape[-1]).to(torch.float64)


def mse(x: Tensor, x_hat: Tensor) -> float:
    """``mse@1``: mean over tokens and dimensions of (x - x_hat)^2."""
    return (_flat(x) - _flat(x_hat)).pow(2).mean().item()


def uncentered_nmse(x: Tensor, x_hat: Tensor) -> float:
    """``uncentered_nmse@1``: sum ||x - x_hat||^2 / sum ||x||^2 (not the FVU: no mean subtracted)."""
    x, x_hat = _flat(x), _flat(x_hat)
    return ((x - x_hat).pow(2).sum() / x.pow(2).sum()).item()


def fvu(x: Tensor, x_hat: Tensor) -> float:
    """``fvu@2``: sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 (sums over tokens and dimensions)."""
    x, x_hat = _flat(x), _flat(x_hat)
    return ((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()).item()


def l0(f: Tensor) -> float:
    """``l0@1``: mean number of nonzero latents per token."""
    return (_flat(f) != 0).sum(-1).double().mean().item()


def l1(f: Tensor) -> float:
    """``l1@1``: mean over tokens of the L1 norm of the latents."""
    return _flat(f).abs().sum(-1).mean().item()


def dead_fraction(fire_counts: Tensor) -> float:
    """``dead_fraction@1``: fraction of latents with zero firings in the window. ``fire_counts[d_sae]``."""
    return (fire_counts == 0).double().mean().item()


def dense_fraction(fire_counts: Tensor, n_tokens: int, threshold: float = DENSE_THRESHOLD) -> float:
    """``dense_fraction@1``: fraction of latents firing on more than ``threshold`` of ``n_tokens``."""
    return (fire_counts.double() / n_tokens > threshold).double().mean().item()


def shrinkage(x: Tensor, x_hat: Tensor) -> float:
    """``shrinkage@1``: mean over tokens with ||x|| > 0 of ||x_hat|| / ||x||."""
    nx, nh = _flat(x).norm(dim=-1), _flat(x_hat).norm(dim=-1)
    keep = nx > 0
    return (nh[keep] / nx[keep]).mean().item()


def ce_loss_recovered(ce_clean: float, ce_sae: float, ce_zero: float) -> float:
    """``ce_loss_recovered@1``: (CE_zero - CE_sae) / (CE_zero - CE_clean); NaN if zero ablation costs nothing."""
    denom = ce_zero - ce_clean
    return (ce_zero - ce_sae) / denom if denom != 0 else math.nan


def delta_lm_loss(ce_clean: float, ce_sae: float) -> float:
    """``delta_lm_loss@1``: CE_sae - CE_clean."""
    return ce_sae - ce_clean


def kl_div_per_token(logits_clean: Tensor, logits_sae: Tensor) -> Tensor:
    """KL(p_clean || p_sae) per position: ``[..., vocab] -> [...]`` (float64, nats)."""
    lp = F.log_softmax(logits_clean.to(torch.float64), dim=-1)
    lq = F.log_softmax(logits_sae.to(torch.float64), dim=-1)
    return (lp.exp() * (lp - lq)).sum(-1)


def kl_div(logits_clean: Tensor, logits_sae: Tensor) -> float:
    """``kl_div@1``: mean over positions of KL(p_clean || p_sae)."""
    return kl_div_per_token(logits_clean, logits_sae).mean().item()


def max_cosine_similarity(A: Tensor, B: Tensor, chunk: int = 4096) -> Tensor:
    """For each row of ``A[n, d]`` its max cosine similarity with the rows of ``B[m, d]``: ``[n]``."""
    B = F.normalize(B.to(torch.float32), dim=-1)
    out = []
    for a in A.to(torch.float32).split(chunk):
        out.append((F.normalize(a, dim=-1) @ B.t()).max(-1).values)
    return torch.cat(out)


def mmcs(A: Tensor, B: Tensor) -> float:
    """``mmcs@1``: mean over rows of A of the max cosine similarity with a row of B (not symmetric)."""
    return max_cosine_similarity(A, B).double().mean().item()


class ReconstructionAccumulator:
    """Streams ``mse@1``, ``uncentered_nmse@1``, ``fvu@2``, ``shrinkage@1`` over batches, exactly (float64 sums).

    FVU needs the mean over *all* tokens: sum ||x - mean||^2 = sum ||y||^2 - N ||mean(y)||^2 with
    y = x - c for any constant c. Taking c = the first batch's mean (the shifted-data algorithm for
    the variance) avoids the cancellation that c = 0 suffers when activations have a large offset.
    """

    def __init__(self, d: int, device: str | torch.device = "cpu") -> None:
        z = lambda *s: torch.zeros(*s, dtype=torch.float64, device=device)  # noqa: E731
        self.n = 0
        self.n_nonzero = z(())
        self.shift: Tensor | None = None  # [d] first batch's mean
        self.sum_y = z(d)  # [d] sum of y = x - shift
        self.sum_y_sq = z(())  # sum ||y||^2
        self.sum_sq = z(())  # sum ||x||^2
        self.sum_err = z(())  # sum ||x - x_hat||^2
        self.sum_ratio = z(())  # sum ||x_hat|| / ||x||

    @torch.no_grad()
    def update(self, x: Tensor, x_hat: Tensor) -> None:
        x, x_hat = _flat(x), _flat(x_hat)
        if x.shape[0] == 0:  # e.g. a batch of special tokens only: its mean would poison the shift
            return
        if self.shift is None:
            self.shift = x.mean(0)
        y = x - self.shift
        self.n += x.shape[0]
        self.sum_y += y.sum(0)
        self.sum_y_sq += y.pow(2).sum()
        self.sum_sq += x.pow(2).sum()
        self.sum_err += (x - x_hat).pow(2).sum()
        nx, nh = x.norm(dim=-1), x_hat.norm(dim=-1)
        keep = nx > 0
        self.n_nonzero += keep.sum()
        self.sum_ratio += torch.where(keep, nh / nx.clamp_min(1e-300), torch.zeros_like(nx)).sum()

    def result(self) -> dict[str, float]:
        n, d = self.n, self.sum_y.numel()
        mean_y = self.sum_y / max(n, 1)
        total_var = (self.sum_y_sq - n * mean_y.pow(2).sum()).item()
        err = self.sum_err.item()
        return {
            MSE: err / (n * d) if n else math.nan,
            UNCENTERED_NMSE: err / self.sum_sq.item() if self.sum_sq.item() > 0 else math.nan,
            FVU: err / total_var if total_var > 0 else math.nan,
            SHRINKAGE: (self.sum_ratio / self.n_nonzero).item() if self.n_nonzero.item() > 0 else math.nan,
        }


class FiringAccumulator:
    """Streams per-latent firing counts, ``l0@1``, ``l1@1``, ``dead_fraction@1``, ``dense_fraction@1``."""

    def __init__(self, d_sae: int, device: str | torch.device = "cpu") -> None:
        self.n = 0
        self.counts = torch.zeros(d_sae, dtype=torch.long, device=device)  # [d_sae] tokens fired on
        self.sum_l0 = torch.zeros((), dtype=torch.float64, device=device)
        self.sum_l1 = torch.zeros((), dtype=torch.float64, device=device)

    @torch.no_grad()
    def update(self, f: Tensor) -> None:
        f = f.reshape(-1, f.shape[-1])
        active = f != 0
        self.n += f.shape[0]
        self.counts += active.sum(0)
        self.sum_l0 += active.sum(dtype=torch.float64)
        self.sum_l1 += f.abs().sum(dtype=torch.float64)

    def frequencies(self) -> Tensor:
        """Fraction of tokens each latent fired on, ``[d_sae]`` float64."""
        return self.counts.double() / max(self.n, 1)

    def result(self) -> dict[str, float]:
        n = max(self.n, 1)
        return {
            L0: self.sum_l0.item() / n,
            L1: self.sum_l1.item() / n,
            DEAD_FRACTION: dead_fraction(self.counts),
            DENSE_FRACTION: dense_fraction(self.counts, n),
        }


class LMLossAccumulator:
    """Streams ``ce_loss_recovered@1``, ``delta_lm_loss@1``, ``kl_div@1`` from per-token values."""

    def __init__(self) -> None:
        self.n = 0
        self.sums = torch.zeros(4, dtype=torch.float64)  # ce_clean, ce_sae, ce_zero, kl

    @torch.no_grad()
    def update(self, ce_clean: Tensor, ce_sae: Tensor, ce_zero: Tensor, kl: Tensor) -> None:
        """Per-token tensors of equal shape ``[...]`` (already masked to the positions that count)."""
        vals = [t.detach().double().sum().cpu() for t in (ce_clean, ce_sae, ce_zero, kl)]
        self.sums += torch.stack(vals)
        self.n += ce_clean.numel()

    def result(self) -> dict[str, float]:
        if self.n == 0:
            return {CE_LOSS_RECOVERED: math.nan, DELTA_LM_LOSS: math.nan, KL_DIV: math.nan}
        clean, sae, zero, kl = (self.sums / self.n).tolist()
        return {
            CE_LOSS_RECOVERED: ce_loss_recovered(clean, sae, zero),
            DELTA_LM_LOSS: delta_lm_loss(clean, sae),
            KL_DIV: kl,
            CE_CLEAN: clean, CE_SAE: sae, CE_ZERO_ABLATION: zero,
        }
