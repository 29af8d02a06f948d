"""Matryoshka BatchTopK SAE (Bussmann et al., ICML 2025, "Learning Multi-Level Features with Matryoshka Sparse
Autoencoders", arXiv 2503.17547), after the dictionary_learning trainer the paper cites
(``MatryoshkaBatchTopKTrainer``).

The dictionary is cut into M contiguous groups (sizes from ``cfg.matryoshka_fractions``: all but the last
``int(fraction * d_sae)``, the last the remainder); level l is the prefix of the first l groups, ending at
latent ``w_l``. One global BatchTopK over the whole dictionary picks the batch's B·k largest pre-activations
(as :class:`~pipeline.sae.topk.BatchTopKSAE`), and each level must reconstruct the input on its own from its
prefix: ``xs_hat_l = f[:, :w_l] @ W_dec[:w_l] + b_dec`` (running prefix sums of the decoder, one group at a time),
``L_l = mean_tokens ||xs - xs_hat_l||^2``. Early latents are pushed to carry the coarse features a small
dictionary would learn, so a general latent is not absorbed into its specific children.

The three public implementations weight the levels differently (``cfg.matryoshka_weighting``):

- ``dictionary_learning`` (default): each level's loss times its group weight 1/M, then the mean over the M
  levels, i.e. ``sum_l L_l / M^2``;
- ``bussmann`` (bartbussmann/matryoshka_sae): the mean over M + 1 levels, the first of them empty
  (``L_0 = ||xs - b_dec||^2``), i.e. ``(L_0 + sum_l L_l) / (M + 1)``;
- ``saelens``: the sum ``sum_l L_l``.

With Adam an overall factor hardly matters, but it sets the reconstruction's weight against AuxK (whose
coefficient is ``aux_coeff · TV(xs)``, as for topk) and against gradient clipping.

AuxK on dead latents (``cfg.matryoshka_auxk``): ``full`` (default; dictionary_learning): the top ``k_aux`` dead
latents of the whole dictionary model the full reconstruction's residual, as for BatchTopK; ``per_level``
(SAELens ``use_matryoshka_aux_loss``): each group's dead latents (top ``min(k_aux, group size)``) model the
residual of their own level's prefix, the groups' terms summed.

Inference is BatchTopK's: a latent is active iff its pre-activation exceeds the EMA threshold, so the saved SAE
is a JumpReLU with one shared threshold (SAELens saves its Matryoshka SAEs the same way). The sparse CPU / Triton
training kernels implement only the one-level loss, so this architecture always trains on the dense torch step.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from pipeline.sae import batch, ops
from pipeline.sae.base import LossOutput, Term, register
from pipeline.sae.config import SAEConfig
from pipeline.sae.topk import BatchTopKSAE

WEIGHTINGS = ("dictionary_learning", "bussmann", "saelens")
AUXK_SCOPES = ("full", "per_level")


def group_sizes(fractions: list[float], d_sae: int) -> list[int]:
    """Latents per group: ``int(f * d_sae)`` for all but the last fraction, the remainder for the last
    (dictionary_learning's rule; the fractions sum to 1)."""
    sizes = [int(f * d_sae) for f in fractions[:-1]]
    return [*sizes, d_sae - sum(sizes)]


def level_weights(weighting: str, n_levels: int) -> tuple[float, list[float]]:
    """``(w_0, [w_1..w_M])``: the weight of the empty level's loss ``||xs - b_dec||^2`` and of each level's."""
    m = n_levels
    if weighting == "dictionary_learning":
        return 0.0, [1.0 / (m * m)] * m
    if weighting == "bussmann":
        return 1.0 / (m + 1), [1.0 / (m + 1)] * m
    if weighting == "saelens":
        return 0.0, [1.0] * m
    raise ValueError(f"unknown matryoshka weighting {weighting!r}")


@register("matryoshka_batchtopk")
class MatryoshkaBatchTopKSAE(BatchTopKSAE):
    def __init__(self, cfg: SAEConfig, generator: torch.Generator | None = None) -> None:
        super().__init__(cfg, generator)
        self.sizes = group_sizes(cfg.matryoshka_fractions, cfg.d_sae)
        #: the prefix ends ``w_1 < ... < w_M = d_sae``
        self.ends = [sum(self.sizes[: i + 1]) for i in range(len(self.sizes))]

    def training_loss(self, x: Tensor, step: int, total_steps: int, dead: Tensor | None = None) -> LossOutput:
        """Loss on a raw batch ``x[B, d_in]``: the weighted levels' reconstructions + AuxK (dense torch step only)."""
        xs = self.scale_in(x)  # [B, d_in]
        f, pre = self._train_encode(xs)  # [B, d_sae] each
        w0, ws = level_weights(self.cfg.matryoshka_weighting, len(self.sizes))
        xs_hat = self.b_dec.expand_as(xs)  # the empty level: the bias alone
        prefixes: list[Tensor] = [xs_hat]
        start = 0
        for end in self.ends:
            xs_hat = xs_hat + f[:, start:end] @ self.W_dec[start:end]  # prefix sum of the decoder: level l
            prefixes.append(xs_hat)
            start = end
        # Every level's loss (and the empty level's, if weighted) in one collective when data-parallel.
        levels = batch.means(*((p - xs).float().pow(2).sum(-1) for p in (prefixes if w0 else prefixes[1:])))
        recon = w0 * levels.pop(0) if w0 else None
        prefixes.pop(0)
        for level, w in zip(levels, ws, strict=True):
            term = w * level
            recon = term if recon is None else recon + term
        assert recon is not None
        self._on_train_latents(f.detach())
        aux = self._auxk(pre, xs, prefixes, self._dead_or_none(dead))
        loss = recon + self.aux_weight(xs) * aux
        terms = self._common_terms(xs, xs_hat, f, levels[-1]) | {"auxk": aux.detach(), "recon_levels": recon.detach()}
        terms |= {f"mse_level{i + 1}": level.detach() for i, level in enumerate(levels[:-1])}
        return LossOutput(loss, xs_hat / self.cfg.scaling_factor, f, terms)

    def _auxk(self, pre: Tensor, xs: Tensor, prefixes: list[Tensor], dead: Tensor) -> Tensor:
        """The AuxK term (scale-free normalized MSE) in the configured scope. ``pre [B, d_sae]``."""
        if self.cfg.matryoshka_auxk == "full":
            return ops.auxk_loss(pre, xs - prefixes[-1], self.W_dec, dead, self.k_aux)
        total = pre.new_zeros((), dtype=torch.float32)
        start = 0
        for end, xs_hat in zip(self.ends, prefixes, strict=True):
            k = min(self.k_aux, end - start)
            total = total + ops.auxk_loss(pre[:, start:end], xs - xs_hat, self.W_dec[start:end], dead[start:end], k)
            start = end
        return total

    def _loss_terms(self, xs: Tensor, xs_hat: Tensor, f: Tensor, inner: Any, step: int, total_steps: int,
                    dead: Tensor) -> list[Term]:
        raise AssertionError("matryoshka_batchtopk computes its loss in training_loss")  # never the base's step

    def level_fvu(self, x: Tensor) -> list[float]:
        """FVU of each level's prefix reconstruction (inference code) on raw ``x[N, d_in]``, for diagnostics."""
        with torch.no_grad():
            xs = self.scale_in(x)
            f = self._encode_scaled(xs)
            tv = ops.total_variance(xs)
            out, xs_hat, start = [], self.b_dec.expand_as(xs), 0
            for end in self.ends:
                xs_hat = xs_hat + f[:, start:end] @ self.W_dec[start:end]
                out.append(float(batch.mean((xs - xs_hat).float().pow(2).sum(-1)) / tv))
                start = end
        return out
