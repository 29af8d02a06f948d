"""ReLU SAE with an L1 penalty, in two recipes.

recipe "2024" — Anthropic, "Circuits Updates, April 2024: Update on how we train SAEs":
  f = ReLU(W_enc^T x + b_enc), x_hat = W_dec^T f + b_dec, no pre-encoder bias; decoder rows
  unconstrained; loss = ||x - x_hat||^2 + lambda * sum_i f_i ||W_dec,i||  (the penalty weighted by
  decoder norms makes the unconstrained decoder scale-invariant); W_dec rows random directions of
  norm 0.1, W_enc = W_dec^T, biases 0; lambda warmed up linearly over the first 5% of steps;
  inputs scaled so E||x||^2 = d_in.

recipe "2023" — Bricken et al., "Towards Monosemanticity" (2023), "Autoencoder architecture" and
  "Neuron resampling" appendices: f = ReLU(W_enc^T (x - b_dec) + b_enc); decoder rows unit-norm
  (gradient projection + renormalisation); b_dec initialised at the geometric median; loss =
  ||x - x_hat||^2 + lambda * ||f||_1; dead neurons resampled at 25k, 50k, 75k, 100k steps.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor

from pipeline.sae import batch
from pipeline.sae.base import SAE, Term, register
from pipeline.sae.config import SAEConfig

log = logging.getLogger(__name__)


@register("relu_l1")
class ReLUL1SAE(SAE):
    def __init__(self, cfg: SAEConfig, generator: torch.Generator | None = None) -> None:
        super().__init__(cfg)
        self._init_linear(generator, decoder_norm=cfg.init_decoder_norm if self.is_2024 else 1.0)
        self._n_resamples = 0

    @property
    def is_2024(self) -> bool:
        return self.cfg.recipe == "2024"

    @property
    def apply_b_dec(self) -> bool:  # type: ignore[override]
        a = self.cfg.apply_b_dec_to_input
        return (not self.is_2024) if a is None else a

    @property
    def unit_norm_decoder(self) -> bool:
        return not self.is_2024

    def _encode_scaled(self, xs: Tensor) -> Tensor:
        return (self.center(xs) @ self.W_enc + self.b_enc).relu()

    def _loss_terms(self, xs: Tensor, xs_hat: Tensor, f: Tensor, inner: Any, step: int, total_steps: int,
                    dead: Tensor) -> list[Term]:
        if self.is_2024:
            l1 = batch.mean((f * self.W_dec.norm(dim=-1)).sum(-1))
        else:
            l1 = batch.mean(f.abs().sum(-1))
        return [Term("l1", l1, self.cfg.l1_coeff * self._warmup(step, total_steps))]

    def wants_resample(self, step: int) -> bool:
        every = self.cfg.resample_every
        return (not self.is_2024 and step > 0 and step % every == 0
                and step // every <= self.cfg.max_resamples)

    @torch.no_grad()
    def resample_dead(self, x_sample: Tensor, optimizer: torch.optim.Optimizer, dead: Tensor) -> Tensor:
        """Towards Monosemanticity, "Neuron resampling", on raw activations ``x_sample[N, d_in]``.

        The ``dead [d_sae]`` latents (the trainer's: no firing for ``train.dead_window_tokens`` tokens) get a
        new decoder row: an input drawn with probability proportional to its squared reconstruction loss,
        normalised; encoder column: the same vector scaled to 0.2 x the mean encoder norm of live latents;
        encoder bias 0; their Adam moments are reset. Returns the indices resampled (the trainer counts them
        as just fired; host sync: this runs between steps, not inside the loss).
        """
        if self.is_2024:
            return super().resample_dead(x_sample, optimizer, dead)
        idx = dead.nonzero().squeeze(-1)
        n = int(idx.numel())
        self._n_resamples += 1
        none = idx[:0]
        if n == 0:
            return none
        xs = self.scale_in(x_sample.to(self.W_dec.device))
        err = (self._decode_scaled(self._encode_scaled(xs)) - xs).float().pow(2).sum(-1)  # [N]
        if float(err.sum()) <= 0:
            return none
        pick = torch.multinomial(err, n, replacement=True)
        v = self.center(xs[pick])  # [n, d_in], what the encoder sees
        v = v / v.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        alive = ~dead
        enc_norm = self.W_enc[:, alive].norm(dim=0).mean() if bool(alive.any()) else self.W_enc.new_tensor(1.0)
        self.W_dec[idx] = v
        self.W_enc[:, idx] = (v * 0.2 * enc_norm).t()
        self.b_enc[idx] = 0.0
        _reset_adam_rows(optimizer, self.W_dec, idx, dim=0)
        _reset_adam_rows(optimizer, self.W_enc, idx, dim=1)
        _reset_adam_rows(optimizer, self.b_enc, idx, dim=0)
        log.info("resampled %d dead latents", n)
        return idx


def _reset_adam_rows(optimizer: torch.optim.Optimizer, p: Tensor, idx: Tensor, dim: int) -> None:
    """Zero the optimizer moments (Adam's exp_avg, exp_avg_sq) of slices ``idx`` of ``p`` along ``dim``."""
    state = optimizer.state.get(p)
    if not state:
        return
    for key in ("exp_avg", "exp_avg_sq"):
        if key in state:
            state[key].index_fill_(dim, idx, 0.0)
