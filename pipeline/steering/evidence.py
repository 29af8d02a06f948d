"""Likelihood evidence for every concept: which latents, the steering and ablation grids (forward passes).

For every corpus label (a *concept*): its lexicon (:mod:`pipeline.steering.lexicon`, train split), then

- **latents**: ``sae_input``, the latent that best separates the topic on its inputs (interpretation's
  topic AUROC, else this stage's standardised topic contrast on ``steer.stats_split``, as the
  generation protocol chooses); ``sae_output``, the candidate whose addition raises the lexicon's
  log-mass most on the *validation* texts (candidates: the best by the logit lens of the decoder row on
  the lexicon and the best by input selectivity; choosing by output effect steers 2-3x better, Arad et
  al. 2025, arXiv 2505.20063); ``random_latent``, an alive latent of near-equal firing rate to
  ``sae_input`` (seeded), so a frequent latent is not compared with rare ones;
- **steering** on the *test* texts: the unit directions of ``sae_input``, ``sae_output``, ``random_latent``,
  the topic's difference in means (``dim``) and a seeded random direction, each added at
  ``lik_coefficients`` x the mean hidden-state norm; effect, KL and loss change per (coefficient, text);
- **ablation** on held-out (validation) windows of the topic's documents: the latents zero- and
  mean-ablated (SAE error kept), the directions projected out (``zero``) or set to their mean (``mean``).

:mod:`pipeline.steering.decide` turns the grids into matched-cost comparisons and the verdict.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl
import torch
from torch import Tensor, nn

from pipeline.hooks import final_norm_and_unembed
from pipeline.params.analysis import SteerParams
from pipeline.site import Site
from pipeline.steering.baselines import _AUROC_COLS, _TOPIC_COLS, _col, dim_direction, random_direction
from pipeline.steering.causal import (
    Ablation,
    ablate_grid,
    clean_logp,
    hidden_norm,
    steer_grid,
    texts_batch,
)
from pipeline.steering.interventions import SAELike
from pipeline.steering.lexicon import topic_lexicons
from pipeline.steering.protocol import seeded_prompts
from pipeline.steering.stats import FeatureStats

log = logging.getLogger(__name__)

__all__ = ["STEER_ARMS", "ABLATION_ARMS", "ConceptGrids", "Evidence", "run_evidence", "matched_random_latent"]

STEER_ARMS = ("sae_input", "sae_output", "dim", "random_latent", "random_direction")
ABLATION_ARMS = tuple(f"{a}:{k}" for a in STEER_ARMS for k in ("zero", "mean"))


@dataclass
class ConceptGrids:
    concept: str
    lexicon: list[int]
    latents: dict[str, int]  # sae_input, sae_output, random_latent
    output_scores: dict[int, float]  # candidate latent -> mean validation lexicon effect
    effect: np.ndarray  # [M, K+1, U] (coefficient 0 first: zeros)
    kl: np.ndarray  # [M, K+1, U]
    dloss: np.ndarray  # [M, K+1, U]
    ablation: np.ndarray  # [A, W] selectivity (W = 0 when the topic has no held-out window)
    ablation_dloss: np.ndarray  # [A, W]


@dataclass
class Evidence:
    concepts: list[ConceptGrids]
    coefficients: list[float]  # with the leading 0
    hidden_norm: float
    n_texts: dict[str, int]
    notes: list[str] = field(default_factory=list)


def matched_random_latent(fire_count: np.ndarray, target: int, exclude: set[int], min_firing: int, seed: int,
                          pool: int = 16) -> int:
    """A seeded alive latent among the ``pool`` nearest to ``target`` in log firing rate (ties by id)."""
    alive = np.flatnonzero(fire_count >= min_firing)
    alive = np.array([a for a in alive if a not in exclude and a != target], dtype=np.int64)
    if len(alive) == 0:
        return target
    dist = np.abs(np.log(fire_count[alive]) - np.log(max(fire_count[target], 1)))
    near = alive[np.lexsort((alive, dist))[:pool]]
    return int(near[np.random.default_rng(seed).integers(len(near))])


def _input_scores(stats: FeatureStats, interp: pl.DataFrame | None, t: int, alive: np.ndarray) -> np.ndarray:
    """Input-based score of every latent for topic ``t`` (shape: [d_sae]; -inf = not a candidate):
    interpretation's topic AUROC for latents whose best topic it is, else the standardised contrast."""
    topic = stats.topics[t]
    col, tcol = _col(interp, _AUROC_COLS), _col(interp, _TOPIC_COLS)
    score = np.full(len(stats.max_act), -np.inf)
    if col is not None and tcol is not None:
        df = interp.filter((pl.col(tcol) == topic) & pl.col(col).is_not_null())  # type: ignore[union-attr]
        f = df["feature"].to_numpy().astype(np.int64)
        ok = (f < len(score))
        score[f[ok]] = df[col].to_numpy()[ok]
        score[~alive] = -np.inf
        if np.isfinite(score).any():
            return score
    sel = stats.selectivity()[t].astype(np.float64)
    return np.where(alive, sel, -np.inf)


