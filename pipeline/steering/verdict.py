"""The protocol's verdict on one headline metric (``hm@2``, or ``judge_hm`` when the LLM judge ran).

1. **SAE method** (``add`` or ``clamp``): the one with the highest mean *validation* value at each
   feature's chosen coefficient; ties go to ``add`` (the simpler intervention). Test prompts never
   enter the choice, so the test numbers below are not inflated by picking the luckier method.
2. **Test means** of every method over (test prompt, feature) units, each with a 95% bootstrap interval.
3. **Against each baseline**: the paired difference (chosen SAE method − baseline) over the same units
   with its interval (:mod:`pipeline.steering.bootstrap`). The verdict says "beats" only when the whole
   interval is above 0, "loses to" when it is below, and otherwise "is indistinguishable from" (the
   interval includes 0): a difference within noise, e.g. one a different CPU's rounding could flip,
   is never stated as a win or a loss.

Keys (in ``overall`` of ``metrics/steer.json``; ``P`` = ``""`` for hm@2, ``"judge_"`` for the judge):
``{P}sae_method``, ``{P}sae_method_choice`` (why), ``validation_<metric>`` and ``test_<metric>`` (per
method), ``{P}sae_minus_<baseline>_hm@3`` (mean, ci95_low, ci95_high, verdict, wins). Version 3 of the
``sae_*`` summaries: version 2 took the feature statistics from every token, BOS included
(:data:`pipeline.metric_names.STEERING_EXCLUDING_SPECIAL`); version 1 picked the SAE method on test
means and had no interval.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import polars as pl

from pipeline.params.analysis import BASELINES, SAE_METHODS
from pipeline.steering.bootstrap import Interval, Resamples, interval

__all__ = ["grid", "choose_sae_method", "metric_verdict", "VERDICTS"]

VERDICTS = ("beats", "loses to", "is indistinguishable from")


def grid(chosen: pl.DataFrame, method: str, split: str, metric: str, prompts: list[int], features: list[int]) -> np.ndarray:
    """``metric`` of ``method`` per unit (shape: [len(prompts), len(features)]; NaN where there is none).

    :param chosen: generation rows at each (feature, method)'s chosen coefficient
    """
    out = np.full((len(prompts), len(features)), np.nan)
    rows = chosen.filter((pl.col("method") == method) & (pl.col("split") == split))
    if metric not in rows.columns:
        return out
    p_idx, f_idx = {p: i for i, p in enumerate(prompts)}, {f: j for j, f in enumerate(features)}
    for p, f, v in zip(rows["prompt_id"].to_list(), rows["feature"].to_list(), rows[metric].to_list(), strict=True):
        if p in p_idx and f in f_idx and v is not None:
            out[p_idx[p], f_idx[f]] = v
    return out


def _mean(values: np.ndarray) -> float:
    ok = np.isfinite(values)
    return float(values[ok].mean()) if ok.any() else math.nan


def choose_sae_method(validation: dict[str, float]) -> str | None:
    """The SAE method with the highest validation mean (NaN: not a candidate); ties in SAE_METHODS order."""
    cands = [m for m in SAE_METHODS if m in validation and not math.isnan(validation[m])]
    return max(cands, key=lambda m: (validation[m], -SAE_METHODS.index(m))) if cands else None


def _ci(iv: Interval, sign: str = "") -> str:
    if math.isnan(iv.low):
        return "no 95% CI (fewer than 2 test prompts)"
    return f"95% CI [{iv.low:{sign}.3f}, {iv.high:{sign}.3f}]"


def _clause(b: str, metric: str, diff: Interval, base: Interval, wins: str) -> tuple[str, str]:
    """(verdict, its clause) of the SAE method against baseline ``b``."""
    rest = f"{b} test {metric} {base.mean:.3f}, better on {wins} features"
    if diff.low > 0:
        return "beats", f"beats '{b}' (difference {diff.mean:+.3f}, {_ci(diff, '+')}; {rest})"
    if diff.high < 0:
        return "loses to", f"loses to '{b}' (difference {diff.mean:+.3f}, {_ci(diff, '+')}; {rest})"
    why = "95% CI of the difference includes 0" if not math.isnan(diff.low) else "no interval"
    return VERDICTS[2], f"is indistinguishable from '{b}' ({why}: difference {diff.mean:+.3f}, {_ci(diff, '+')}; {rest})"


def metric_verdict(chosen: pl.DataFrame, metric: str, prefix: str, per_feature: dict[str, Any], rs: Resamples,
                   prompts: dict[str, list[int]], features: list[int]) -> tuple[dict[str, Any], list[str]]:
    """The verdict keys for ``metric`` and the clauses of its summary sentence, headline first (both
    empty when no SAE method has a validation value).

    :param prompts: prompt ids per split ("validation", "test"); ``rs`` resamples the test grid
    :param per_feature: ``choose_and_report``'s per-feature entries (for the per-feature win counts)
    """
    methods = [m for m in chosen["method"].unique(maintain_order=True).to_list() if m != "none"]
    val = {m: _mean(grid(chosen, m, "validation", metric, prompts["validation"], features)) for m in methods}
    test = {m: grid(chosen, m, "test", metric, prompts["test"], features) for m in methods}
    sae = choose_sae_method(val)
    if sae is None:
        return {}, []
    others = [m for m in SAE_METHODS if m in val and m != sae and not math.isnan(val[m])]
    why = ((f"highest mean validation {metric} at each feature's chosen coefficient: '{sae}' {val[sae]:.3f}"
            + "".join(f" vs '{m}' {val[m]:.3f}" for m in others))
           if others else f"the only SAE method with a validation {metric}")
    ivs = {m: interval(test[m], rs) for m in methods if np.isfinite(test[m]).any()}
    out: dict[str, Any] = {f"{prefix}sae_method": sae, f"{prefix}sae_method_choice": why,
                           f"validation_{metric}": {m: val[m] for m in methods if m in SAE_METHODS},
                           f"test_{metric}": {m: iv.as_dict() for m, iv in ivs.items()},
                           f"{prefix}sae_hm@3": ivs[sae].mean if sae in ivs else math.nan}
    clauses = []
    for b in BASELINES:
        if b not in ivs or sae not in ivs:
            continue
        diff = interval(test[sae] - test[b], rs)  # paired: same prompt, same feature
        pairs = [(e["methods"][sae]["test"][metric], e["methods"][b]["test"][metric]) for e in per_feature.values()
                 if sae in e["methods"] and b in e["methods"]]
        wins = f"{sum(1 for s, o in pairs if s > o)}/{len(pairs)}"  # NaN compares False: not a win
        verdict, clause = _clause(b, metric, diff, ivs[b], wins)
        out[f"{prefix}sae_minus_{b}_hm@3"] = {**diff.as_dict(), "verdict": verdict, "wins": wins}
        clauses.append(clause)
    head = (f"SAE '{sae}' steering (chosen on validation {metric}): test {metric} "
            + (f"{ivs[sae].mean:.3f}, {_ci(ivs[sae])}" if sae in ivs else "n/a"))
    return out, [head, *clauses]
