"""Interventions at an SAE's hook: addition, clamping and ablation, one setting per batch row.

All three edit the hooked hidden state ``h [B, T, d_model]`` inside the forward pass (through
:func:`pipeline.hooks.intervene`), so they work for scoring forwards and for KV-cache generation:

- addition: ``h + a * m_f * W_dec[f]`` — the feature's own write at ``a`` times its scale m_f
  (activation-addition steering, Turner et al. 2023, with an SAE decoder row as the direction).
  With a unit-norm decoder row this is ``a * m_f * d_f``; when the SAE's input scaling is folded
  into its weights (``pipeline.sae``) the row's norm carries that scale, so ``a = 1`` always means
  "as much as the feature writes when it fires at m_f".
- clamping: encode ``f = E(h)``, set ``f_i = c * m_f``, write back ``D(f') + (h - D(f))``: the SAE's
  error term is kept, so only feature i changes (Templeton et al. 2024, *Scaling Monosemanticity*,
  "Feature steering").
- ablation: clamping with ``c = 0``.

A transcoder (:mod:`pipeline.site`) reads block i's MLP input and writes its MLP output: there the edits act on
the MLP output ``h`` and the latents come from the MLP input ``x`` of the same forward (``src``): addition adds
the decoder row to ``h``; clamping writes ``h + D(f') - D(f)`` with ``f = E(x)`` (the error term kept, as above).

Each row of a batch carries its own additive vector and/or clamp value, so all coefficients and
methods for one prompt run in one batch. A position counter handles KV-cache generation, where the
hook sees the (left-padded) prompt once and then one position per step.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from pipeline.site import Site, edit_site

__all__ = ["SAELike", "RowSteering", "feature_write", "steer", "clamp_feature"]


class SAELike(Protocol):
    """What steering needs of an SAE (``pipeline.sae.SAE`` satisfies it)."""

    @property
    def W_dec(self) -> Tensor: ...  # [d_sae, d_in]

    def encode(self, x: Tensor) -> Tensor: ...  # [..., d_in] -> [..., d_sae]

    def decode(self, f: Tensor) -> Tensor: ...  # [..., d_sae] -> [..., d_in]


def feature_write(sae: SAELike, feature: int, scale: float) -> Tensor:
    """``m_f * W_dec[f]`` (shape: [d_in], float32): the feature's write when it fires at its scale."""
    return sae.W_dec[feature].detach().float() * float(scale)


def clamp_feature(sae: SAELike, x: Tensor, feature: int, value: Tensor, src: Tensor | None = None) -> Tensor:
    """Set ``feature`` to ``value`` keeping the SAE error term: ``D(f') + (x - D(f))``.

    :param x: hidden states (shape: [N, T, d_in], float32)
    :param value: target activation per row (shape: [N])
    :param src: a transcoder's input, the MLP input of the same forward (shape: [N, T, d_in]); then ``x`` is the
        MLP output and the result ``x + D(f') - D(f)`` with ``f = E(src)``
    :return: edited hidden states (shape: [N, T, d_in])
    """
    f = sae.encode(x if src is None else src)  # [N, T, d_sae]
    f2 = f.clone()
    f2[..., feature] = value.to(f2.dtype)[:, None]
    if src is not None:
        return x + (sae.decode(f2) - sae.decode(f))
    err = x - sae.decode(f)  # what the SAE does not explain stays untouched
    return sae.decode(f2) + err


class RowSteering:
    """The hook function: row ``b`` gets ``h + add[b]`` and, where ``clamp[b]`` is not NaN, the
    feature clamped to ``clamp[b]`` (error kept). Positions before ``start`` are left alone.

    Positions are counted across calls (prefill of T tokens, then one per generation step); call
    :meth:`reset` before each new forward/generation. The first call's input and output are kept
    (``first_in``, ``first_out``; for a transcoder also its input ``first_src``) so side effects on the prompt can
    be measured without another pass.
    ``frozen`` marks single positions left alone as well (ablation keeps special tokens' activations,
    as ``evaluate`` does when it splices).
    """

    def __init__(self, sae: SAELike | None, feature: int | None, add: Tensor | None = None,
                 clamp: Tensor | None = None, start: int = 0, frozen: Tensor | None = None):
        """
        :param add: additive vectors (shape: [B, d_in]) or None
        :param clamp: clamp values (shape: [B], NaN = row not clamped) or None
        :param start: first position (in padded coordinates) that is edited
        :param frozen: positions never edited (shape: [B, T0], bool, padded coordinates; positions past
            T0, e.g. generated ones, are not frozen) or None
        """
        if clamp is not None and (sae is None or feature is None):
            raise ValueError("clamping needs an SAE and a feature")
        self.sae, self.feature, self.add, self.clamp, self.start = sae, feature, add, clamp, start
        self.frozen = frozen
        self.offset = 0
        self.first_in: Tensor | None = None
        self.first_out: Tensor | None = None
        self.first_src: Tensor | None = None

    def reset(self, start: int | None = None) -> None:
        self.offset = 0
        self.first_in = self.first_out = self.first_src = None
        if start is not None:
            self.start = start

    def __call__(self, h: Tensor, src: Tensor | None = None) -> Tensor:
        """``h [B, T, d]`` at the write hook; ``src [B, T, d]`` a transcoder's input of the same forward (else None)."""
        B, T, _ = h.shape
        pos = torch.arange(self.offset, self.offset + T, device=h.device)  # [T]
        mask = (pos >= self.start)[None].expand(B, T)  # [B, T]
        if self.frozen is not None and self.offset < self.frozen.shape[1]:
            fz = self.frozen[:, self.offset: self.offset + T].to(h.device)  # [B, <= T]
            mask = mask & ~torch.cat([fz, fz.new_zeros(B, T - fz.shape[1])], 1)
        self.offset += T
        if not bool(mask.any()):
            out = h
        else:
            x = h.float()  # [B, T, d]; edits in float32, cast back once
            y = x
            if self.add is not None:
                y = y + self.add.to(x.device, torch.float32)[:, None, :]
            if self.clamp is not None:
                rows = ~torch.isnan(self.clamp)
                if bool(rows.any()):
                    y = y.clone()
                    y[rows] = clamp_feature(self.sae, y[rows], self.feature, self.clamp[rows].to(x.device),  # type: ignore[arg-type]
                                            None if src is None else src[rows].float())
            out = torch.where(mask[:, :, None], y, x).to(h.dtype)
        if self.first_in is None:
            self.first_in, self.first_out = h.detach(), out.detach()
            self.first_src = None if src is None else src.detach()
        return out


@contextmanager
def steer(model: nn.Module, hook: str | Site, steering: RowSteering | None, start: int | None = None) -> Iterator[Any]:
    """Apply ``steering`` at ``hook`` (a transcoder's :class:`~pipeline.site.Site`: at its write hook, with its
    read hook's state) for the duration of the block (no-op when None)."""
    if steering is None:
        yield None
        return
    steering.reset(start)
    with edit_site(model, hook, steering):
        yield steering
