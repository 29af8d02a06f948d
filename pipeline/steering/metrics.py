"""Steering metrics: pure functions with versioned names (bump the version when a definition changes).

Per (feature, method, coefficient, prompt):

- ``concept_act@2``  mean activation of the steered feature over the continuation's tokens, re-encoded
  by the SAE on the *unsteered* model, divided by the feature's scale m_f;
- ``concept_frac@2`` fraction of continuation tokens where that feature fires (> 0);
- ``topic_score@2``  probability of the feature's topic under a naive-Bayes token model of the corpus
  (:class:`TopicModel`), labelled corpora only;
- ``concept@2``      the concept score used for model selection: ``topic_score@2`` when the corpus is
  labelled (it is blind to the SAE, so it is fair to the baselines), else ``min(concept_act@2, 1)``;
- ``perplexity@2``   exp of the mean NLL of the continuation under the unsteered model;
- ``fluency@2``      ``min(1, ppl_ref / ppl)`` with ppl_ref the unsteered continuation's perplexity on
  the same prompt: 1 = as fluent as not steering;
- ``hm@2``           harmonic mean of ``concept@2`` and ``fluency@2`` (AxBench, Wu et al. 2025, combine
  their judge scores the same way so that neither can be traded away for the other);
- ``distinct2@2``    distinct bigrams / bigrams of the continuation (flags repetition);
- ``kl@2``           KL(clean || steered) of next-token distributions on the prompt, nats, mean over
  edited positions;
- ``other_features@2`` relative L1 change of all *other* SAE features at the hook on the prompt.

Per feature: ``ablation_dloss_fire@2`` / ``ablation_dloss_nofire@2`` (mean change of next-token loss
when the feature is ablated, on contexts where it fires / does not fire) and ``ablation_effect@2``
(their difference).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

__all__ = ["TopicModel", "label_windows", "distinct_n", "kl_divergence", "concept_stats", "other_features_change", "fluency",
           "harmonic_mean", "perplexity"]


class TopicModel:
    """Multinomial naive Bayes over token ids, one class per corpus topic (Laplace smoothing).

    The score of a token sequence is a softmax over topics of the *mean* per-token log-likelihood
    ``mean_t log P(tok_t | topic)`` with a uniform prior: averaging instead of summing tempers the
    posterior so that a 24-token continuation gets a graded score rather than 0 or 1, and the
    uniform prior keeps large topics from winning by base rate.
    """

    def __init__(self, topics: list[str], log_probs: np.ndarray):
        self.topics = topics
        self.log_probs = log_probs  # [n_topics, vocab]

    @classmethod
    def fit(cls, tokens: np.ndarray, labels: np.ndarray, topics: list[str], vocab_size: int,
            alpha: float = 1.0) -> TopicModel:
        """:param tokens: token ids (shape: [N]); :param labels: topic index per token, -1 = unlabelled."""
        tokens, labels = np.asarray(tokens, dtype=np.int64).ravel(), np.asarray(labels).ravel()
        counts = np.full((len(topics), vocab_size), alpha, dtype=np.float64)
        for t in range(len(topics)):
            counts[t] += np.bincount(tokens[labels == t], minlength=vocab_size)[:vocab_size]
        return cls(list(topics), np.log(counts / counts.sum(axis=1, keepdims=True)))

    def scores(self, tokens: np.ndarray) -> np.ndarray:
        """:param tokens: token ids (shape: [B, N]) -> topic probabilities (shape: [B, n_topics])."""
        ll = self.log_probs[:, np.asarray(tokens, dtype=np.int64)].mean(axis=-1).T  # [B, n_topics]
        ll = ll - ll.max(axis=1, keepdims=True)
        p = np.exp(ll)
        return p / p.sum(axis=1, keepdims=True)

    def accuracy(self, windows: np.ndarray, labels: np.ndarray) -> float:
        """Share of token windows (shape: [M, N]) whose argmax topic is their label (shape: [M]):
        reported as ``topic_model_accuracy@1`` so the topic score's validity is on record."""
        if len(windows) == 0:
            return float("nan")
        return float((self.scores(windows).argmax(1) == np.asarray(labels)).mean())


