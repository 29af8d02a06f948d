"""Gated SAE — Rajamanoharan et al. 2024, "Improving Dictionary Learning with Gated Sparse Autoencoders".

The architecture section: which latents are active and how large they are come from two paths sharing
weights:
  pi_gate = W_gate^T (x - b_dec) + b_gate,                       f_gate = H(pi_gate)
  pi_mag  = (W_gate · exp(r_mag))^T (x - b_dec) + b_mag,          f_mag  = ReLU(pi_mag)
  f = f_gate ⊙ f_mag,   x_hat = W_dec^T f + b_dec
Training loss: ||x - x_hat(f)||^2 + lambda ||ReLU(pi_gate)||_1 + ||x - x_hat_frozen(ReLU(pi_gate))||^2;
the auxiliary term reconstructs from the gate path through a *frozen* (detached) decoder so the gate
path gets a reconstruction signal although H has no gradient. Decoder rows are kept unit-norm,
which makes the L1 of pi_gate meaningful; ``W_gate`` is stored as ``W_enc`` (SAELens' layout).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from pipeline.sae import batch
from pipeline.sae.base import SAE, Term, register
from pipeline.sae.config import SAEConfig


@register("gated")
class GatedSAE(SAE):
    def __init__(self, cfg: SAEConfig, generator: torch.Generator | None = None) -> None:
        super().__init__(cfg)
        self._init_linear(generator, decoder_norm=1.0)
        del self.b_enc  # the gated encoder has two biases instead
        d_sae = cfg.d_sae
        self.b_gate = nn.Parameter(torch.zeros(d_sae, dtype=self._init_dtype))
        self.b_mag = nn.Parameter(torch.zeros(d_sae, dtype=self._init_dtype))
        self.r_mag = nn.Parameter(torch.zeros(d_sae, dtype=self._init_dtype))  # exp(0) = 1: paths start equal

    @property
    def unit_norm_decoder(self) -> bool:
        return True

    def _paths(self, xs: Tensor) -> tuple[Tensor, Tensor]:
        """Scaled input -> (pi_gate, pi_mag), both ``[..., d_sae]``."""
        h = self.center(xs) @ self.W_enc  # [..., d_sae]
        # (W_gate · exp(r_mag))^T x == (W_gate^T x) · exp(r_mag): one matmul for both paths
        return h + self.b_gate, h * self.r_mag.exp() + self.b_mag

    def _encode_scaled(self, xs: Tensor) -> Tensor:
        pi_gate, pi_mag = self._paths(xs)
        return (pi_gate > 0).to(pi_mag.dtype) * pi_mag.relu()

    def _train_encode(self, xs: Tensor) -> tuple[Tensor, Any]:
        pi_gate, pi_mag = self._paths(xs)
        return (pi_gate > 0).to(pi_mag.dtype) * pi_mag.relu(), pi_gate  # [B, d_sae]

    def _loss_terms(self, xs: Tensor, xs_hat: Tensor, f: Tensor, inner: Any, step: int, total_steps: int,
                    dead: Tensor) -> list[Term]:
        gate = inner.relu()  # inner: pi_gate
        sparsity = batch.mean(gate.sum(-1))
        xs_gate = gate @ self.W_dec.detach() + self.b_dec.detach()
        aux = self._recon_loss(xs, xs_gate)
        return [Term("l1", sparsity, self.cfg.l1_coeff * self._warmup(step, total_steps)), Term("aux", aux)]
