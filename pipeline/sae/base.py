"""The SAE base class, the training protocol every architecture follows, and the registry.

Conventions (all architectures):

- ``W_dec[d_sae, d_in]``: row i is the direction latent i writes; ``b_dec[d_in]``.
- ``encode(x[..., d_in]) -> f[..., d_sae]`` and ``decode(f) -> x_hat[..., d_in]`` work on *raw*
  activations: the input scaling ``cfg.scaling_factor`` is applied inside (x -> s·x on the way in,
  x_hat -> x_hat / s on the way out), and ``save_sae`` folds it into the weights.
- Training protocol used by ``pipeline.train``, per step::

      out = sae.training_loss(x, step, total_steps, dead)   # no host sync inside
      out.loss.backward()
      sae.before_optimizer_step()                       # e.g. project grads of unit-norm decoder rows
      optimizer.step()
      sae.after_optimizer_step()                        # e.g. renormalise decoder rows

  plus ``init_from_data(x_sample)`` once before training and, for the 2023 relu_l1 recipe,
  ``resample_dead(x_sample, optimizer, dead)`` when ``wants_resample(step)``. ``dead [d_sae]`` (bool) is the
  trainer's record of the latents that have not fired for ``train.dead_window_tokens`` tokens when the step
  begins (:class:`pipeline.trainstats.LatentTracker`, the one dead-latent record): AuxK and resampling use
  it; the trainer counts each step's firing from ``LossOutput.firing()``.
- The loss is computed in the scaled space (E||x||^2 = d_in), so coefficients transfer across
  models (Anthropic, April 2024 update); the reconstruction term is ||x - x_hat||^2 summed over
  dimensions and averaged over tokens.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from pipeline.devices import TORCH_DTYPES
from pipeline.errors import UserError
from pipeline.sae import batch, ops
from pipeline.sae.config import SAEConfig

__all__ = ["SAE", "SAEConfig", "LossOutput", "Term", "ARCHS", "register", "make_sae"]



@dataclass(frozen=True)
class Term:
    """One term of an architecture's loss: added as ``coeff * value`` (``value`` itself when ``coeff`` is None),
    or only logged. ``value`` is a scalar tensor; ``coeff`` a float or a scalar tensor (e.g. AuxK's, which
    scales with the batch's variance)."""

    name: str
    value: Tensor
    coeff: float | Tensor | None = None
    logged_only: bool = False


@dataclass
class LossOutput:
    """What ``training_loss`` returns. All tensors stay on the device; nothing is synced to host."""

    loss: Tensor  # scalar, what the trainer backpropagates
    x_hat: Tensor  # [B, d_in] reconstruction, in raw (unscaled) units
    latents: Tensor | None  # [B, d_sae] feature activations; None when only the sparse code exists
    terms: dict[str, Tensor]  # scalar tensors for logging: mse (scaled space), l0, sparsity, aux, ...
    #: the sparse code ``(top_idx [B, k'], top_val [B, k'])`` of the kernel path (0 = inactive slot)
    code: tuple[Tensor, Tensor] | None = None

    @torch.no_grad()
    def firing(self, d_sae: int) -> tuple[Tensor, Tensor]:
        """``(counts [d_sae] int64, l0 scalar float32)``: tokens each latent fired on, and the mean L0.

        From the dense latents when there are any, else from the sparse code; no host sync either way.
        """
        if self.latents is not None:
            active = self.latents != 0  # [B, d_sae]
            return active.sum(0), active.sum(-1).float().mean()
        assert self.code is not None, "training_loss returned neither latents nor a sparse code"
        return code_firing(*self.code, d_sae)


@torch.no_grad()
def code_firing(idx: Tensor, val: Tensor, d_sae: int) -> tuple[Tensor, Tensor]:
    """``(counts [d_sae] int64, l0 scalar float32)`` of a sparse code ``idx, val [B, k']`` (0 = inactive slot)."""
    on = val != 0  # [B, k']
    counts = torch.zeros(d_sae, dtype=torch.int64, device=idx.device).index_add_(
        0, idx.flatten(), on.flatten().long())  # integer sums: order-independent, deterministic
    return counts, on.sum(-1).float().mean()


class SAE(nn.Module):
    """Base of every architecture. Subclasses implement ``_encode_scaled`` and ``training_loss``."""

    arch: ClassVar[str] = ""
    #: subtract b_dec from the input before encoding, unless cfg.apply_b_dec_to_input says otherwise
    default_apply_b_dec: ClassVar[bool] = True
    #: initialise b_dec at the geometric median of the (scaled) data in ``init_from_data``
    init_b_dec_median: ClassVar[bool] = True
    #: False for architectures without a dictionary (the dense autoencoder baseline)
    has_dictionary: ClassVar[bool] = True

    W_dec: nn.Parameter  # [d_sae, d_in]
    b_dec: nn.Parameter  # [d_in]
    W_enc: nn.Parameter  # [d_in, d_sae] (linear encoders)
    b_enc: nn.Parameter  # [d_sae] (linear encoders except gated)

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        #: how ``training_loss`` computes: "torch" (dense, every arch), "triton" (the sparse GPU kernels of
        #: pipeline.kernels) or "sparse" (the plain-PyTorch sparse step for the CPU); the last two for topk and
        #: batchtopk only. Set by the trainer from ``train.kernels``.
        self.kernel_backend = "torch"
        self._init_dtype = TORCH_DTYPES[cfg.dtype]  # parameters are created in this dtype

    @property
    def dtype(self) -> torch.dtype:
        """Current parameter dtype (follows ``.to(dtype)``)."""
        return self.b_dec.dtype

    # ---- architecture hooks -------------------------------------------------------------------
    @property
    def unit_norm_decoder(self) -> bool:
        """Whether decoder rows are constrained to unit norm (projection + renormalisation)."""
        return False

    @property
    def apply_b_dec(self) -> bool:
        a = self.cfg.apply_b_dec_to_input
        return self.default_apply_b_dec if a is None else a

    def _encode_scaled(self, xs: Tensor) -> Tensor:
        """Scaled input ``xs[..., d_in]`` -> feature activations ``f[..., d_sae]``."""
        raise NotImplementedError

    def _decode_scaled(self, f: Tensor) -> Tensor:
        """``f[..., d_sae]`` -> reconstruction in scaled space ``[..., d_in]``."""
        return f @ self.W_dec + self.b_dec

    def training_loss(self, x: Tensor, step: int, total_steps: int, dead: Tensor | None = None) -> LossOutput:
        """Loss on a batch ``x[B, d_in]`` of raw activations at optimizer step ``step`` (0-based); ``dead [d_sae]``
        bool: the latents dead when the step began (the trainer's; None: none), for auxiliary losses (AuxK).

        The step every architecture shares: scale -> :meth:`_train_encode` -> decode -> reconstruction
        ``||xs - xs_hat||^2`` -> + each of the architecture's :meth:`_loss_terms` (coefficient x value) -> output.
        An architecture overrides those two hooks, not this.
        """
        xs = self.scale_in(x)  # [B, d_in]
        f, inner = self._train_encode(xs)  # [B, d_sae]
        xs_hat = self._decode_scaled(f)
        recon = self._recon_loss(xs, xs_hat)
        extra = self._loss_terms(xs, xs_hat, f, inner, step, total_steps, self._dead_or_none(dead))
        loss = recon
        for t in extra:  # in order: the sum's rounding is part of the result
            if not t.logged_only:
                loss = loss + (t.value if t.coeff is None else t.coeff * t.value)
        terms = self._common_terms(xs, xs_hat, f, recon) | {t.name: t.value.detach() for t in extra}
        return LossOutput(loss, xs_hat / self.cfg.scaling_factor, f, terms)

    def _train_encode(self, xs: Tensor) -> tuple[Tensor, Any]:
        """Scaled batch ``xs[B, d_in]`` -> (latents ``f[B, d_sae]`` as training sees them, whatever the loss terms
        need besides: pre-activations, a gate path, ...). Default: the inference encode, nothing besides."""
        return self._encode_scaled(xs), None

    def _loss_terms(self, xs: Tensor, xs_hat: Tensor, f: Tensor, inner: Any, step: int, total_steps: int,
                    dead: Tensor) -> list[Term]:
        """The architecture's terms besides the reconstruction (sparsity penalty, auxiliary losses), each logged
        under its name; all computed before any is added. Default: none (the reconstruction alone)."""
        return []

    # ---- public inference API -----------------------------------------------------------------
    def scale_in(self, x: Tensor) -> Tensor:
        """Raw ``x[..., d_in]`` -> scaled input in the parameter dtype."""
        x = x.to(self.dtype)
        s = self.cfg.scaling_factor
        return x if s == 1.0 else x * s

    def center(self, xs: Tensor) -> Tensor:
        """What the encoder sees: ``xs - b_dec`` if the architecture subtracts the decoder bias."""
        return xs - self.b_dec if self.apply_b_dec else xs

    def encode(self, x: Tensor) -> Tensor:
        """Raw activations ``x[..., d_in]`` -> feature activations ``f[..., d_sae]``."""
        return self._encode_scaled(self.scale_in(x))

    def decode(self, f: Tensor) -> Tensor:
        """Feature activations ``f[..., d_sae]`` -> reconstruction ``x_hat[..., d_in]`` in raw units."""
        out = self._decode_scaled(f.to(self.dtype))
        s = self.cfg.scaling_factor
        return out if s == 1.0 else out / s

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))

    def feature_directions(self) -> Tensor:
        """Unit-norm feature directions ``[d_sae, d_in]`` (rows of W_dec, normalised)."""
        W = self.W_dec.detach()
        return W / W.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    # ---- training protocol --------------------------------------------------------------------
    def before_optimizer_step(self) -> None:
        """Called after ``backward``, before ``optimizer.step()``."""
        if self.unit_norm_decoder and self.W_dec.grad is not None:
            # Towards Monosemanticity (2023), "Autoencoder architecture": remove the gradient
            # component parallel to each unit-norm decoder row so Adam moves along the sphere.
            ops.remove_parallel_grad_(self.W_dec)

    def after_optimizer_step(self) -> None:
        """Called after ``optimizer.step()``."""
        if self.unit_norm_decoder:
            ops.normalize_rows_(self.W_dec)

    @torch.no_grad()
    def init_from_data(self, x_sample: Tensor) -> None:
        """Data-dependent initialisation from raw activations ``x_sample[N, d_in]``.

        Sets ``cfg.scaling_factor`` so that E||s·x||^2 = d_in (Anthropic, April 2024 update), and,
        where ``init_b_dec_median``, ``b_dec`` at the geometric median of the scaled sample
        (Towards Monosemanticity, "Autoencoder architecture"; Gao et al. 2024 do the same for b_pre).
        """
        x = x_sample.detach().to(torch.float64).reshape(-1, self.cfg.d_in)
        mean_sq = x.pow(2).sum(-1).mean().item()
        if not math.isfinite(mean_sq) or mean_sq <= 0:
            raise UserError("init_from_data: activation sample is all zeros or not finite")
        self.cfg.scaling_factor = math.sqrt(self.cfg.d_in / mean_sq)
        if self.init_b_dec_median and self.apply_b_dec:
            med = ops.geometric_median(x * self.cfg.scaling_factor)
            self.b_dec.copy_(med.to(self.b_dec))

    def wants_resample(self, step: int) -> bool:
        """Whether the trainer should call ``resample_dead`` before ``step`` (2023 recipe only)."""
        return False

    def resample_dead(self, x_sample: Tensor, optimizer: torch.optim.Optimizer, dead: Tensor) -> Tensor:
        """Re-initialise the ``dead [d_sae]`` latents (relu_l1 2023 recipe); returns the indices resampled."""
        raise UserError(f"sae arch {self.arch!r}: dead-neuron resampling is part of the relu_l1 2023 recipe only")

    @torch.no_grad()
    def fold_scaling(self) -> None:
        """Fold ``cfg.scaling_factor`` s into the weights so the SAE takes raw input with s = 1.

        For the linear encoders here, pre = W_enc^T (s·x - b_dec) + b = (s·W_enc)^T (x - b_dec/s) + b
        and x_hat = (f W_dec + b_dec) / s, so W_enc *= s, W_dec /= s, b_dec /= s; latents unchanged.
        """
        s = self.cfg.scaling_factor
        if s == 1.0:
            return
        self.W_enc.mul_(s)
        self.W_dec.div_(s)
        self.b_dec.div_(s)
        self.cfg.scaling_factor = 1.0

    # ---- shared pieces for subclasses ---------------------------------------------------------
    def _recon_loss(self, xs: Tensor, xs_hat: Tensor) -> Tensor:
        """||xs - xs_hat||^2 summed over dims, mean over the (global) batch's tokens (scaled space). Scalar."""
        return batch.mean((xs_hat - xs).float().pow(2).sum(-1))

    def _dead_or_none(self, dead: Tensor | None) -> Tensor:
        """``dead [d_sae]`` bool as given, or no latent dead (a loss computed outside the trainer)."""
        return dead if dead is not None else torch.zeros(self.cfg.d_sae, dtype=torch.bool, device=self.b_dec.device)

    def _common_terms(self, xs: Tensor, xs_hat: Tensor, f: Tensor, mse: Tensor | None = None) -> dict[str, Tensor]:
        """Logged terms; ``mse``: :meth:`_recon_loss` of ``xs, xs_hat`` where the caller has it (data-parallel,
        computing it again would cost another collective)."""
        return {
            "mse": (self._recon_loss(xs, xs_hat) if mse is None else mse).detach(),
            "l0": (f != 0).float().sum(-1).mean().detach(),
        }

    def _warmup(self, step: int, total_steps: int) -> float:
        """Linear warm-up factor in [0, 1] for the sparsity coefficient (host arithmetic, no sync)."""
        n = self.cfg.l1_warmup_steps
        if n is None:
            n = int(0.05 * total_steps)  # Anthropic April 2024 update: first 5% of training
        return 1.0 if n <= 0 else min(1.0, (step + 1) / n)

    def _init_linear(self, generator: torch.Generator | None, decoder_norm: float = 1.0) -> None:
        """Decoder rows random directions of norm ``decoder_norm``; encoder = decoder transpose.

        Encoder-as-decoder-transpose init: Gao et al. 2024 ("Preventing dead latents") and the Anthropic April 2024 update.
        """
        d_in, d_sae = self.cfg.d_in, self.cfg.d_sae
        W = torch.randn(d_sae, d_in, generator=generator, dtype=torch.float32)
        W = W / W.norm(dim=-1, keepdim=True) * decoder_norm
        dt = self._init_dtype
        self.W_dec = nn.Parameter(W.to(dt))  # [d_sae, d_in]
        self.W_enc = nn.Parameter(W.t().contiguous().to(dt))  # [d_in, d_sae]
        self.b_dec = nn.Parameter(torch.zeros(d_in, dtype=dt))
        self.b_enc = nn.Parameter(torch.zeros(d_sae, dtype=dt))


ARCHS: dict[str, Callable[[SAEConfig, torch.Generator | None], SAE]] = {}


def register(name: str) -> Callable[[type[SAE]], type[SAE]]:
    """Class decorator adding an architecture to ``ARCHS`` under ``name``."""

    def deco(cls: type[SAE]) -> type[SAE]:
        cls.arch = name
        ARCHS[name] = cls  # type: ignore[assignment]
        return cls

    return deco


def make_sae(cfg: SAEConfig, seed: int | None = None) -> SAE:
    """Build the SAE ``cfg.arch`` describes; ``seed`` makes the initialisation reproducible."""
    if cfg.arch not in ARCHS:
        raise UserError(f"sae.arch: {cfg.arch!r} is not an architecture (allowed: {', '.join(sorted(ARCHS))})")
    cfg.check()
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    return ARCHS[cfg.arch](cfg, gen)
