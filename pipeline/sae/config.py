"""``SAEConfig``: everything needed to rebuild an SAE, JSON-serialisable (``cfg.json``).

One flat dataclass for all architectures; fields that an architecture does not use are ignored by
it (and documented as such). The training loop's own knobs (lr, batch size, schedule) live in
``pipeline.params.sae.TrainParams``; the ones here change the *model* or its *loss*.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from pipeline.errors import UserError
from pipeline.params.sae import SAEKnobs, SAEParams

DTYPES = ("float32", "float64", "bfloat16", "float16")
RECIPES = ("2024", "2023")
LEGACY_KEYS = ("dead_after_tokens",)  # cfg.json keys of older versions, ignored on load (see from_dict)


@dataclass(kw_only=True)
class SAEConfig(SAEKnobs):
    """The :class:`SAEKnobs` (``arch``, ``k``, ``l1_coeff``, ...: defined and documented once, in
    ``pipeline/params/sae.py``) plus what only a built SAE has: its widths, hook, dtype and input scale, and
    the architecture constants no params key sets."""

    d_in: int
    """Width of the input activation (d_model of the hook)."""
    d_sae: int
    """Number of latents (for 'dense': width of the bottleneck code)."""
    hook: str = ""
    """Hook the SAE was trained on, e.g. ``layers.9.resid_post`` (a transcoder: the hook it reads, ``layers.{i}.mlp_in``)."""
    hook_out: str = ""
    """transcoder: the hook it predicts, ``layers.{i}.mlp_out`` ("" for an SAE, and then left out of ``cfg.json``)."""
    dtype: str = "float32"
    """Parameter dtype."""
    scaling_factor: float = 1.0
    """Inputs are multiplied by this before encoding (and outputs divided by it) so that
    E||x||^2 = d_in during training (Anthropic, April 2024 update). ``save_sae`` folds it into the
    weights, so a saved SAE has 1.0 and works on raw activations."""
    target_scaling_factor: float = 1.0
    """transcoder: targets (MLP outputs) are multiplied by this in the loss (and predictions divided by it), so that
    E||y||^2 = d_in; folded into the weights on save like ``scaling_factor``."""
    apply_b_dec_to_input: bool | None = None
    """Subtract ``b_dec`` from the input before encoding. None: the architecture's default
    (False for relu_l1 recipe 2024 and kl, True otherwise)."""
    init_decoder_norm: float = 0.1
    """relu_l1 2024: initial norm of decoder rows (Anthropic: 'fixed L2 norm of 0.05 to 1')."""
    max_resamples: int = 4
    """relu_l1 2023: number of resamplings (Towards Monosemanticity: four)."""
    threshold_decay: float = 0.99
    """batchtopk: EMA decay of the inference threshold estimate."""

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Cross-field rules; a violation raises :class:`UserError` naming the field. (Whether ``arch`` names a
        registered architecture is checked where one is built: ``pipeline.sae.make_sae``.)"""
        for name in ("d_in", "d_sae", "k", "resample_every"):
            if int(getattr(self, name)) < 1:
                raise UserError(f"sae config {name}: {getattr(self, name)!r} must be >= 1")
        if self.dtype not in DTYPES:
            raise UserError(f"sae config dtype: {self.dtype!r} is not allowed (allowed: {', '.join(DTYPES)})")
        if self.recipe not in RECIPES:
            raise UserError(f"sae config recipe: {self.recipe!r} is not allowed (allowed: {', '.join(RECIPES)})")
        if self.arch in ("topk", "batchtopk", "matryoshka_batchtopk", "transcoder") and self.k > self.d_sae:
            raise UserError(f"sae config k: {self.k} exceeds d_sae={self.d_sae}")
        if self.arch == "matryoshka_batchtopk":
            self._check_matryoshka()
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

    def _check_matryoshka(self) -> None:
        fr = self.matryoshka_fractions
        if not fr or min(fr) <= 0 or not math.isclose(sum(fr), 1.0, rel_tol=1e-6):
            raise UserError(f"sae config matryoshka_fractions: {fr!r} must be positive shares summing to 1")
        sizes = [int(f * self.d_sae) for f in fr[:-1]]
        if min(sizes + [self.d_sae - sum(sizes)]) < 1:
            raise UserError(f"sae config matryoshka_fractions: {fr!r} leaves an empty group at d_sae={self.d_sae}")
        for name, allowed in (("matryoshka_weighting", ("dictionary_learning", "bussmann", "saelens")),
                              ("matryoshka_auxk", ("full", "per_level"))):
            if getattr(self, name) not in allowed:
                raise UserError(f"sae config {name}: {getattr(self, name)!r} is not allowed (allowed: {', '.join(allowed)})")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if not d["hook_out"]:  # an SAE's cfg.json and training fingerprint stay what they were
            del d["hook_out"]
        return d

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
    knobs = {f.name: copy.deepcopy(getattr(params, f.name)) for f in dataclasses.fields(SAEKnobs)}  # every knob, as set
    d_sae = min(params.hidden_sizes) if params.arch == "dense" else params.expansion * d_in
    return SAEConfig(**knobs, d_in=d_in, d_sae=d_sae, hook=hook)
