"""One interpretability ranking of features, shared by the report's "Top features" and the dashboard index.

Ranking by the explanation score alone puts features that fired on two tokens first: a score of 1
on one or two held-out examples is chance, not evidence. So features are ranked in tiers, best
first:

0. supported: fired on at least ``min_support`` tokens, not dense (fires on at most
   ``DENSE_THRESHOLD`` of tokens: "fires on the" is not what a reader opens the list for) and has a
   held-out detection score;
1. supported but dense, or without a detection score (no silent contexts to test against);
2. below the minimum support;
3. dead (never fired).

Within a tier: the held-out evidence score (mean of the detection and fuzzing balanced accuracies that
are defined, Paulo et al. 2024), then the best topic AUROC (callers pass the low end of its 95% interval
where they have it, so a topic AUROC resting on few segments counts for less), then the firing count. Everything is a
pure function of the ``features.parquet`` columns, so both readers rank identically.
"""

from __future__ import annotations

import numpy as np

from pipeline.metric_names import DENSE_THRESHOLD

__all__ = ["MIN_SUPPORT", "RANKING", "detection_notes", "evidence_score", "rank_features"]

MIN_SUPPORT = 20  # activating tokens: at least as many as the default run's top examples (interpret.n_examples)
RANKING = (f"ranked by interpretability: features firing on at least {MIN_SUPPORT} tokens and on at most "
           f"{DENSE_THRESHOLD:.0%} of them first (with a detection score), by held-out explanation score (mean of detection and fuzzing "
           "balanced accuracy), then topic AUROC (low end of its 95% interval), then firing count; then dense or undetectable, rare, dead features")


def _finite_or(x: np.ndarray, fill: float) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return np.where(np.isfinite(x), x, fill)


def evidence_score(detection: np.ndarray, fuzzing: np.ndarray) -> np.ndarray:
    """Mean of the defined held-out balanced accuracies per feature: ``[d]``, ``[d]`` -> ``[d]`` (NaN: neither)."""
    both = np.stack([np.asarray(detection, np.float64), np.asarray(fuzzing, np.float64)])  # [2, d]
    ok = np.isfinite(both)
    n = ok.sum(0)
    with np.errstate(invalid="ignore"):
        return np.where(n > 0, np.where(ok, both, 0.0).sum(0) / np.maximum(n, 1), np.nan)


def rank_features(fire_count: np.ndarray, n_tokens: int, detection: np.ndarray, fuzzing: np.ndarray,
                  topic_auroc: np.ndarray, min_support: int = MIN_SUPPORT) -> tuple[np.ndarray, np.ndarray]:
    """Feature order, most interpretable first, and each feature's tier (see the module docstring).

    ``fire_count[d]``: tokens each feature fired on out of ``n_tokens``; ``detection``, ``fuzzing``,
    ``topic_auroc``: ``[d]`` float, NaN where undefined. Returns (``order[d]`` feature indices,
    ``tier[d]`` int8 in 0..3 indexed by feature). Ties keep feature order (stable), so it is deterministic.
    """
    fire = np.asarray(fire_count, dtype=np.int64)
    score = evidence_score(detection, fuzzing)
    dense = fire > DENSE_THRESHOLD * max(int(n_tokens), 1)
    tier = np.where(fire == 0, 3, np.where(fire < min_support, 2, np.where(dense | ~np.isfinite(np.asarray(detection, np.float64)), 1, 0)))
    # np.lexsort sorts by the last key first; negate the "higher is better" keys.
    order = np.lexsort((-fire, -_finite_or(topic_auroc, -1.0), -_finite_or(score, -1.0), tier))
    return order, tier.astype(np.int8)


def detection_notes(fire_count: np.ndarray, explained: np.ndarray, detection: np.ndarray,
                    fuzzing: np.ndarray) -> list[str | None]:
    """Why a feature has no detection score (None where it has one): ``[d]`` arrays -> ``d`` short notes.

    Detection needs held-out activating contexts and non-activating ones (``interpret.n_random``); a
    feature that fires in every sampled context has no negatives, one that fires in a single context
    has no held-out positives (the explainer saw it)."""
    out: list[str | None] = []
    for f, e, d, z in zip(np.asarray(fire_count).tolist(), np.asarray(explained).tolist(),
                          np.asarray(detection, np.float64).tolist(), np.asarray(fuzzing, np.float64).tolist(),
                          strict=True):
        if np.isfinite(d):
            out.append(None)
        elif f == 0:
            out.append("dead: never fired")
        elif not e:
            out.append("not explained")
        elif np.isfinite(z):
            out.append("no silent contexts to test against")
        else:
            out.append("too few activating examples")
    return out
