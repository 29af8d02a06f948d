"""Transcoders and skip transcoders: a sparse dictionary that reads a block's MLP input and predicts its MLP output.

Dunefsky, Chlenski & Nanda 2024 ("Transcoders find interpretable LLM feature circuits"); Paulo, Shabalin & Belrose
2025 ("Transcoders beat sparse autoencoders for interpretability", arXiv 2501.18823), whose skip transcoder adds a
linear map of the input: ``y_hat = W_dec^T f(x) + b_dec + W_skip x``. The input ``x[..., d_in]`` is the MLP's input
(after its norm: the ``layers.{i}.mlp_in`` hook), the target ``y[..., d_in]`` the same block's MLP output
(``layers.{i}.mlp_out``); both are d_model wide, so the output width is ``d_in`` too. FVU is measured against y.

Activation (``cfg.transcoder_activation``): ``topk`` (default, sparsify's; exports to sparsify ``transcode``) or
``batchtopk`` (training over the batch, an inference threshold; exports to SAELens ``jumprelu_transcoder`` /
``jumprelu_skip_transcoder``, SAELens having no TopK transcoder). AuxK against dead latents as for topk. ``jumprelu``:
a threshold per latent (``threshold[d_sae]``: latent i is ReLU(pre_i) where pre_i > theta_i, else 0), the form of an
imported SAELens JumpReLU or ReLU (theta = 0) transcoder (:mod:`pipeline.sae.transcoder_io`); inference only.

Initialisation as sparsify's transcoders: zero decoder (and zero ``W_skip``), no ``b_dec`` subtracted from the input
(it lives in the output space), decoder rows unconstrained; from the data, ``b_dec`` at the target's mean and
``b_enc`` centring the encoder's input (``-mean(x) W_enc``). Input and target are each scaled to E||.||^2 = d_in
(``cfg.scaling_factor`` for x, ``cfg.target_scaling_factor`` for y), folded into the weights on save.

Training takes the pair: ``training_loss(x, step, total_steps, dead, target=y)``; the sparse CPU / Triton kernels
implement the SAE step only, so transcoders train on the dense torch step.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from pipeline.errors import UserError
from pipeline.sae import ops
from pipeline.sae.base import LossOutput, register
from pipeline.sae.config import SAEConfig
from pipeline.sae.topk import BatchTopKSAE


@register("transcoder")
class Transcoder(BatchTopKSAE):
    default_apply_b_dec = False
    init_b_dec_median = False
    is_transcoder = True
    W_skip: nn.Parameter  # [d_in, d_in] (input -> output, applied as x @ W_skip); only with cfg.skip

    def __init__(self, cfg: SAEConfig, generator: torch.Generator | None = None) -> None:
        super().__init__(cfg, generator)
        with torch.no_grad():
            self.W_dec.zero_()  # sparsify: a transcoder's decoder starts at zero
        if cfg.skip:
            self.W_skip = nn.Parameter(torch.zeros(cfg.d_in, cfg.d_in, dtype=self._init_dtype))
        if cfg.transcoder_activation == "jumprelu":  # one threshold per latent; BatchTopK's inference rule broadcasts it
            self.threshold = torch.zeros(cfg.d_sae, dtype=torch.float32)

    @property
    def unit_norm_decoder(self) -> bool:
        return False

    def _activate(self, pre: Tensor, train: bool) -> Tensor:
        if self.cfg.transcoder_activation == "topk":
            return ops.topk_activation(pre, self.cfg.k)
        return super()._activate(pre, train)

    # ---- inference: raw MLP input -> latents -> raw MLP-output prediction ---------------------------
    def decode(self, f: Tensor) -> Tensor:
        """Latents ``f[..., d_sae]`` -> the dictionary's part of the prediction ``[..., d_in]`` in raw output units
        (without the skip term, which needs the input: :meth:`predict`)."""
        return self._decode_scaled(f.to(self.dtype)) / self.cfg.target_scaling_factor

    def skip_out(self, x: Tensor) -> Tensor:
        """The skip connection's part ``x @ W_skip`` in raw output units (zeros without ``cfg.skip``)."""
        if not self.cfg.skip:
            return torch.zeros_like(x, dtype=self.dtype)
        return (self.scale_in(x) @ self.W_skip) / self.cfg.target_scaling_factor

    def predict(self, x: Tensor) -> Tensor:
        """Raw MLP input ``x[..., d_in]`` -> predicted MLP output ``[..., d_in]`` (dictionary + skip)."""
        return self.decode(self.encode(x)) + self.skip_out(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.predict(x)

    # ---- training -----------------------------------------------------------------------------
    def training_loss(self, x: Tensor, step: int, total_steps: int, dead: Tensor | None = None,
                      target: Tensor | None = None) -> LossOutput:
        """Loss on a pair: ``x[B, d_in]`` the MLP input, ``target[B, d_in]`` the MLP output (raw units)."""
        if target is None:
            raise UserError("sae arch 'transcoder' trains on (MLP input, MLP output) pairs: no target given")
        if self.cfg.transcoder_activation == "jumprelu":
            raise UserError("sae.transcoder_activation: 'jumprelu' holds an imported transcoder's thresholds and is not "
                            "trained here; train topk or batchtopk")
        xs = self.scale_in(x)
        ys = target.to(self.dtype) * self.cfg.target_scaling_factor
        pre = self.pre_acts(xs)  # [B, d_sae]
        f = self._activate(pre, True)
        ys_hat = self._decode_scaled(f) + (xs @ self.W_skip if self.cfg.skip else 0.0)
        recon = self._recon_loss(ys, ys_hat)
        self._on_train_latents(f.detach())
        aux = ops.auxk_loss(pre, ys - ys_hat, self.W_dec, self._dead_or_none(dead), self.k_aux)
        loss = recon + self.aux_weight(ys) * aux
        terms = self._common_terms(ys, ys_hat, f, recon) | {"auxk": aux.detach()}
        return LossOutput(loss, ys_hat / self.cfg.target_scaling_factor, f, terms)

    @torch.no_grad()
    def init_from_data(self, x_sample: Tensor, target_sample: Tensor | None = None) -> None:
        """Scales of input and target (E||.||^2 = d_in each), ``b_dec`` = the scaled target's mean, ``b_enc`` centring
        the encoder input. ``target_sample[N, d_in]`` pairs ``x_sample``; without it only the input side is set."""
        super().init_from_data(x_sample)
        x = x_sample.detach().to(torch.float64).reshape(-1, self.cfg.d_in) * self.cfg.scaling_factor
        self.b_enc.copy_((-(x.mean(0) @ self.W_enc.double())).to(self.b_enc))
        if target_sample is None:
            return
        y = target_sample.detach().to(torch.float64).reshape(-1, self.cfg.d_in)
        mean_sq = y.pow(2).sum(-1).mean().item()
        if not math.isfinite(mean_sq) or mean_sq <= 0:
            raise UserError("init_from_data: target sample is all zeros or not finite")
        self.cfg.target_scaling_factor = math.sqrt(self.cfg.d_in / mean_sq)
        self.b_dec.copy_((y.mean(0) * self.cfg.target_scaling_factor).to(self.b_dec))

    @torch.no_grad()
    def fold_scaling(self) -> None:
        """Input scale s, target scale t: pre = (s·x) W_enc + b_enc, y_hat = (f W_dec + b_dec + s·x W_skip) / t, so
        W_enc *= s, W_dec /= t, b_dec /= t, W_skip *= s / t; latents unchanged."""
        s, t = self.cfg.scaling_factor, self.cfg.target_scaling_factor
        self.W_enc.mul_(s)
        self.W_dec.div_(t)
        self.b_dec.div_(t)
        if self.cfg.skip:
            self.W_skip.mul_(s / t)
        self.cfg.scaling_factor = self.cfg.target_scaling_factor = 1.0
