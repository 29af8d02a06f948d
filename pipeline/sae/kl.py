"""Classic sparse autoencoder with sigmoid units and a KL sparsity penalty.

Andrew Ng, "Sparse autoencoder", CS294A lecture notes (2011), section "Autoencoders and sparsity":
  a = sigmoid(W_enc^T x + b_enc),   x_hat = W_dec^T a + b_dec   (no pre-encoder bias)
  rho_hat_j = mean over the batch of a_j
  loss = ||x - x_hat||^2 + beta · sum_j KL(rho || rho_hat_j),
  KL(rho || rho_hat) = rho log(rho / rho_hat) + (1 - rho) log((1 - rho) / (1 - rho_hat)).
Ng's notes use a linear decoder for real-valued inputs ("Linear decoders" section) and add weight
decay, which here belongs to the optimizer. The activations are never exactly zero: L0 counts
every unit, so compare this baseline on FVU and on mean activation instead.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from pipeline.sae import batch
from pipeline.sae.base import SAE, Term, register
from pipeline.sae.config import SAEConfig


def kl_sparsity(rho: float, rho_hat: Tensor) -> Tensor:
    """sum_j KL(rho || rho_hat_j) for ``rho_hat[d_sae]`` in (0, 1). Scalar."""
    r = rho_hat.float().clamp(1e-6, 1 - 1e-6)  # keep the logs finite for saturated units
    return (rho * torch.log(rho / r) + (1 - rho) * torch.log((1 - rho) / (1 - r))).sum()


@register("kl")
class KLSAE(SAE):
    default_apply_b_dec = False
    init_b_dec_median = False

    def __init__(self, cfg: SAEConfig, generator: torch.Generator | None = None) -> None:
        super().__init__(cfg)
        # Small random decoder rows; encoder = decoder transpose, so units start near sigmoid(0) = 0.5
        # and the KL term pulls them down towards rho.
        self._init_linear(generator, decoder_norm=cfg.init_decoder_norm)

    def _encode_scaled(self, xs: Tensor) -> Tensor:
        return torch.sigmoid(self.center(xs) @ self.W_enc + self.b_enc)

    def _loss_terms(self, xs: Tensor, xs_hat: Tensor, f: Tensor, inner: Any, step: int, total_steps: int,
                    dead: Tensor) -> list[Term]:
        rho_hat = batch.mean(f)  # [d_sae] mean sigmoid activation, over the global batch when data-parallel
        return [Term("kl", kl_sparsity(self.cfg.target_rate, rho_hat), self.cfg.kl_coeff),
                Term("mean_activation", rho_hat.detach().mean(), logged_only=True)]
