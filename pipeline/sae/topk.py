"""TopK and BatchTopK SAEs, both with the AuxK loss against dead latents.

topk — Gao et al. 2024, "Scaling and evaluating sparse autoencoders". "TopK activation function":
  z = ReLU(TopK(W_enc (x - b_pre))), x_hat = W_dec z + b_pre; decoder rows unit-norm with the
  parallel gradient removed. "Preventing dead latents" (and the AuxK appendix A.2): encoder initialised
  as the decoder transpose; AuxK: the top k_aux dead latents model the residual e = x - x_hat, coefficient
  alpha = 1/32; a latent is dead after 10M tokens without firing. b_pre at the geometric median.
  Their objective is mse_scale·mse(x_hat, x) + alpha·normalized_mse(e_hat, e), both terms normalised by a
  variance (of the data, of e); see ``TopKSAE.aux_weight`` for the same objective in this module's units.

batchtopk — Bussmann, Leask & Nanda 2024, "BatchTopK Sparse Autoencoders": during training the
  B·k largest pre-activations over the whole batch are kept (so L0 is k on average, adapting per
  token); at inference a single threshold theta replaces the batch dependence, theta estimated as
  the average over training batches of the smallest kept activation (here an EMA).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from pipeline.kernels.reference import batchtopk_width
from pipeline.sae import batch, ops
from pipeline.sae.base import SAE, LossOutput, Term, code_firing, register
from pipeline.sae.config import SAEConfig


@register("topk")
class TopKSAE(SAE):
    def __init__(self, cfg: SAEConfig, generator: torch.Generator | None = None) -> None:
        super().__init__(cfg)
        self._init_linear(generator, decoder_norm=1.0)
        self.sparse_workspace: dict[str, Any] = {}  # the CPU sparse step's buffers, reused from step to step

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

    def training_loss(self, x: Tensor, step: int, total_steps: int, dead: Tensor | None = None) -> LossOutput:
        if self.kernel_backend in ("triton", "sparse"):  # the same loss through the sparse kernels (train.kernels)
            from pipeline.kernels import sae_step

            step_fn = sae_step.sparse_topk_training_loss if self.kernel_backend == "triton" \
                else sae_step.sparse_cpu_training_loss
            out = step_fn(self, x, self._dead_or_none(dead))
            _, l0 = code_firing(out.idx, out.val, self.cfg.d_sae)
            terms = {"mse": out.recon.detach(), "l0": l0, "auxk": out.aux.detach()}
            return LossOutput(out.loss, out.xs_hat / self.cfg.scaling_factor, None, terms, (out.idx, out.val))
        return super().training_loss(x, step, total_steps, dead)

    def _train_encode(self, xs: Tensor) -> tuple[Tensor, Any]:
        pre = self.pre_acts(xs)  # [B, d_sae]
        return self._activate(pre, True), pre

    def _loss_terms(self, xs: Tensor, xs_hat: Tensor, f: Tensor, inner: Any, step: int, total_steps: int,
                    dead: Tensor) -> list[Term]:
        # AuxK works on the latents dead when the step began (the kernel path selects them in the same encoder
        # pass as the TopK code, before this batch's firing is known).
        self._on_train_latents(f.detach())
        aux = ops.auxk_loss(inner, xs - xs_hat, self.W_dec, dead, self.k_aux)  # inner: the pre-activations
        return [Term("auxk", aux, self.aux_weight(xs))]

    def aux_weight(self, xs: Tensor) -> Tensor:
        """The AuxK coefficient in the units of the reconstruction term, for a scaled batch ``xs[B, d_in]``. Scalar.

        Gao et al. 2024 (appendix A.2 and their train.py) minimise mse_scale·mse + alpha·normalized_mse(e_hat, e),
        with mse the mean over elements and mse_scale = 1 / the data's per-element variance: the reconstruction
        term is the FVU. Here it is ||xs - xs_hat||^2 (summed over dims, mean over tokens) = FVU · TV(xs), with
        TV the data's total variance; multiplying their objective by TV(xs) (a positive constant: same minimiser,
        same balance) gives recon + alpha·TV(xs)·normalized_mse. TV is this batch's (detached), where theirs is
        estimated once from a sample; both estimate the same number. The AuxK term itself (``terms["auxk"]``)
        is the scale-free normalized_mse.
        """
        return self.cfg.aux_coeff * ops.total_variance(xs)

    def _on_train_latents(self, f: Tensor) -> None:
        """Hook for per-batch statistics of the training latents ``f[B, d_sae]`` (or their non-zeros)."""

    # The sparse kernel step's contract (pipeline.kernels.sae_step.SparseArch): besides the weights, scale_in,
    # k_aux and aux_weight, the selection (which an architecture on the same kernels overrides) and loss pieces.
    def sparse_width(self) -> int:
        """How many latents per token the kernel's chunked top-k selects: TopK's own k."""
        return self.cfg.k

    def sparse_keep(self, val: Tensor) -> Tensor:
        """The kernel's selected values ``val [B, width]`` -> the code's values (0 = dropped): TopK keeps all."""
        return val

    def recon_loss(self, xs: Tensor, xs_hat: Tensor) -> Tensor:
        """The reconstruction term every architecture trains on (:meth:`SAE._recon_loss`). Scalar."""
        return self._recon_loss(xs, xs_hat)

    def aux_loss(self, e_hat: Tensor, residual: Tensor) -> Tensor:
        """AuxK's term from the dead latents' reconstruction ``e_hat [B, d_in]`` (as in :func:`ops.auxk_loss`). Scalar."""
        return ops.normalized_mse(e_hat, residual)

    def on_train_latents(self, val: Tensor) -> None:
        """The kernel step's code values ``val [B, width]`` into the per-batch statistics (:meth:`_on_train_latents`)."""
        self._on_train_latents(val)


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
        n_keep = self.cfg.k * batch.rows(flat.numel() // pre.shape[-1])
        if batch.world() > 1:  # the global batch's B·k largest, of which this process holds its rows
            return torch.where(pre >= self._global_threshold(pre, n_keep), pre.relu(), torch.zeros_like(pre))
        vals, idx = flat.topk(n_keep, sorted=False)
        return torch.zeros_like(flat).scatter(0, idx, vals.relu()).view_as(pre)

    def sparse_width(self) -> int:
        """Each token's candidates for the batch-wide selection (a token keeps at most this many)."""
        return batchtopk_width(self.cfg.k, self.cfg.d_sae)

    def sparse_keep(self, val: Tensor) -> Tensor:
        """Of all candidates, the B·k largest over the global batch."""
        n_keep = batch.rows(val.shape[0]) * self.cfg.k
        if batch.world() > 1:
            return torch.where(val >= self._global_threshold(val, n_keep), val, torch.zeros_like(val))
        return batch.keep_top(val, n_keep)

    def _global_threshold(self, values: Tensor, n_keep: int) -> Tensor:
        """Data-parallel: the global batch's ``n_keep``-th largest of ``values``; the smallest positive value the
        selection keeps comes with it (:func:`batch.top_threshold`), for :meth:`_on_train_latents` to use
        instead of a collective of its own."""
        theta, self._kept_low = batch.top_threshold(values, n_keep)
        return theta

    @torch.no_grad()
    def _on_train_latents(self, f: Tensor) -> None:
        """EMA of the batch's smallest positive kept activation; tensor ops only (no host sync)."""
        low: Tensor | None = getattr(self, "_kept_low", None)
        self._kept_low = None
        if low is not None and batch.world() > 1:  # the selection's own: the same value, no collective
            pos_min = low.float()
        else:
            pos_min = batch.minimum(torch.where(f > 0, f, torch.full_like(f, float("inf"))).min().float())
        decay = self.cfg.threshold_decay
        t = self.threshold
        new = torch.where(t < 0, pos_min, decay * t + (1 - decay) * pos_min)
        t.copy_(torch.where(torch.isfinite(pos_min), new, t))
