"""Topic lexicons: the tokens whose likelihood stands for a concept (the likelihood metrics' target).

For every corpus label t, the ``size`` token ids with the highest pointwise mutual information with
the label on the *train* split, ``PMI(v, t) = log P(v | t) - log P(v)`` (counts over labelled token
positions), among tokens seen at least ``min_count`` times in t's documents (PMI favours rare tokens;
the floor keeps one-off names out) and not special (BOS/EOS/PAD). The steering and ablation metrics
then read the model's probability mass on these tokens (:mod:`pipeline.steering.likelihood`), a
smooth, likelihood-based measure of "the concept" that needs no generation and no judge
(Pres et al. 2024, arXiv 2410.17245, argue for exactly such likelihood-based steering metrics).
Chosen on train, evaluated on held-out text: the lexicon never sees the prompts or documents it scores.
"""

from __future__ import annotations

from collections.abc import Collection

import numpy as np

__all__ = ["topic_lexicons"]


def topic_lexicons(tokens: np.ndarray, labels: np.ndarray, topics: list[str], vocab_size: int, size: int,
                   min_count: int, exclude: Collection[int] = ()) -> dict[str, np.ndarray]:
    """The lexicon of every topic (token ids, shape: [<= size], int64, best PMI first; ties by id).

    :param tokens: train-split token ids (shape: [N] or [C, L]); :param labels: topic index per token
        (same shape, -1 = unlabelled, not counted)
    A topic with fewer than ``size`` tokens above the count floor gets a shorter lexicon (empty if none).
    """
    tok = np.asarray(tokens, dtype=np.int64).ravel()
    lab = np.asarray(labels, dtype=np.int64).ravel()
    keep = (lab >= 0) & (tok >= 0) & (tok < vocab_size)
    tok, lab = tok[keep], lab[keep]
    nt = len(topics)
    counts = np.bincount(lab * vocab_size + tok, minlength=nt * vocab_size).reshape(nt, vocab_size).astype(np.float64)
    total = counts.sum(0)  # [V]
    n = max(total.sum(), 1.0)
    out: dict[str, np.ndarray] = {}
    bad = np.zeros(vocab_size, dtype=bool)
    bad[[t for t in exclude if 0 <= t < vocab_size]] = True
    for t, name in enumerate(topics):
        n_t = max(counts[t].sum(), 1.0)
        ok = (counts[t] >= min_count) & ~bad
        pmi = np.full(vocab_size, -np.inf)
        pmi[ok] = np.log(counts[t, ok] / n_t) - np.log(total[ok] / n)
        order = np.lexsort((np.arange(vocab_size), -pmi))  # PMI descending, then id ascending
        out[name] = order[: min(size, int(ok.sum()))].astype(np.int64)
    return out