def _top(score: np.ndarray, n: int) -> list[int]:
    idx = np.flatnonzero(np.isfinite(score))
    return [int(i) for i in idx[np.lexsort((idx, -score[idx]))[:n]]]


def _unit(v: Tensor) -> Tensor:
    v = v.detach().float().cpu()
    return v / v.norm().clamp(min=1e-12)


def _with_zero(a: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """[M*K, U] -> [M, K+1, U] with the unsteered coefficient 0 (all zeros) first."""
    a = a.reshape(shape)
    return np.concatenate([np.zeros_like(a[:, :1]), a], 1)


def _windows(contexts: pl.DataFrame, rows: dict[int, int], grid: np.ndarray, t: int, n: int, width: int,
             seed: int) -> tuple[list[list[int]], list[np.ndarray]]:
    """Up to ``n`` seeded validation windows (the first ``width`` tokens of a context) at least half of topic
    ``t``, and per window which targets lie in the topic's documents (shape: [width] bool, target-aligned):
    only those count, so a window that runs into the next document is not scored on it."""
    val = contexts.filter(pl.col("split") == "validation").sort("context_id")
    cands, masks = [], []
    for cid, toks in zip(val["context_id"].to_list(), val["token_ids"].to_list(), strict=True):
        lab = grid[rows[int(cid)], :width]
        if len(toks) >= 2 and (lab == t).mean() >= 0.5:
            cands.append(list(toks[:width]))
            masks.append(np.append(lab[1:] == t, False))  # position i predicts token i + 1
    order = sorted(np.random.default_rng([seed, t]).permutation(len(cands))[:n].tolist())
    return [cands[i] for i in order], [masks[i] for i in order]


def _left_pad_mask(masks: list[np.ndarray], width: int) -> Tensor:
    """Target masks of unequal length, left-padded with False like the token batch (shape: [W, width])."""
    out = torch.zeros(len(masks), width, dtype=torch.bool)
    for i, m in enumerate(masks):
        out[i, width - len(m):] = torch.from_numpy(m)
    return out


@torch.no_grad()
def run_evidence(model: nn.Module, tokenizer: Any, sae: SAELike, hook: str | Site, contexts: pl.DataFrame,
                 stats: FeatureStats, interp: pl.DataFrame | None, rows: dict[int, int], grid: np.ndarray,
                 p: SteerParams, seed: int, special: frozenset[int], bos: bool = True) -> Evidence:
    """Latent choice, steering grid and ablation grid for every concept (see the module docstring); ``hook``: a
    transcoder's :class:`~pipeline.site.Site` steers and ablates at its write hook (``stats`` measured there too)."""
    device = next(model.parameters()).device
    train = contexts.filter(pl.col("split") == "train")
    toks = np.array(train["token_ids"].to_list(), dtype=np.int64).reshape(len(train), -1)
    labs = grid[[rows[int(c)] for c in train["context_id"].to_list()]][:, : toks.shape[1]]
    norm, W_U = final_norm_and_unembed(model)
    lexicons = topic_lexicons(toks, labs, stats.topics, int(W_U.shape[0]), p.lexicon_size, p.lexicon_min_count, special)
    texts = seeded_prompts(list(p.neutral_texts), tokenizer, p.validation_fraction, seed, bos)
    val = texts_batch([q.ids for q in texts if q.split == "validation"], special, device)
    test = texts_batch([q.ids for q in texts if q.split == "test"], special, device)
    rho = hidden_norm(model, hook, test)
    lp_val, lp_test = clean_logp(model, val, p.lik_batch_rows), clean_logp(model, test, p.lik_batch_rows)
    coefs = sorted(float(c) for c in p.lik_coefficients)
    alive = stats.fire_count >= p.min_firing
    # Logit lens of every decoder row on each lexicon: (mean lexicon row - mean vocabulary row) . (g * d).
    g = getattr(norm, "weight", None)
    dec = sae.W_dec.detach().float().cpu()  # [d_sae, d]
    dec_u = dec * (g.detach().float().cpu() if g is not None else 1.0)
    wu = W_U.detach().float().cpu()
    w_mean = wu.mean(0)
    n_all = stats.topic_tokens.sum()
    names = p.concepts or stats.topics
    out: list[ConceptGrids] = []
    notes: list[str] = []
    for name in names:
        if name not in stats.topics:
            notes.append(f"concept {name!r} is not a corpus label: skipped")
            continue
        t = stats.topics.index(name)
        lex = lexicons[name]
        if len(lex) == 0:
            notes.append(f"concept {name!r}: no token reaches steer.lexicon_min_count in its train documents: skipped")
            continue
        has_dim = bool(0 < stats.topic_tokens[t] < n_all)
        if not has_dim:  # a zero direction never reaches a KL budget: 'dim' has no value for this concept
            notes.append(f"concept {name!r}: no tokens in the statistics split: no difference-in-means direction")
        lex_t = torch.from_numpy(lex).to(device)
        inp = _input_scores(stats, interp, t, alive)
        if not np.isfinite(inp).any():
            notes.append(f"concept {name!r}: no alive latent: skipped")
            continue
        sae_in = _top(inp, 1)[0]
        lens = ((wu[torch.from_numpy(lex)].mean(0) - w_mean) @ dec_u.T).numpy().astype(np.float64)  # [d_sae]
        cands = list(dict.fromkeys(_top(np.where(alive, lens, -np.inf), p.output_candidates) + _top(inp, p.output_candidates)))
        mid = coefs[len(coefs) // 2] * rho
        vecs = torch.stack([_unit(dec[c]) * mid for c in cands]).to(device)
        eff = steer_grid(model, hook, val, vecs, lex_t, lp_val, p.lik_batch_rows).effect.mean(1)  # [n_cand]
        scores = {int(c): float(e) for c, e in zip(cands, eff, strict=True)}
        sae_out = max(cands, key=lambda c: (scores[c], -c))
        rand_lat = matched_random_latent(stats.fire_count, sae_in, {sae_in, sae_out}, p.min_firing, seed * 7919 + t)
        units = {"sae_input": _unit(dec[sae_in]), "sae_output": _unit(dec[sae_out]),
                 "dim": torch.from_numpy(dim_direction(stats, name)).float() if has_dim else torch.zeros(dec.shape[1]),
                 "random_latent": _unit(dec[rand_lat]),
                 "random_direction": torch.from_numpy(random_direction(dec.shape[1], seed * 7919 + 104729 + t)).float()}
        vecs = torch.stack([units[m] * c * rho for m in STEER_ARMS for c in coefs]).to(device)  # [M*K, d]
        sg = steer_grid(model, hook, test, vecs, lex_t, lp_test, p.lik_batch_rows)
        shape = (len(STEER_ARMS), len(coefs), len(test))
        latents = {"sae_input": sae_in, "sae_output": sae_out, "random_latent": rand_lat}
        variants = []
        for arm in STEER_ARMS:
            for kind in ("zero", "mean"):
                if arm in latents:
                    f = latents[arm]
                    variants.append(Ablation(f"{arm}:{kind}", latent=f, value=0.0 if kind == "zero" else float(stats.mean[f])))
                else:
                    u = units[arm]
                    mean = float(torch.from_numpy(stats.resid_mean).float() @ u)
                    variants.append(Ablation(f"{arm}:{kind}", value=0.0 if kind == "zero" else mean, direction=u))
        wins, in_topic = _windows(contexts, rows, grid, t, p.ablation_windows, p.ablation_window_tokens, seed)
        if wins:
            tb = texts_batch(wins, special, device)
            tb.tvalid &= _left_pad_mask(in_topic, tb.tvalid.shape[1]).to(device)  # targets inside the topic's documents
            ag = ablate_grid(model, hook, sae, tb, variants, lex_t, max(1, p.lik_batch_rows // 4))
            abl, abl_dl = ag.selectivity, ag.dloss
        else:
            notes.append(f"concept {name!r}: no held-out window of its documents: no ablation")
            abl = abl_dl = np.zeros((len(variants), 0))
        log.info("concept %s: latents in %d out %d random %d; lexicon %d tokens, %d ablation windows",
                 name, sae_in, sae_out, rand_lat, len(lex), len(wins))
        out.append(ConceptGrids(name, [int(x) for x in lex], latents, scores, _with_zero(sg.effect, shape),
                                _with_zero(sg.kl, shape), _with_zero(sg.dloss, shape), abl, abl_dl))
    return Evidence(out, [0.0, *coefs], rho, {"validation": len(val), "test": len(test)}, notes)
