"""TopK and BatchTopK SAEs, both with the AuxK loss against dead latents.

topk — Gao et al. 2024, "Scaling and evaluating sparse autoencoders". "TopK activation function":
  z = ReLU(TopK(W_enc (x - b_pre))), x_hat = W_dec z + b_pre; decoder rows unit-norm with the
  parallel gradient removed. "Preventing dead latents" (and the AuxK appendix): encoder initialised
  as the decoder transpose; AuxK: the top k_aux dead latents model the residual, coefficient
  alpha = 1/32; a latent is dead after 10M tokens without firing. b_pre at the geometric median.

batchtopk — Bussmann, Leask & Nanda 2024, "BatchTopK Sparse Autoencoders": during training the
  B·k largest pre-activations over the whole batch are kept (so L0 is k on average, adapting per
  token); at inference a single threshold theta replaces the batch dependence, theta estimated as
  the average over training batches of the smallest kept activation (here an EMA).
"""

from __future__ import annotations

import torch
from torch import Tensor

from pipeline.sae import ops
from pipeline.sae.base import SAE, LossOutput, register
from pipeline.sae.config import SAEConfig


@register("topk")
class TopKSAE(SAE):
    def __init__(self, cfg: SAEConfig, generator: torch.Generator | None = None) -> None:
        super().__init__(cfg)
        self._init_linear(generator, decoder_norm=1.0)

    @property
    def unit_norm_decoder(self) -> bool:
        return True

    @property
    def k_aux(self) -> int:
        k = self.cfg.k_aux if self.cfg.k_aux is not None else self.cfg.d_in // 2
        return max(1, min(k, self.cfg.d_sae))

    def pre_acts(self, xs: Tensor) -> Tensor:
        """Scaled input ``xs[..., d_in]`` -> pre-activations ``[..., d_sae]``."""
        return self.center(xs) @ self.W_enc + self.b_enc

    def _activate(self, pre: Tensor, train: bool) -> Tensor:
        return ops.topk_activation(pre, self.cfg.k)

    def _encode_scaled(self, xs: Tensor) -> Tensor:
        return self._activate(self.pre_acts(xs), self.training)

    def training_loss(self, x: Tensor, step: int, total_steps: int) -> LossOutput:
        xs = self.scale_in(x)  # [B, d_in]
        pre = self.pre_acts(xs)  # [B, d_sae]
        f = self._activate(pre, True)
        xs_hat = self._decode_scaled(f)
        recon = self._recon_loss(xs, xs_hat)
        dead = self._update_firing(f)
        self._on_train_latents(f.detach())
        aux = ops.auxk_loss(pre, xs - xs_hat, self.W_dec, dead, self.k_aux)
        loss = recon + self.cfg.aux_coeff * aux
        terms = self._common_terms(xs, xs_hat, f, dead) | {"auxk": aux.detach()}
        return LossOutput(loss, xs_hat / self.cfg.scaling_factor, f, terms)

    def _on_train_latents(self, f: Tensor) -> None:
        """Hook for per-batch statistics of the training latents ``f[B, d_sae]``."""


@register("batchtopk")
class BatchTopKSAE(TopKSAE):
    threshold: Tensor  # scalar float32 buffer
    def __init__(self, cfg: SAEConfig, generator: torch.Generator | None = None) -> None:
        super().__init__(cfg, generator)
        # Inference threshold theta (in the units of the latents); -1 = not estimated yet.
        self.register_buffer("threshold", torch.tensor(-1.0, dtype=torch.float32))

    def _activate(self, pre: Tensor, train: bool) -> Tensor:
        if not train:
            # Bussmann et al.: at inference a latent is active iff its pre-activation > theta,
            # so a token's code no longer depends on the other tokens of its batch.
            theta = self.threshold.clamp_min(0.0).to(pre.dtype)
            return pre.relu() * (pre > theta)
        flat = pre.flatten()  # the whole batch competes: B·k slots
        n_keep = self.cfg.k * (flat.numel() // pre.shape[-1])
        vals, idx = flat.topk(n_keep, sorted=False)
        return torch.zeros_like(flat).scatter(0, idx, vals.relu()).view_as(pre)

    @torch.no_grad()
    def _on_train_latents(self, f: Tensor) -> None:
        """EMA of the batch's smallest positive kept activation; tensor ops only (no host sync)."""
        pos_min = torch.where(f > 0, f, torch.full_like(f, float("inf"))).min().float()
        decay = self.cfg.threshold_decay
        t = self.threshold
        new = torch.where(t < 0, pos_min, decay * t + (1 - decay) * pos_min)
        t.copy_(torch.where(torch.isfinite(pos_min), new, t))
