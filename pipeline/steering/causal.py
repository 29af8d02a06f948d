"""The forward passes behind the likelihood evidence: steered and ablated next-token distributions.

Every pass is one teacher-forced forward of the whole model (no generation) over rows of held-out
text, each row with its own edit at the hook (:class:`RowEdit`), batched across methods, coefficients
and texts. Padding and the tokenizer's BOS/EOS/PAD positions are never edited and never averaged
(as ``evaluate`` and the generation protocol leave them out). The metrics are the pure functions of
:mod:`pipeline.steering.likelihood`.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from pipeline.hooks import intervene
from pipeline.metrics import special_mask
from pipeline.site import Site, as_site, edit_site
from pipeline.steering.generate import _positions, left_pad
from pipeline.steering.interventions import SAELike
from pipeline.steering.likelihood import lexicon_logmass, selectivity, target_logprob

__all__ = ["Texts", "texts_batch", "RowEdit", "SteerGrid", "steer_grid", "clean_logp", "Ablation", "AblationGrid", "ablate_grid", "hidden_norm"]


@dataclass
class Texts:
    """Held-out texts, left-padded to one width so a text has the same layout in every batch."""

    ids: Tensor  # [U, T] int64
    mask: Tensor  # [U, T] 1 = real token
    frozen: Tensor  # [U, T] bool: padding or special token: never edited
    pred: Tensor  # [U, T] bool: positions whose next-token distribution is averaged
    target: Tensor  # [U, T] int64: the next token (-1 = none)
    tvalid: Tensor  # [U, T] bool: pred and the next token is a real, non-special token

    def __len__(self) -> int:
        return int(self.ids.shape[0])


def texts_batch(seqs: list[list[int]], special_ids: Collection[int], device: torch.device | str = "cpu") -> Texts:
    b = left_pad(seqs, 0, device)
    frozen = ~b.attention_mask.bool() | special_mask(b.input_ids, special_ids)
    target = torch.cat([b.input_ids[:, 1:], torch.full_like(b.input_ids[:, :1], -1)], 1)
    tvalid = torch.cat([~frozen[:, 1:], torch.zeros_like(frozen[:, :1])], 1) & ~frozen
    return Texts(b.input_ids, b.attention_mask, frozen, ~frozen, target, tvalid)


class RowEdit:
    """Hook function: row ``b`` of ``h [B, T, d]`` gets ``h + add[b]``; a latent set to ``latent_value[b]``
    (``latent[b] >= 0``; the SAE error kept, i.e. ``h + (v - f_i(h)) * W_dec[i]``, exact for the SAE's
    linear decoder); and/or its component along the unit ``direction[b]`` set to ``direction_value[b]``
    (not NaN): 0 projects the direction out, a mean value mean-ablates it. ``frozen [B, T]`` positions
    are left alone. For a transcoder (:mod:`pipeline.site`) ``h`` is the MLP output and the latent is read from the
    MLP input ``src`` of the same forward; the directions act on ``h``."""

    def __init__(self, frozen: Tensor, add: Tensor | None = None, sae: SAELike | None = None,
                 latent: Tensor | None = None, latent_value: Tensor | None = None,
                 direction: Tensor | None = None, direction_value: Tensor | None = None):
        self.frozen, self.add, self.sae = frozen, add, sae
        self.latent, self.latent_value = latent, latent_value
        self.direction, self.direction_value = direction, direction_value

    def __call__(self, h: Tensor, src: Tensor | None = None) -> Tensor:
        x = h.float()  # [B, T, d]; edits in float32, cast back once
        y = x if self.add is None else x + self.add.to(x.device, torch.float32)[:, None]
        if self.latent is not None and self.sae is not None:
            rows = self.latent >= 0  # [B]
            if bool(rows.any()):
                lat = self.latent[rows]
                f = self.sae.encode((x if src is None else src.float())[rows])  # [r, T, d_sae]
                fi = f.gather(-1, lat[:, None, None].expand(-1, f.shape[1], 1)).squeeze(-1).float()  # [r, T]
                w = self.sae.W_dec[lat].float()  # [r, d]
                y = y.clone()
                y[rows] += (self.latent_value[rows].float()[:, None] - fi)[..., None] * w[:, None]  # type: ignore[index]
        if self.direction is not None and self.direction_value is not None:
            rows = ~torch.isnan(self.direction_value)
            if bool(rows.any()):
                u = self.direction[rows].float()  # [r, d] unit
                proj = (x[rows] * u[:, None]).sum(-1)  # [r, T]
                y = y.clone()
                y[rows] -= (proj - self.direction_value[rows][:, None])[..., None] * u[:, None]
        return torch.where(self.frozen[:, :, None].to(h.device), x, y).to(h.dtype)


def _logits(model: nn.Module, ids: Tensor, mask: Tensor, hook: str | Site, edit: RowEdit | None) -> Tensor:
    """Next-token logits (shape: [B, T, V], float32) with ``edit`` at ``hook`` (a transcoder's site: its write hook)."""
    def run() -> Tensor:
        return model(input_ids=ids, attention_mask=mask, position_ids=_positions(mask), use_cache=False).logits
    if edit is None:
        return run().float()
    with edit_site(model, hook, edit):
        return run().float()


def _logp(model: nn.Module, ids: Tensor, mask: Tensor, hook: str | Site, edit: RowEdit | None) -> Tensor:
    """Next-token log-probabilities (shape: [B, T, V], float32) with ``edit`` at ``hook``."""
    return torch.log_softmax(_logits(model, ids, mask, hook, edit), -1)


@torch.no_grad()
def hidden_norm(model: nn.Module, hook: str | Site, texts: Texts) -> float:
    """Mean L2 norm of the hook's hidden state over the texts' editable positions: the unit of the
    steering coefficients (a coefficient of 0.5 adds a vector half as long as a typical hidden state).
    For a transcoder's site, of the write hook's (the MLP output: where the vectors are added)."""
    seen: dict[str, Tensor] = {}

    def record(h: Tensor) -> Tensor:
        seen["h"] = h
        return h
    with intervene(model, as_site(hook).write, record):
        model(input_ids=texts.ids, attention_mask=texts.mask, position_ids=_positions(texts.mask), use_cache=False)
    n = seen["h"].float().norm(dim=-1)  # [U, T]
    return float(n[~texts.frozen].mean())


@dataclass
class SteerGrid:
    effect: np.ndarray  # [R, U] lik_effect per (row vector, text)
    kl: np.ndarray  # [R, U]
    dloss: np.ndarray  # [R, U]


@torch.no_grad()
def steer_grid(model: nn.Module, hook: str | Site, texts: Texts, vectors: Tensor, lexicon: Tensor,
               base_logp: Tensor, batch_rows: int = 64) -> SteerGrid:
    """Every additive vector on every text: concept effect, KL and loss change against the base pass.

    :param vectors: additive vectors (shape: [R, d_in], float32); :param lexicon: the concept's token ids
    :param base_logp: the unedited pass's log-probabilities of the texts (shape: [U, T, V])
    """
    R, U = vectors.shape[0], len(texts)
    pred, tv = texts.pred.float(), texts.tvalid.float()
    base_mass = lexicon_logmass(base_logp, lexicon)  # [U, T]
    base_t = target_logprob(base_logp, texts.target)  # [U, T]
    # KL(p || q) = sum p log p - sum p * logits_q + logsumexp(logits_q): no [b, T, V] log-softmax of the
    # steered pass is materialised (the vocabulary-wide passes cost as much as the model's forward on CPU).
    base_p = base_logp.exp()  # [U, T, V]
    base_negent = (base_p * base_logp).sum(-1)  # [U, T]
    lex = lexicon.to(base_logp.device)
    out = {k: np.zeros(R * U) for k in ("effect", "kl", "dloss")}
    pairs = [(r, u) for r in range(R) for u in range(U)]
    for s in range(0, len(pairs), batch_rows):
        r_idx = torch.tensor([r for r, _ in pairs[s:s + batch_rows]])
        u_idx = torch.tensor([u for _, u in pairs[s:s + batch_rows]])
        edit = RowEdit(texts.frozen[u_idx], add=vectors[r_idx])
        lg = _logits(model, texts.ids[u_idx], texts.mask[u_idx], hook, edit)  # [b, T, V]
        lse = torch.logsumexp(lg, -1)  # [b, T]
        p, t = pred[u_idx], tv[u_idx]
        mass = torch.logsumexp(lg.index_select(-1, lex), -1) - lse
        eff = ((mass - base_mass[u_idx]) * p).sum(-1) / p.sum(-1).clamp(min=1)
        kl_pos = base_negent[u_idx] - torch.einsum("btv,btv->bt", base_p[u_idx], lg) + lse
        kl = (kl_pos * p).sum(-1) / p.sum(-1).clamp(min=1)
        tlp = target_logprob(lg, texts.target[u_idx]) - lse
        dl = ((base_t[u_idx] - tlp) * t).sum(-1) / t.sum(-1).clamp(min=1)
        for k, v in (("effect", eff), ("kl", kl), ("dloss", dl)):
            out[k][s:s + len(r_idx)] = v.double().cpu().numpy()
    return SteerGrid(*(out[k].reshape(R, U) for k in ("effect", "kl", "dloss")))


@torch.no_grad()
def clean_logp(model: nn.Module, texts: Texts, batch_rows: int = 64) -> Tensor:
    """The unedited pass (shape: [U, T, V], float32)."""
    return torch.cat([_logp(model, texts.ids[s:s + batch_rows], texts.mask[s:s + batch_rows], "", None)
                      for s in range(0, len(texts), batch_rows)])


@dataclass
class Ablation:
    """One ablation variant: a latent set to a value, or a unit direction's component set to a value."""

    name: str
    latent: int = -1
    value: float = 0.0
    direction: Tensor | None = None  # [d_in] unit, float32


@dataclass
class AblationGrid:
    selectivity: np.ndarray  # [A, W] abl_selectivity per (variant, window)
    dloss: np.ndarray  # [A, W] mean change of the next-token loss over all valid targets


@torch.no_grad()
def ablate_grid(model: nn.Module, hook: str | Site, sae: SAELike, texts: Texts, variants: list[Ablation],
                lexicon: Tensor, batch_rows: int = 16) -> AblationGrid:
    """Every ablation variant on every held-out window of the concept's documents."""
    A, W, d = len(variants), len(texts), sae.W_dec.shape[1]
    base = torch.cat([target_logprob(_logp(model, texts.ids[s:s + batch_rows], texts.mask[s:s + batch_rows], hook, None),
                                     texts.target[s:s + batch_rows]) for s in range(0, W, batch_rows)])  # [W, T]
    is_lex = torch.isin(texts.target, lexicon.to(texts.target.device)).cpu().numpy()
    valid = texts.tvalid.cpu().numpy()
    sel, dls = np.full(A * W, np.nan), np.full(A * W, np.nan)
    pairs = [(a, w) for a in range(A) for w in range(W)]
    for s in range(0, len(pairs), batch_rows):
        chunk = pairs[s:s + batch_rows]
        a_idx, w_idx = [a for a, _ in chunk], torch.tensor([w for _, w in chunk])
        vs = [variants[a] for a in a_idx]
        latent = torch.tensor([v.latent for v in vs])
        dirs = torch.stack([v.direction if v.direction is not None else torch.zeros(d) for v in vs])
        dval = torch.tensor([v.value if v.direction is not None else float("nan") for v in vs])
        edit = RowEdit(texts.frozen[w_idx], sae=sae, latent=latent, latent_value=torch.tensor([v.value for v in vs]),
                       direction=dirs, direction_value=dval)
        lg = _logits(model, texts.ids[w_idx], texts.mask[w_idx], hook, edit)  # [b, T, V]
        lp = target_logprob(lg, texts.target[w_idx]) - torch.logsumexp(lg, -1)  # no full log-softmax
        drop = (base[w_idx] - lp).double().cpu().numpy()  # [b, T]
        for i, w in enumerate(w_idx.tolist()):
            sel[s + i] = selectivity(drop[i], is_lex[w], valid[w])
            dls[s + i] = drop[i][valid[w]].mean() if valid[w].any() else np.nan
    return AblationGrid(sel.reshape(A, W), dls.reshape(A, W))
