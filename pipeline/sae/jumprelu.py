"""JumpReLU SAE — Rajamanoharan et al. 2024, "Jumping Ahead: Improving Reconstruction Fidelity with
JumpReLU Sparse Autoencoders".

f = JumpReLU_theta(z) = z · H(z - theta), z = W_enc^T (x - b_dec) + b_enc, theta = exp(log_theta) > 0
per latent. Loss: ||x - x_hat||^2 + lambda · ||f||_0 with ||f||_0 = sum_i H(z_i - theta_i).
H has zero gradient almost everywhere, so theta is trained with straight-through estimators
(the paper's pseudo-derivatives) using a rectangle kernel K(u) = 1{|u| < 1/2} of bandwidth epsilon:
  d/dtheta JumpReLU_theta(z) := -(theta / eps) K((z - theta) / eps)
  d/dtheta H(z - theta)      := -(1 / eps)     K((z - theta) / eps)
and no pseudo-gradient flows to z through H (z still gets the ordinary gradient of z · H).
Decoder rows are unit-norm (training details); theta starts at 0.001, eps = 0.001, inputs scaled so that
E||x||^2 = d_in; lambda is warmed up linearly like the L1 coefficient.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from pipeline.sae import batch
from pipeline.sae.base import SAE, Term, register
from pipeline.sae.config import SAEConfig


def _rect(u: Tensor) -> Tensor:
    return (u.abs() < 0.5).to(u.dtype)


class _JumpReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z: Tensor, theta: Tensor, eps: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return z * (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        z, theta = ctx.saved_tensors
        eps = ctx.eps
        grad_z = grad * (z > theta).to(z.dtype)
        grad_theta = grad * (-(theta / eps) * _rect((z - theta) / eps))
        return grad_z, _sum_to(grad_theta, theta.shape), None


class _Step(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z: Tensor, theta: Tensor, eps: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        z, theta = ctx.saved_tensors
        eps = ctx.eps
        grad_theta = grad * (-(1.0 / eps) * _rect((z - theta) / eps))
        return torch.zeros_like(z), _sum_to(grad_theta, theta.shape), None


def _sum_to(g: Tensor, shape: torch.Size) -> Tensor:
    """Reduce a broadcast gradient ``[..., d_sae]`` back to ``theta``'s shape ``[d_sae]``."""
    return g.reshape(-1, g.shape[-1]).sum(0).reshape(shape)


def jumprelu(z: Tensor, theta: Tensor, eps: float) -> Tensor:
    """z · H(z - theta) with the straight-through pseudo-derivative w.r.t. theta."""
    return _JumpReLU.apply(z, theta, eps)


def heaviside_ste(z: Tensor, theta: Tensor, eps: float) -> Tensor:
    """H(z - theta) with the straight-through pseudo-derivative w.r.t. theta (none w.r.t. z)."""
    return _Step.apply(z, theta, eps)


@register("jumprelu")
class JumpReLUSAE(SAE):
    def __init__(self, cfg: SAEConfig, generator: torch.Generator | None = None) -> None:
        super().__init__(cfg)
        self._init_linear(generator, decoder_norm=1.0)
        init = math.log(cfg.jumprelu_init_threshold)
        self.log_threshold = nn.Parameter(torch.full((cfg.d_sae,), init, dtype=self._init_dtype))

    @property
    def unit_norm_decoder(self) -> bool:
        return True

    @property
    def threshold(self) -> Tensor:
        """Per-latent threshold theta ``[d_sae]`` (positive by construction)."""
        return self.log_threshold.exp()

    def pre_acts(self, xs: Tensor) -> Tensor:
        return self.center(xs) @ self.W_enc + self.b_enc

    def _encode_scaled(self, xs: Tensor) -> Tensor:
        return jumprelu(self.pre_acts(xs), self.threshold, self.cfg.jumprelu_bandwidth)

    def _train_encode(self, xs: Tensor) -> tuple[Tensor, Any]:
        z = self.pre_acts(xs)  # [B, d_sae]
        theta = self.threshold  # once: the encode and the L0 penalty share it (one gradient path to log theta)
        return jumprelu(z, theta, self.cfg.jumprelu_bandwidth), (z, theta)

    def _loss_terms(self, xs: Tensor, xs_hat: Tensor, f: Tensor, inner: Any, step: int, total_steps: int,
                    dead: Tensor) -> list[Term]:
        z, theta = inner
        l0 = batch.mean(heaviside_ste(z, theta, self.cfg.jumprelu_bandwidth).sum(-1))
        return [Term("l0_penalty", l0, self.cfg.l0_coeff * self._warmup(step, total_steps))]
