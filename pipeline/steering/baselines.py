"""Which features to steer, which topic each one stands for, and the baseline steering directions.

Baselines (all additive, all rescaled to the norm of the SAE feature's write ``m_f * ||W_dec[f]||`` so
a coefficient means the same perturbation size for every method):

- ``dim``: difference in means of the hidden state at the hook between tokens of the feature's topic
  and all other labelled tokens — contrastive activation addition (Rimsky et al. 2024; Marks & Tegmark
  2023 call it the mass-mean probe direction). Needs a labelled corpus.
- ``random``: a seeded Gaussian direction: what any perturbation of that size does.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import polars as pl

from pipeline.errors import UserError
from pipeline.steering.stats import FeatureStats

log = logging.getLogger(__name__)

__all__ = ["read_interpret", "select_features", "feature_topics", "dim_direction", "random_direction"]

# Column names the interpretation stage may use, most specific first.
_SCORE_COLS = ("detection_balanced_accuracy", "detection_auc", "fuzzing_balanced_accuracy", "explanation_score", "score")
_AUROC_COLS = ("topic_auroc", "auroc")
_TOPIC_COLS = ("best_topic", "topic")


def _col(df: pl.DataFrame | None, names: tuple[str, ...]) -> str | None:
    """The first column whose name, version suffix (``@1``) removed, is in ``names``."""
    if df is None:
        return None
    by_base: dict[str, str] = {}
    for c in df.columns:
        by_base.setdefault(c.split("@")[0], c)
    return next((by_base[n] for n in names if n in by_base), None)


def read_interpret(path: Path) -> pl.DataFrame | None:
    """``data/interpret/<hook>/features.parquet`` if present (one row per feature), else None.

    Absent (``sae steer`` run without ``sae interpret``), the stage falls back to its own statistics for
    what interpretation would have given (which features ``select_by`` topic/auroc picks, each feature's
    topic): the run works, with possibly other features, so it says so in a one-line warning. A file
    without a ``feature`` column is not interpretation's output: an error.
    """
    if not path.is_file():
        log.warning("%s not found (run `sae interpret` first): feature selection (steer.select_by topic/auroc) and "
                    "feature topics come from this stage's own statistics", path)
        return None
    df = pl.read_parquet(path)
    if "feature" not in df.columns:
        raise UserError(f"{path}: no 'feature' column, not written by `sae interpret` (rerun it)")
    return df


def _warn_if_lacking(stats: FeatureStats, interp: pl.DataFrame | None, listed: bool, select_by: str) -> None:
    """One warning line when interpretation's output is there but lacks the topic columns this run would take
    from it (selection by topic AUROC, each feature's topic), so that this stage's own statistics stand in.
    An absent output was reported by :func:`read_interpret`; an unlabelled corpus uses no topics at all."""
    if interp is None or not stats.topics:
        return
    selects = not listed and select_by in ("topic", "auroc")
    wanted = (_AUROC_COLS, _TOPIC_COLS) if selects else (_TOPIC_COLS,)
    lacking = [names[0] for names in wanted if _col(interp, names) is None]
    if lacking:
        what = [w for w, used in (("feature selection", selects), ("feature topics", _TOPIC_COLS[0] in lacking)) if used]
        log.warning("steer: the interpretation output has no %s column: %s from this stage's own statistics",
                    " or ".join(lacking), " and ".join(what))


def select_features(stats: FeatureStats, interp: pl.DataFrame | None, listed: list[int], n: int,
                    select_by: str, min_firing: int) -> list[int]:
    """The features to steer: ``listed`` if given, else the top ``n`` by ``select_by``."""
    _warn_if_lacking(stats, interp, bool(listed), select_by)
    d_sae = len(stats.max_act)
    if listed:
        bad = [f for f in listed if f >= d_sae]
        if bad:
            raise UserError(f"steer.features: {bad} out of range (the SAE has {d_sae} features)")
        return list(dict.fromkeys(listed))
    alive = stats.fire_count >= min_firing  # [d_sae]
    if select_by == "score":
        col = _col(interp, _SCORE_COLS)
        if col is None:
            raise UserError("steer.select_by: 'score' needs explanation scores in data/interpret (run interpret first)")
        df = interp.filter(pl.col(col).is_not_null() & pl.col(col).is_not_nan()).sort([col, "feature"], descending=[True, False])  # type: ignore[union-attr]
        return [int(f) for f in df["feature"].to_list() if f < d_sae and alive[f]][:n]
    if not stats.topics:
        raise UserError(f"steer.select_by: {select_by!r} needs a labelled corpus (corpus.label_column); list steer.features instead")
    col = _col(interp, _AUROC_COLS)
    tcol = _col(interp, _TOPIC_COLS)
    if col is not None and tcol is not None:
        # Interpretation's topic AUROC: a threshold-free measure of how well the feature separates its topic.
        df = interp.filter(pl.col(col).is_not_null() & pl.col(tcol).is_in(stats.topics))  # type: ignore[union-attr]
        ranked = [(float(a), int(f), str(t)) for a, f, t in zip(df[col], df["feature"], df[tcol], strict=True) if f < d_sae and alive[f]]
    else:
        sel = stats.selectivity()  # [n_topics, d_sae]
        sel = np.where(alive[None], sel, -np.inf)
        ranked = [(float(sel[t, f]), int(f), stats.topics[t]) for t in range(len(stats.topics)) for f in np.argsort(-sel[t])[:n]]
    ranked.sort(key=lambda r: (-r[0], r[1]))
    if select_by == "auroc":
        return list(dict.fromkeys(f for _, f, _ in ranked))[:n]
    chosen: list[int] = []
    seen_topics: set[str] = set()
    for _, f, t in ranked:  # best feature of each topic, most separable topics first
        if t not in seen_topics and f not in chosen:
            chosen.append(f)
            seen_topics.add(t)
        if len(chosen) == n:
            break
    return chosen


def feature_topics(stats: FeatureStats, interp: pl.DataFrame | None, features: list[int]) -> dict[int, str | None]:
    """The topic each feature stands for: interpretation's best topic, else the most selective topic."""
    if not stats.topics:
        return {f: None for f in features}
    # Only topics with tokens in the statistics split, and other tokens to contrast them with, can
    # give a difference-in-means baseline (interpretation ran on another split and may name others).
    n_all = stats.topic_tokens.sum()
    usable = [i for i, n in enumerate(stats.topic_tokens) if 0 < n < n_all]
    if not usable:
        return {f: None for f in features}
    tcol = _col(interp, _TOPIC_COLS)
    known: dict[int, str] = {}
    if tcol is not None:
        ok = {stats.topics[i] for i in usable}
        known = {int(f): str(t) for f, t in zip(interp["feature"], interp[tcol], strict=True) if t in ok}  # type: ignore[index]
    sel = stats.selectivity()[usable]
    return {f: known.get(f, stats.topics[usable[int(np.argmax(sel[:, f]))]]) for f in features}


def dim_direction(stats: FeatureStats, topic: str) -> np.ndarray:
    """Unit difference-in-means direction of ``topic`` vs the other labelled tokens (shape: [d_in])."""
    t = stats.topics.index(topic)
    n_t = stats.topic_tokens[t]
    n_all = stats.topic_tokens.sum()
    if n_t == 0 or n_all - n_t == 0:
        raise UserError(f"steer: topic {topic!r} has no tokens (or no contrast) in the statistics split")
    mean_out = (stats.resid_mean * n_all - stats.resid_topic_mean[t] * n_t) / (n_all - n_t)
    v = stats.resid_topic_mean[t] - mean_out
    return v / max(float(np.linalg.norm(v)), 1e-12)


def random_direction(d_in: int, seed: int) -> np.ndarray:
    """Seeded unit Gaussian direction (shape: [d_in])."""
    v = np.random.default_rng(seed).standard_normal(d_in)
    return v / np.linalg.norm(v)
