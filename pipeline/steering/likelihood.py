"""Likelihood-based steering and ablation metrics: pure functions on next-token log-probabilities.

Why likelihoods (Pres et al. 2024, arXiv 2410.17245): a judged generation of a 135M model is a noisy,
coarse signal, while the change in the probability the model gives a concept's tokens is measured
exactly on every position, so a handful of prompts already separates methods. Definitions
(versioned names in :mod:`pipeline.metric_names`):

- concept effect (``lik_effect@1``): mean over the next-token positions of a held-out neutral text of
  ``log sum_{v in lexicon} p_steered(v) - log sum_{v in lexicon} p_base(v)`` (nats), the topic lexicon of
  :mod:`pipeline.steering.lexicon`;
- cost (``lik_kl@1``): mean over the same positions of KL(p_base || p_steered) (nats), and the change of
  the text's own next-token loss (``lik_dloss@1``);
- matched cost (:func:`at_budget`): a method's effect where its coefficient sweep reaches a fixed KL
  budget, so no method wins by pushing harder;
- ablation selectivity (``abl_selectivity@1``): on held-out documents of the topic, the mean drop of
  ``log p(actual next token)`` over positions whose target is a lexicon token minus the mean drop over
  the other positions (nats): > 0 when removing the latent removes the concept more than the rest.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

__all__ = ["lexicon_logmass", "kl_rows", "target_logprob", "at_budget", "selectivity"]


def lexicon_logmass(logp: Tensor, lexicon: Tensor) -> Tensor:
    """``log sum_{v in lexicon} p(v)`` per position.

    :param logp: next-token log-probabilities (shape: [B, T, V], float32); :param lexicon: ids (shape: [K])
    :return: (shape: [B, T])
    """
    return torch.logsumexp(logp.index_select(-1, lexicon.to(logp.device)), -1)


def kl_rows(logp_base: Tensor, logp: Tensor) -> Tensor:
    """KL(base || steered) per position, nats (shapes: [B, T, V] each -> [B, T])."""
    return (logp_base.exp() * (logp_base - logp)).sum(-1)


def target_logprob(logp: Tensor, targets: Tensor) -> Tensor:
    """``log p(targets)`` (logp: [B, T, V], targets: [B, T] int64 -> [B, T])."""
    return logp.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)


def at_budget(kl: np.ndarray, values: np.ndarray, budget: float) -> np.ndarray:
    """Per-unit ``values`` interpolated to where the sweep's mean KL reaches ``budget``.

    :param kl: mean KL at each coefficient of a sweep, ascending coefficients, the first one 0 (no
        steering, KL 0) (shape: [n_coef])
    :param values: per-unit values at the same coefficients (shape: [n_coef, U]; row 0 = 0 for effects)
    :return: (shape: [U]); NaN everywhere when the sweep never reaches the budget (a method that cannot
        move the distribution that far is not credited with an effect it did not show)

    The KL curve is made monotone by its running maximum (a coefficient that lowered the KL again is
    never used), then the budget's fractional position on it is found, and every unit is read at that
    same position: one coefficient per (concept, method), not one per unit, so units stay paired.
    """
    env = np.maximum.accumulate(np.asarray(kl, dtype=np.float64))
    values = np.asarray(values, dtype=np.float64)
    if not np.isfinite(env).all() or env[-1] < budget:
        return np.full(values.shape[1], math.nan)
    i = int(np.searchsorted(env, budget, side="left"))  # first index with env[i] >= budget
    if i == 0:
        return values[0].copy()
    w = (budget - env[i - 1]) / (env[i] - env[i - 1])
    return (1.0 - w) * values[i - 1] + w * values[i]


def selectivity(drop: np.ndarray, is_lexicon: np.ndarray, valid: np.ndarray) -> float:
    """Mean ``drop`` over valid lexicon targets minus mean over valid other targets (NaN if either is empty).

    :param drop: ``log p_base(target) - log p_ablated(target)`` per position (shape: [T])
    :param is_lexicon: target is a lexicon token (shape: [T], bool); :param valid: position counts (shape: [T])
    """
    lex, other = valid & is_lexicon, valid & ~is_lexicon
    if not lex.any() or not other.any():
        return math.nan
    return float(drop[lex].mean() - drop[other].mean())