def label_windows(tokens: np.ndarray, labels: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Cut contexts (shapes: [C, L]) into windows of ``n`` tokens that lie inside one labelled document."""
    wins, labs = [], []
    for s in range(0, tokens.shape[1] - n + 1, n):
        lab = labels[:, s:s + n]
        ok = (lab == lab[:, :1]).all(1) & (lab[:, 0] >= 0)
        wins.append(tokens[ok, s:s + n])
        labs.append(lab[ok, 0])
    if not wins:
        return np.zeros((0, n), np.int64), np.zeros(0, np.int64)
    return np.concatenate(wins), np.concatenate(labs)


def kl_divergence(clean_logits: Tensor, steered_logits: Tensor, mask: Tensor) -> Tensor:
    """Mean over masked positions of KL(clean || steered), nats.

    :param clean_logits: (shape: [B, T, V]); :param steered_logits: (shape: [B, T, V])
    :param mask: positions to average (shape: [B, T], bool)
    :return: (shape: [B])
    """
    lp = torch.log_softmax(clean_logits.float(), -1)
    lq = torch.log_softmax(steered_logits.float(), -1)
    kl = (lp.exp() * (lp - lq)).sum(-1)  # [B, T]
    m = mask.float()
    return (kl * m).sum(-1) / m.sum(-1).clamp(min=1)


def concept_stats(acts: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """(``concept_act@2``, ``concept_frac@2``) per row from the feature's activations ``acts [B, N]``."""
    return acts.float().mean(-1) / scale, (acts > 0).float().mean(-1)


def other_features_change(f_clean: Tensor, f_steered: Tensor, feature: int, mask: Tensor) -> Tensor:
    """``other_features@2``: sum |f' - f| / sum |f| over all features but ``feature`` and masked positions.

    :param f_clean: SAE features of the clean hidden state (shape: [B, T, d_sae]); same for ``f_steered``
    :param mask: (shape: [B, T], bool) :return: (shape: [B])
    """
    keep = torch.ones(f_clean.shape[-1], dtype=torch.bool, device=f_clean.device)
    keep[feature] = False
    m = mask.float()[..., None]
    diff = ((f_steered - f_clean).abs() * m)[..., keep].sum((-1, -2))
    base = (f_clean.abs() * m)[..., keep].sum((-1, -2))
    return diff / base.clamp(min=1e-12)


def perplexity(nll: Tensor) -> Tensor:
    """``perplexity@2`` from per-token NLL (shape: [B, N]) -> (shape: [B])."""
    return nll.float().mean(-1).exp()


def fluency(ppl: np.ndarray, ppl_ref: np.ndarray) -> np.ndarray:
    """``fluency@2`` = min(1, ppl_ref / ppl)."""
    return np.minimum(1.0, np.asarray(ppl_ref, dtype=np.float64) / np.asarray(ppl, dtype=np.float64))


def distinct_n(tokens: np.ndarray, n: int = 2) -> np.ndarray:
    """``distinct2@2`` (n=2): distinct n-grams / n-grams per row of ``tokens [B, N]``.

    Reported next to fluency because perplexity rewards degenerate repetition ("200 words. 200
    words. ..." has a low perplexity); a low distinct-2 flags it (Li et al. 2016).
    """
    out = np.zeros(len(tokens))
    for i, row in enumerate(np.asarray(tokens)):
        grams = [tuple(row[j:j + n]) for j in range(len(row) - n + 1)]
        out[i] = len(set(grams)) / len(grams) if grams else 1.0
    return out


def harmonic_mean(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``hm@2`` = 2ab / (a + b), 0 where both are 0; inputs in [0, 1]."""
    a = np.clip(np.asarray(a, dtype=np.float64), 0.0, 1.0)
    b = np.clip(np.asarray(b, dtype=np.float64), 0.0, 1.0)
    s = a + b
    return np.where(s > 0, 2 * a * b / np.where(s > 0, s, 1.0), 0.0)
