"""``SAEConfig``: everything needed to rebuild an SAE, JSON-serialisable (``cfg.json``).

One flat dataclass for all architectures; fields that an architecture does not use are ignored by
it (and documented as such). The training loop's own knobs (lr, batch size, schedule) live in
``pipeline.params.sae.TrainParams``; the ones here change the *model* or its *loss*.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pipeline.errors import UserError

if TYPE_CHECKING:
    from pipeline.params.sae import SAEParams

DTYPES = ("float32", "float64", "bfloat16", "float16")
RECIPES = ("2024", "2023")
LEGACY_KEYS = ("dead_after_tokens",)  # cfg.json keys of older versions, ignored on load (see from_dict)


@dataclass
class SAEConfig:
    arch: str
    """Architecture name, a key of ``pipeline.sae.ARCHS``."""
    d_in: int
    """Width of the input activation (d_model of the hook)."""
    d_sae: int
    """Number of latents (for 'dense': width of the bottleneck code)."""
    hook: str = ""
    """Hook the SAE was trained on, e.g. ``layers.9.resid_post``."""
    dtype: str = "float32"
    """Parameter dtype."""
    scaling_factor: float = 1.0
    """Inputs are multiplied by this before encoding (and outputs divided by it) so that
    E||x||^2 = d_in during training (Anthropic, April 2024 update). ``save_sae`` folds it into the
    weights, so a saved SAE has 1.0 and works on raw activations."""
    apply_b_dec_to_input: bool | None = None
    """Subtract ``b_dec`` from the input before encoding. None: the architecture's default
    (False for relu_l1 recipe 2024 and kl, True otherwise)."""

    # relu_l1 and gated
    recipe: str = "2024"
    """relu_l1 only: '2024' (Anthropic April 2024 update) or '2023' (Towards Monosemanticity)."""
    l1_coeff: float = 5.0
    """Sparsity coefficient lambda of the L1 penalty (relu_l1, gated)."""
    l1_warmup_steps: int | None = None
    """Linear warm-up of lambda from 0; None: 5% of training (Anthropic April 2024 update)."""
    init_decoder_norm: float = 0.1
    """relu_l1 2024: initial norm of decoder rows (Anthropic: 'fixed L2 norm of 0.05 to 1')."""
    resample_every: int = 25_000
    """relu_l1 2023: steps between dead-neuron resamplings (Towards Monosemanticity: 25k, 50k, ...)."""
    max_resamples: int = 4
    """relu_l1 2023: number of resamplings (Towards Monosemanticity: four)."""

    # topk and batchtopk
    k: int = 32
    """Active latents per token (topk), mean active latents per token (batchtopk)."""
    k_aux: int | None = None
    """AuxK: dead latents used to model the residual; None: min(d_in // 2, d_sae)."""
    aux_coeff: float = 1 / 32
    """AuxK coefficient alpha (Gao et al. 2024, AuxK appendix: 1/32)."""
    threshold_decay: float = 0.99
    """batchtopk: EMA decay of the inference threshold estimate."""

    # jumprelu
    jumprelu_init_threshold: float = 0.001
    """Initial threshold theta (Rajamanoharan et al. 2024b, training details: 0.001)."""
    jumprelu_bandwidth: float = 0.001
    """Kernel bandwidth epsilon of the straight-through estimator (ibid.: 0.001)."""
    l0_coeff: float = 1.0
    """JumpReLU L0 penalty coefficient lambda (warmed up like l1_coeff)."""

    # kl
    target_rate: float = 0.05
    """kl: target mean activation rho of each sigmoid unit (Ng, CS294A notes)."""
    kl_coeff: float = 3.0
    """kl: weight beta of the sum of KL(rho || rho_hat_j) penalties (Ng uses beta = 3)."""

    # dense
    hidden_sizes: list[int] = field(default_factory=lambda: [128, 32, 128])
    """dense: hidden layer widths input -> ... -> output; the narrowest is the code (d_sae)."""

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Cross-field rules; a violation raises :class:`UserError` naming the field."""
        from pipeline.sae.base import ARCHS  # registry is filled when pipeline.sae is imported

        if ARCHS and self.arch not in ARCHS:
            raise UserError(f"sae.arch: {self.arch!r} is not an architecture (allowed: {', '.join(sorted(ARCHS))})")
        for name in ("d_in", "d_sae", "k", "resample_every"):
            if int(getattr(self, name)) < 1:
                raise UserError(f"sae config {name}: {getattr(self, name)!r} must be >= 1")
        if self.dtype not in DTYPES:
            raise UserError(f"sae config dtype: {self.dtype!r} is not allowed (allowed: {', '.join(DTYPES)})")
        if self.recipe not in RECIPES:
            raise UserError(f"sae config recipe: {self.recipe!r} is not allowed (allowed: {', '.join(RECIPES)})")
        if self.arch in ("topk", "batchtopk") and self.k > self.d_sae:
            raise UserError(f"sae config k: {self.k} exceeds d_sae={self.d_sae}")
        if not 0.0 < self.target_rate < 1.0:
            raise UserError(f"sae config target_rate: {self.target_rate!r} must be in (0, 1)")
        if not 0.0 <= self.threshold_decay < 1.0:
            raise UserError(f"sae config threshold_decay: {self.threshold_decay!r} must be in [0, 1)")
        if not self.scaling_factor > 0:
            raise UserError(f"sae config scaling_factor: {self.scaling_factor!r} must be > 0")
        if self.arch == "dense":
            if not self.hidden_sizes or min(self.hidden_sizes) < 1:
                raise UserError(f"sae config hidden_sizes: {self.hidden_sizes!r} must be positive widths")
            if self.d_sae != min(self.hidden_sizes):
                raise UserError(f"sae config d_sae: {self.d_sae} must equal the dense bottleneck "
                                f"min(hidden_sizes)={min(self.hidden_sizes)}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "cfg.json") -> SAEConfig:
        """Build from a dict (e.g. ``cfg.json``); unknown keys or bad values raise :class:`UserError`."""
        names = {f.name for f in dataclasses.fields(cls)}
        # Files written before the trainer owned the dead-latent record carry its window here too (a copy of
        # train.dead_window_tokens, which the training params keep): not a property of the SAE.
        data = {k: v for k, v in data.items() if k not in LEGACY_KEYS}
        unknown = sorted(set(data) - names)
        if unknown:
            raise UserError(f"{source}: unknown SAE config keys {unknown}")
        try:
            return cls(**data)
        except TypeError as e:
            raise UserError(f"{source}: invalid SAE config ({e})") from None


def config_from_params(params: SAEParams, d_in: int, hook: str = "") -> SAEConfig:
    """``SAEConfig`` for a hook of width ``d_in`` from the ``sae`` params section (``SAEParams``).

    For 'dense', d_sae is the bottleneck width; otherwise ``expansion * d_in``.
    """
    p = params
    d_sae = min(p.hidden_sizes) if p.arch == "dense" else p.expansion * d_in
    kw: dict[str, Any] = dict(
        arch=p.arch, d_in=d_in, d_sae=d_sae, hook=hook, recipe=p.recipe, k=p.k,
        l1_coeff=p.l1_coeff, l1_warmup_steps=p.l1_warmup_steps, resample_every=p.resample_every, l0_coeff=p.l0_coeff,
        jumprelu_bandwidth=p.jumprelu_bandwidth, jumprelu_init_threshold=p.jumprelu_init_threshold,
        aux_coeff=p.aux_coeff, k_aux=p.k_aux, target_rate=p.target_rate, kl_coeff=p.kl_coeff,
        hidden_sizes=list(p.hidden_sizes),
    )
    return SAEConfig(**kw)
