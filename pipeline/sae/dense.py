"""Dense (undercomplete) autoencoder baseline: an MLP with a narrow bottleneck, reconstruction loss only.

input -> 128 -> 32 -> 128 -> output by default (``cfg.hidden_sizes``); ReLU after every hidden layer
except the bottleneck, which is the linear code returned by ``encode`` (d_sae = its width). The
classic comparison point for sparse dictionaries (Hinton & Salakhutdinov 2006, "Reducing the
dimensionality of data with neural networks"): it compresses, but its code is dense and its
decoder is nonlinear, so it has **no dictionary**: ``W_dec`` and ``feature_directions()`` raise
:class:`NoDictionaryError`; check ``sae.has_dictionary`` first.
"""

from __future__ import annotations

import math
from typing import cast

import torch
from torch import Tensor, nn

from pipeline.errors import UserError
from pipeline.sae.base import SAE, register
from pipeline.sae.config import SAEConfig


class NoDictionaryError(UserError):
    """The architecture has no linear dictionary (feature directions)."""


def _linear(d_in: int, d_out: int, dtype: torch.dtype, gen: torch.Generator | None) -> nn.Linear:
    """nn.Linear with PyTorch's default U(-1/sqrt(fan_in), 1/sqrt(fan_in)) init, drawn from ``gen``."""
    lin = nn.Linear(d_in, d_out, dtype=dtype)
    bound = 1.0 / math.sqrt(d_in)
    with torch.no_grad():
        lin.weight.copy_(torch.rand(d_out, d_in, generator=gen) * 2 * bound - bound)
        lin.bias.copy_(torch.rand(d_out, generator=gen) * 2 * bound - bound)
    return lin


@register("dense")
class DenseAutoencoder(SAE):
    has_dictionary = False
    default_apply_b_dec = False
    init_b_dec_median = False

    def __init__(self, cfg: SAEConfig, generator: torch.Generator | None = None) -> None:
        super().__init__(cfg)
        widths = [cfg.d_in, *cfg.hidden_sizes, cfg.d_in]
        code = 1 + cfg.hidden_sizes.index(min(cfg.hidden_sizes))  # index of the bottleneck in widths
        enc: list[nn.Module] = []
        dec: list[nn.Module] = []
        for i in range(len(widths) - 1):
            layers = enc if i < code else dec
            layers.append(_linear(widths[i], widths[i + 1], self._init_dtype, generator))
            if i + 1 not in (code, len(widths) - 1):  # no ReLU on the code nor on the output
                layers.append(nn.ReLU())
        self.encoder = nn.Sequential(*enc)
        self.decoder = nn.Sequential(*dec)

    encoder: nn.Sequential
    decoder: nn.Sequential

    def _first(self) -> nn.Linear:
        return cast(nn.Linear, self.encoder[0])

    def _last(self) -> nn.Linear:
        return cast(nn.Linear, self.decoder[-1])

    @property
    def W_dec(self) -> Tensor:  # type: ignore[override]
        raise NoDictionaryError("sae arch 'dense' has no dictionary: its decoder is a nonlinear MLP (no W_dec)")

    @property
    def b_dec(self) -> Tensor:  # type: ignore[override]
        return self._last().bias  # output bias

    def feature_directions(self) -> Tensor:
        raise NoDictionaryError("sae arch 'dense' has no dictionary: it has no feature directions")

    def _encode_scaled(self, xs: Tensor) -> Tensor:
        return self.encoder(xs)

    def _decode_scaled(self, f: Tensor) -> Tensor:
        return self.decoder(f)


    @torch.no_grad()
    def fold_scaling(self) -> None:
        """First layer sees s·x: scale its weight by s; last layer's output is divided by s."""
        s = self.cfg.scaling_factor
        if s == 1.0:
            return
        self._first().weight.mul_(s)
        last = self._last()
        last.weight.div_(s)
        last.bias.div_(s)
        self.cfg.scaling_factor = 1.0
